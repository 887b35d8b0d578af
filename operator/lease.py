"""Leader election with a coordination.k8s.io Lease: only the holder runs the controllers.

A replica that cannot renew within the lease duration stops (the Deployment restarts it as a
standby), so two replicas never act at once. A clean shutdown releases the lease so the next
holder takes over at once instead of waiting for it to expire.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from sensorfleet.operator.kube import ApiError, KubeClient

log = logging.getLogger("sensorfleet.operator.lease")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _micro(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


class LeaderLease:
    def __init__(self, client: KubeClient, namespace: str, name: str, identity: str, duration: int = 15) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.held = False

    def _expired(self, spec: dict[str, Any]) -> bool:
        renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
        if not spec.get("holderIdentity") or renewed is None:
            return True
        return renewed + dt.timedelta(seconds=spec.get("leaseDurationSeconds", self.duration)) < _now()

    async def try_acquire(self) -> bool:
        """One attempt to take or renew the lease; True when this replica holds it."""
        now = _micro(_now())
        lease = await self.client.get("Lease", self.namespace, self.name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration,
                         "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
            }
            try:
                await self.client.create(body)
            except ApiError as error:
                if error.status == 409:
                    return False
                raise
            self.held = True
            return True
        spec = lease.setdefault("spec", {})
        mine = spec.get("holderIdentity") == self.identity
        if not mine and not self._expired(spec):
            self.held = False
            return False
        if not mine:
            spec["leaseTransitions"] = spec.get("leaseTransitions", 0) + 1
            spec["acquireTime"] = now
        spec.update({"holderIdentity": self.identity, "leaseDurationSeconds": self.duration, "renewTime": now})
        try:
            await self.client.replace(lease)  # carries resourceVersion: a concurrent writer gets 409
        except ApiError as error:
            if error.status == 409:
                self.held = False
                return False
            raise
        self.held = True
        return True

    async def acquire(self, retry: float = 2.0) -> None:
        """Block until this replica holds the lease."""
        announced = False
        while not await self._attempt():
            if not announced:
                log.info("lease %s/%s is held by another replica; standing by", self.namespace, self.name)
                announced = True
            await asyncio.sleep(retry)
        log.info("acquired lease %s/%s as %s", self.namespace, self.name, self.identity)

    async def _attempt(self) -> bool:
        try:
            return await self.try_acquire()
        except (ApiError, OSError, asyncio.TimeoutError) as error:
            log.warning("lease attempt failed: %s", error)
            return False

    async def keep(self) -> None:
        """Renew until renewal fails for a whole lease duration; then return (leadership lost)."""
        last_ok = _now()
        while True:
            await asyncio.sleep(self.duration / 3)
            if await self._attempt():
                last_ok = _now()
            elif not self.held or _now() - last_ok > dt.timedelta(seconds=self.duration):
                self.held = False
                log.error("lost lease %s/%s", self.namespace, self.name)
                return

    async def release(self) -> None:
        if not self.held:
            return
        try:
            lease = await self.client.get("Lease", self.namespace, self.name)
            if lease and lease.get("spec", {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = None
                lease["spec"]["renewTime"] = None
                await self.client.replace(lease)
        except (ApiError, OSError, asyncio.TimeoutError) as error:
            log.warning("could not release the lease: %s", error)
        self.held = False
