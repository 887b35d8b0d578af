"""The reconcile loop: a work queue of fleets and the small ordered steps run for each.

    load fleet -> credentials -> check ownership -> apply children -> prune -> status (+ Events)

(the credentials, apply and prune steps are apply_children.py's; what is remembered of a fleet
between passes is fleet_state.py's).

A pass that failed is retried with exponential backoff (1 s, 2 s, 4 s ... at most the resync
period), without waiting for an event. An object of a child's name that this fleet did not create
is never adopted: the pass fails with a Warning Event naming it, and retries until it is gone.

kopf's watch handlers (handlers.py) only enqueue keys; workers here take one fleet at a time (a
fleet is never reconciled twice concurrently), coalescing bursts of events into one pass. Two kinds
of work: FULL (apply every child, prune the unwanted ones, then status) after a spec change, a
hand-edited or deleted child, or a periodic resync; STATUS (recompute status only) when a child's
status moved (pods became ready, a forecast job finished).

Status is computed from the Deployments and Jobs the watch delivered (and the live objects the
applies returned), so a STATUS pass makes no request unless the status changed: a hundred fleets
rolling out at once cost the API server one status PATCH per real change, not two LISTs per event.
The handlers are coroutines and run on the event loop, like the workers (the queue is not
thread-safe).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any

from pydantic import ValidationError

from sensorfleet.operator import builders, child_meta, storage_builders
from sensorfleet.operator.apply_children import ChildApplier
from sensorfleet.operator.child_meta import BuildOptions
from sensorfleet.operator.fleet_state import STATUS_KINDS, FleetState, Key, controller_uid, resource_version
from sensorfleet.operator.kube import ApiError, KubeClient, NotLeading
from sensorfleet.operator.metrics import OperatorMetrics
from sensorfleet.operator.status import Failure, compute_status, newest_finished_job, ready_condition
from sensorfleet.spec import API_GROUP, API_VERSION, KIND, SensorFleet

log = logging.getLogger("sensorfleet.operator")

STATUS, FULL = 1, 2
# The Job controller's label on a Job's pods (Kubernetes >= 1.27).
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(self, client: KubeClient, options: BuildOptions, metrics: OperatorMetrics,
                 workers: int = 8, resync_seconds: float = 300.0, apply_concurrency: int = 8,
                 backoff_seconds: float = 1.0) -> None:
        self.client = client
        self.options = options
        self.metrics = metrics
        self.fleets: dict[Key, FleetState] = {}
        self.resync_seconds = resync_seconds
        self._workers = workers
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._pending: dict[Key, int] = {}
        self._active: set[Key] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()  # Events posted from sync callbacks
        self.last_status: dict[Key, dict[str, Any]] = {}
        # What the watch (and our applies) last showed of each fleet's Deployments and Jobs:
        # key -> (kind, name) -> body. Status is computed from it without a request.
        self.observed: dict[Key, dict[tuple[str, str], dict[str, Any]]] = {}
        # Controller owner uid of every labelled child the watch showed: (namespace, kind, name) -> uid.
        self.owners: dict[tuple[str, str, str], str | None] = {}
        self.backoff_seconds = backoff_seconds
        self._retries: dict[Key, int] = {}
        self._retry_timers: dict[Key, asyncio.TimerHandle] = {}
        self.applier = ChildApplier(client, options, metrics, self.owners, apply_concurrency * workers, self._observe)

    # --- queue -----------------------------------------------------------------------------

    def enqueue(self, key: Key, work: int) -> None:
        already = key in self._pending
        self._pending[key] = max(self._pending.get(key, 0), work)
        if not already and key not in self._active:
            self._queue.put_nowait(key)
        self.metrics.queue_depth.set(len(self._pending))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name=f"reconcile-worker-{i}") for i in range(self._workers)]
        self._tasks.append(asyncio.create_task(self._resync(), name="resync"))

    async def stop(self) -> None:
        for timer in self._retry_timers.values():
            timer.cancel()
        self._retry_timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def healthy(self) -> bool:
        return all(not t.done() for t in self._tasks)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            for key in list(self.fleets):
                self.enqueue(key, FULL)

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            work = self._pending.pop(key, 0)
            self.metrics.queue_depth.set(len(self._pending))
            if not work or key not in self.fleets:
                continue
            self._active.add(key)
            try:
                await self.reconcile(key, work)
            except asyncio.CancelledError:
                raise
            except NotLeading as error:  # leadership lapsed mid-pass; the process is stopping
                log.warning("reconcile of %s/%s stopped: %s", *key, error)
            except Exception:  # a bug must not kill the worker; retried with backoff
                log.exception("reconcile of %s/%s crashed", *key)
                self.metrics.errors.labels("Crash").inc()
                self._retry_later(key, "Crash")
                self.metrics.reconciles.labels("full" if work == FULL else "status", "error").inc()
            finally:
                self._active.discard(key)
                if key in self._pending:  # events arrived while we worked: go again
                    self._queue.put_nowait(key)

    def _retry_later(self, key: Key, reason: str) -> None:
        """Requeue a failed fleet after 1, 2, 4 ... backoff periods, at most the resync period."""
        attempt = self._retries.get(key, 0) + 1
        self._retries[key] = attempt
        delay = min(self.backoff_seconds * 2 ** (attempt - 1), self.resync_seconds)
        if (timer := self._retry_timers.pop(key, None)) is not None:
            timer.cancel()
        log.info("reconcile of %s/%s failed (%s); retry %d in %.0fs", *key, reason, attempt, delay)
        self._retry_timers[key] = asyncio.get_running_loop().call_later(delay, self._retry, key)

    def _retry(self, key: Key) -> None:
        self._retry_timers.pop(key, None)
        if key in self.fleets:
            self.enqueue(key, FULL)

    def _succeeded(self, key: Key) -> None:
        self._retries.pop(key, None)
        if (timer := self._retry_timers.pop(key, None)) is not None:
            timer.cancel()

    # --- watch inputs (called by the kopf handlers) ---------------------------------------------

    def fleet_seen(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        state = self.fleets.get(key)
        if state is None or state.body["metadata"].get("uid") != meta.get("uid"):  # new, or recreated
            self.fleets[key] = FleetState(body=body)
            self.enqueue(key, FULL)
            return
        state.body = body
        if meta.get("generation") != state.reconciled_generation:
            self.enqueue(key, FULL)

    def fleet_gone(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
        if body is not None:
            self._say_claim_retained(body)
        self._succeeded((namespace, name))
        self.fleets.pop((namespace, name), None)
        self.last_status.pop((namespace, name), None)
        self.observed.pop((namespace, name), None)
        self._update_fleet_gauge()

    def _say_claim_retained(self, body: dict[str, Any]) -> None:
        """A deleted fleet whose data claim stays: say so in an Event (the fleet's status is gone)."""
        try:
            fleet = builders.fleet_from_body(body)
        except ValueError:
            return
        if not storage_builders.retains_claim(fleet):
            return
        claim = child_meta.data_claim_name(fleet.name)
        message = (f"PersistentVolumeClaim {fleet.metadata.namespace}/{claim} is kept with the dataset "
                   f"(spec.storage.claimRetention.whenDeleted: Retain); a fleet of the same name uses it "
                   f"again, `kubectl delete pvc {claim} -n {fleet.metadata.namespace}` removes it")
        log.info("%s", message)
        task = asyncio.get_running_loop().create_task(self.event(body, "Normal", "DataClaimRetained", message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def child_seen(self, event: str | None, body: dict[str, Any]) -> None:
        """A watch event of a labelled child (`event` None: the watch's initial listing)."""
        meta = body.get("metadata", {})
        fleet = (meta.get("labels") or {}).get(child_meta.FLEET_LABEL)
        key = (meta.get("namespace", ""), fleet or "")
        kind = body.get("kind", "")
        ident = (meta.get("namespace", ""), kind, meta.get("name", ""))
        if event == "DELETED":
            self.owners.pop(ident, None)
        else:
            self.owners[ident] = controller_uid(meta)
        if kind in STATUS_KINDS and fleet:
            self._observe(key, body, gone=event == "DELETED")
        state = self.fleets.get(key)
        if state is None or state.body["metadata"].get("deletionTimestamp"):
            return
        if event is None:  # listed, not changed: only what it tells about readiness matters
            if kind in STATUS_KINDS:
                self.enqueue(key, STATUS)
            return
        if kind in ("Job", "Pod"):
            self.enqueue(key, STATUS)
            return
        if event == "DELETED":
            log.info("%s %s/%s was deleted; restoring it", kind, key[0], meta.get("name"))
            self.enqueue(key, FULL)
            return
        applied = state.applied.get((kind, meta.get("name", "")))
        if applied is None:
            self.enqueue(key, STATUS)
            return
        rv, generation = applied
        if "generation" in meta and kind not in ("Service", "PersistentVolumeClaim"):
            changed = meta["generation"] != generation  # the spec moved, not only the status
        else:
            changed = meta.get("resourceVersion") != rv
        self.enqueue(key, FULL if changed else STATUS)

    def _observe(self, key: Key, body: dict[str, Any], gone: bool = False) -> None:
        """Remember a Deployment or Job as last seen; never replace a newer version by an older one
        (an apply's answer can be newer than the watch event that follows it)."""
        meta = body.get("metadata", {})
        child = (body.get("kind", ""), meta.get("name", ""))
        if gone:
            children = self.observed.get(key, {})
            if children.get(child, {}).get("metadata", {}).get("uid") == meta.get("uid"):
                del children[child]
                if not children:
                    del self.observed[key]
            return
        children = self.observed.setdefault(key, {})
        known = children.get(child)
        if known is not None and known.get("metadata", {}).get("uid") == meta.get("uid") and \
                resource_version(known) > resource_version(body):
            return
        children[child] = body

    # --- one pass ---------------------------------------------------------------------------------

    async def reconcile(self, key: Key, work: int) -> None:
        kind = "full" if work == FULL else "status"
        started = time.perf_counter()
        state = self.fleets[key]
        body = state.body
        if body["metadata"].get("deletionTimestamp"):
            return
        failures: list[Failure] = []
        fleet: SensorFleet | None = None
        try:
            fleet = builders.fleet_from_body(body)
        except ValidationError as error:
            failures.append(Failure("InvalidSpec", "; ".join(
                f"spec.{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in error.errors())[:800]))
        if fleet is not None and work == FULL:
            failures += await self.applier.apply_all(fleet, state)
            if not failures and state.reconciled_generation != body["metadata"].get("generation"):
                failures += await self.applier.prune(fleet, state)
            state.failures = list(failures)
        # A STATUS pass shows what the last FULL pass failed at (it must not clear Degraded), but
        # counts only its own failures.
        carried = state.failures if fleet is not None and work != FULL else []
        try:
            await self._update_status(key, state, fleet, failures + carried)
        except ApiError as error:
            if error.status != 404:
                failures.append(Failure("StatusFailed", str(error)))
        if fleet is not None and work == FULL and not failures:
            state.reconciled_generation = body["metadata"].get("generation")
        retried = [f for f in failures if f.reason != "InvalidSpec"]  # an invalid spec waits for an edit
        if retried and work == FULL:
            self._retry_later(key, retried[0].reason)
        elif work == FULL:
            self._succeeded(key)
        result = "error" if failures else "success"
        for failure in failures:
            self.metrics.errors.labels(failure.reason).inc()
        self.metrics.reconciles.labels(kind, result).inc()
        self.metrics.duration.labels(kind).observe(time.perf_counter() - started)

    async def _update_status(self, key: Key, state: FleetState, fleet: SensorFleet | None, failures: list[Failure]) -> None:
        body = state.body
        namespace, name = key
        previous = body.get("status") or {}
        generation = body["metadata"].get("generation", 1)
        if fleet is None:
            prev_conditions = {c["type"]: c for c in previous.get("conditions", [])}
            now = _now()
            status = dict(previous)
            status["conditions"] = [
                {"type": t, "status": s, "reason": r, "message": failures[0].message if t != "Progressing" else "spec is invalid",
                 "observedGeneration": generation,
                 "lastTransitionTime": prev_conditions.get(t, {}).get("lastTransitionTime", now)
                 if prev_conditions.get(t, {}).get("status") == s else now}
                for t, s, r in (("Ready", "False", "InvalidSpec"), ("Progressing", "False", "InvalidSpec"), ("Degraded", "True", "InvalidSpec"))
            ]
            status["observedGeneration"] = generation
        else:
            # Only this fleet's Deployments: a same-named fleet deleted just before may still have
            # some waiting for garbage collection. (Jobs belong to the CronJob: by label.)
            uid = body["metadata"].get("uid")
            seen = self.observed.get(key, {})
            deployments = [b for (k, _), b in seen.items() if k == "Deployment" and (uid is None or any(
                ref.get("uid") == uid for ref in b.get("metadata", {}).get("ownerReferences", [])))]
            jobs = [b for (k, _), b in seen.items() if k == "Job"] if fleet.spec.forecasting.enabled else []
            pods_by_job = await self._forecast_pods(state, namespace, jobs)
            status = compute_status(fleet, generation, deployments, jobs, failures, previous, _now(), pods_by_job=pods_by_job)
        await self._events(key, state, previous, status)
        if status != previous:
            patch = dict(status)
            for gone in set(previous) - set(status):
                patch[gone] = None
            if isinstance(previous.get("protocols"), dict):
                patch["protocols"] = {**{p: None for p in previous["protocols"]}, **status.get("protocols", {})}
            live = await self.client.patch_status("SensorFleet", namespace, name, patch)
            state.body = {**state.body, "status": live.get("status", status)}
        self.last_status[key] = status
        self._update_fleet_gauge()

    async def _forecast_pods(self, state: FleetState, namespace: str, jobs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """The pods of the newest finished forecast Job, whose termination message is its outcome.
        Listed once per Job (a finished pod does not change): one LIST per forecast run, not per pass."""
        newest = newest_finished_job(jobs)
        if newest is None:
            return {}
        job = newest[0]
        meta = job["metadata"]
        uid = meta.get("uid") or meta["name"]
        if state.forecast_pods is None or state.forecast_pods[0] != uid:
            try:
                pods = await self.client.list("Pod", namespace, label_selector=f"{JOB_UID_LABEL}={meta.get('uid', '')}")
            except (ApiError, OSError, asyncio.TimeoutError) as error:  # e.g. RBAC without pods: status keeps no headline
                log.warning("could not list the pods of forecast job %s/%s: %s", namespace, meta["name"], error)
                return {}
            state.forecast_pods = (uid, pods)
        return {meta["name"]: state.forecast_pods[1]}

    async def _events(self, key: Key, state: FleetState, previous: dict[str, Any], status: dict[str, Any]) -> None:
        """An Event when a condition changes: Warning for Degraded (with the reason), Normal for Ready."""
        before = {c["type"]: c for c in previous.get("conditions", [])}
        for condition in status.get("conditions", []):
            old = before.get(condition["type"], {})
            if condition["type"] == "Degraded" and condition["status"] == "True" and (
                    old.get("status") != "True" or old.get("reason") != condition["reason"]):
                await self.event(state.body, "Warning", condition["reason"], condition["message"])
            if condition["type"] == "Ready" and condition["status"] == "True" and old.get("status") != "True":
                await self.event(state.body, "Normal", "Ready", condition["message"])

    async def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": reason,
            "message": message[:1000],
            "type": type_,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
            "source": {"component": child_meta.OPERATOR_NAME},
            "reportingComponent": child_meta.OPERATOR_NAME,
        }
        try:
            await self.client.create(event)
        except (ApiError, OSError) as error:
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], error)

    def _update_fleet_gauge(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        for status in self.last_status.values():
            for condition in status.get("conditions", []):
                counts[(condition["type"], condition["status"])] = counts.get((condition["type"], condition["status"]), 0) + 1
        for condition in ("Ready", "Progressing", "Degraded"):
            for value in ("True", "False"):
                self.metrics.fleets.labels(condition, value).set(counts.get((condition, value), 0))

    def ready_fleets(self) -> int:
        return sum(1 for s in self.last_status.values() if ready_condition(s) == "True")

