"""The apply steps of a FULL reconcile pass (reconcile.py runs them in order):

    credentials -> apply children (checking ownership first) -> prune

Every child is server-side applied; an object of a child's name that this fleet did not create is
never adopted (a NotOwned failure names it), and children the spec no longer asks for are deleted.
The broker credentials are read once and kept for ever.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import Callable
from typing import Any

from sensorfleet.operator import builders
from sensorfleet.operator.broker_builders import BROKER_USERNAME, BrokerCredentials, uses_broker
from sensorfleet.operator.child_meta import FLEET_LABEL, BuildOptions, broker_secret_name, child_selector, data_claim_name
from sensorfleet.operator.fleet_state import STATUS_KINDS, FleetState, Key, controller_uid
from sensorfleet.operator.kube import ApiError, KubeClient
from sensorfleet.operator.metrics import OperatorMetrics
from sensorfleet.operator.status import Failure
from sensorfleet.spec import KIND, SensorFleet

log = logging.getLogger("sensorfleet.operator")

# Kinds the operator may have created for a fleet and lists when pruning.
# Never the data claim: switching to storage.url (or any edit) must not delete a dataset; a claim
# the fleet owns (claimRetention.whenDeleted: Delete) goes only with the fleet, by garbage collection.
PRUNED_KINDS = ("Deployment", "Service", "ConfigMap", "CronJob", "NetworkPolicy")


class ChildApplier:
    """Applies and prunes the children of the fleets of one Reconciler, with its client and
    options. `owners` is the Reconciler's map of the controller uid of every labelled child the
    watch showed, shared (the watch fills it, the ownership check reads it); `observe` hands an
    applied Deployment or Job back to the Reconciler's status cache."""

    def __init__(self, client: KubeClient, options: BuildOptions, metrics: OperatorMetrics,
                 owners: dict[tuple[str, str, str], str | None], apply_limit: int,
                 observe: Callable[[Key, dict[str, Any]], None]) -> None:
        self.client = client
        self.options = options
        self.metrics = metrics
        self.owners = owners
        self._apply_limit = asyncio.Semaphore(apply_limit)
        self._observe = observe

    async def credentials(self, fleet: SensorFleet, state: FleetState) -> BrokerCredentials | Failure | None:
        """Existing broker credentials are kept for ever; new ones are generated once. A Secret of
        that name that the fleet did not create is neither read nor adopted."""
        if not uses_broker(fleet):
            return None
        name = broker_secret_name(fleet.name)
        ident = (fleet.metadata.namespace, "Secret", name)
        secret = await self.client.get("Secret", fleet.metadata.namespace, name)
        if secret is None:
            # Secrets are not watched, so no DELETED event clears what an earlier GET cached: a
            # fleet deleted and recreated under the same name would find its predecessor's uid here
            # and refuse the Secret it is about to create as NotOwned, for ever (issue 12).
            self.owners.pop(ident, None)
        else:
            owner = controller_uid(secret["metadata"])
            self.owners[ident] = owner
            if owner != state.body["metadata"]["uid"]:
                return self.refuse(state, "Secret", name, owner)
        data = (secret or {}).get("data") or {}
        if data.get("username") and data.get("password"):
            return BrokerCredentials(base64.b64decode(data["username"]).decode(), base64.b64decode(data["password"]).decode())
        return BrokerCredentials(BROKER_USERNAME, secrets.token_urlsafe(24))

    async def apply_all(self, fleet: SensorFleet, state: FleetState) -> list[Failure]:
        """Apply every child concurrently, in one round: the children that do not depend on the
        broker credentials (found by building with two different ones) go out while the
        credentials are read; the Secret and the broker Deployment follow. Nothing needs an
        order: a pod whose ConfigMap or Secret is not there yet waits for it."""
        owner = builders.owner_from_body(state.body)
        key = (fleet.metadata.namespace, fleet.name)

        async def apply(manifest: dict[str, Any]) -> Failure | None:
            name, kind = manifest["metadata"]["name"], manifest["kind"]
            async with self._apply_limit:
                try:
                    if (refusal := await self.check_owned(state, kind, name)) is not None:
                        return refusal
                    live = await self.client.apply(manifest)
                except ApiError as error:
                    return Failure("ApplyFailed", f"{kind} {name}: {error.reason or error.status}: "
                                   f"{(error.body or {}).get('message', '') if isinstance(error.body, dict) else error.body}")
                except (OSError, asyncio.TimeoutError) as error:
                    return Failure("ApplyFailed", f"{kind} {name}: {error}")
            meta = live.get("metadata", {})
            before = state.applied.get((kind, name))
            state.applied[(kind, name)] = (meta.get("resourceVersion", ""), meta.get("generation"))
            if kind in STATUS_KINDS:
                self._observe(key, live)  # newer than the cache until the watch catches up
            self.metrics.applies.labels(kind, str(before is None or before[0] != meta.get("resourceVersion")).lower()).inc()
            return None

        if uses_broker(fleet):
            probe = builders.build_children(fleet, owner, self.options, BrokerCredentials("a", "a"))
            other = builders.build_children(fleet, owner, self.options, BrokerCredentials("b", "b"))
            independent = [c for c, o in zip(probe, other) if c == o]
        else:
            independent = builders.build_children(fleet, owner, self.options, None)
        reading = asyncio.ensure_future(self.credentials(fleet, state))
        first = asyncio.ensure_future(asyncio.gather(*(apply(c) for c in independent)))
        try:
            credentials = await reading
        except (ApiError, OSError, asyncio.TimeoutError) as error:
            await first
            return [Failure("CredentialsFailed", str(error))]
        except BaseException:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            raise
        failures = [f for f in await first if f]
        if isinstance(credentials, Failure):
            return [*failures, credentials]
        children = builders.build_children(fleet, owner, self.options, credentials)
        keys = {(c["kind"], c["metadata"]["name"]) for c in independent}
        dependent = [c for c in children if (c["kind"], c["metadata"]["name"]) not in keys]
        failures += [f for f in await asyncio.gather(*(apply(c) for c in dependent)) if f]
        state.desired = {(c["kind"], c["metadata"]["name"]) for c in children}
        return failures

    async def check_owned(self, state: FleetState, kind: str, name: str) -> Failure | None:
        """None when (kind, name) is absent or controlled by this fleet; else a refusal. Children
        this process applied, or the watch showed, are known without a request."""
        namespace, uid = state.body["metadata"]["namespace"], state.body["metadata"]["uid"]
        if (kind, name) in state.applied:
            return None
        fleet_name = state.body["metadata"]["name"]
        if kind == "PersistentVolumeClaim" and name == data_claim_name(fleet_name):
            # A retained claim has no owner: this fleet's, or an earlier fleet's of the same name
            # (its dataset), when it carries the fleet's label.
            live = await self.client.get(kind, namespace, name)
            if live is None:
                return None
            owner = controller_uid(live["metadata"])
            if owner in (None, uid) and (live["metadata"].get("labels") or {}).get(FLEET_LABEL) == fleet_name:
                return None
            return self.refuse(state, kind, name, owner)
        ident = (namespace, kind, name)
        if ident in self.owners:
            owner = self.owners[ident]
        else:
            live = await self.client.get(kind, namespace, name)
            if live is None:
                return None
            owner = controller_uid(live["metadata"])
        if owner == uid:
            state.refused.discard((kind, name))
            return None
        return self.refuse(state, kind, name, owner)

    def refuse(self, state: FleetState, kind: str, name: str, owner: str | None) -> Failure:
        meta = state.body["metadata"]
        message = (f"{kind} {meta['namespace']}/{name} already exists and was not created by {KIND} "
                   f"{meta['name']} ({'owned by ' + owner if owner else 'no controller'}): left alone; "
                   f"delete or rename it and the fleet creates its own")
        if (kind, name) not in state.refused:  # the Warning Event comes with the Degraded condition
            state.refused.add((kind, name))
            log.warning("%s", message)
        return Failure("NotOwned", message)

    async def prune(self, fleet: SensorFleet, state: FleetState) -> list[Failure]:
        """Delete children the spec no longer asks for (fewer replicas, a protocol switched off)."""
        desired = state.desired
        namespace, uid = fleet.metadata.namespace, state.body["metadata"]["uid"]
        failures: list[Failure] = []
        stale: list[tuple[str, str, str]] = []
        try:
            listed = await asyncio.gather(*(self.client.list(k, namespace, child_selector(fleet.name)) for k in PRUNED_KINDS))
        except ApiError as error:
            return [Failure("PruneFailed", str(error))]
        for kind, items in zip(PRUNED_KINDS, listed):
            for item in items:
                meta = item["metadata"]
                owned = any(ref.get("uid") == uid for ref in meta.get("ownerReferences", []))
                if owned and (kind, meta["name"]) not in desired:
                    stale.append((kind, meta["name"], meta["uid"]))
        # Secrets and PodMonitors are not listed (no list/watch permission on Secrets): by name.
        for kind, name in (("Secret", broker_secret_name(fleet.name)), ("PodMonitor", fleet.name)):
            if (kind, name) not in desired and state.applied.pop((kind, name), None) is not None:
                stale.append((kind, name, ""))
        for kind, name, child_uid in stale:
            try:
                if await self.client.delete(kind, namespace, name, uid=child_uid or None):
                    self.metrics.deletes.labels(kind).inc()
                    log.info("pruned %s %s/%s", kind, namespace, name)
                state.applied.pop((kind, name), None)
            except ApiError as error:
                failures.append(Failure("PruneFailed", f"{kind} {name}: {error}"))
        return failures
