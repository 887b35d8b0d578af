"""Leader election with a coordination.k8s.io Lease: only the holder runs the controllers.

The same rules as client-go's leaderelection, so two replicas never act at once:

- The Lease is read and written on its own connection (its own KubeClient), never queued behind
  the reconciler's applies, with request timeouts well inside the lease.
- A lease held by another replica is judged expired by watching its record change: when the
  record (holder, renewTime, resourceVersion) last changed is taken from this process's monotonic
  clock, and the lease is free once it has not changed for `leaseDurationSeconds`. A remote
  timestamp is never compared with the local clock (clocks of two machines disagree).
- The holder is leader only until `renew_deadline` after the start of its last successful
  renewal, on its own monotonic clock (`is_leading()`); writes are refused past that instant even
  if the process was frozen (SIGSTOP, a paused VM) and has not noticed yet. renew_deadline <
  lease duration leaves the margin for an apply already on the wire.

A clean shutdown releases the lease so the next holder takes over at once instead of waiting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any

from sensorfleet.operator.kube import ApiError, KubeClient

log = logging.getLogger("sensorfleet.operator.lease")


def _micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderLease:
    def __init__(self, client: KubeClient, namespace: str, name: str, identity: str, duration: float = 15,
                 renew_deadline: float | None = None, retry_period: float | None = None) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew_deadline = renew_deadline if renew_deadline is not None else duration * 2 / 3
        self.retry_period = retry_period if retry_period is not None else duration / 7.5
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError(f"lease timings must satisfy 0 < retry ({self.retry_period}) < renew deadline "
                             f"({self.renew_deadline}) < duration ({self.duration})")
        self._valid_until = 0.0  # monotonic instant until which this replica may act as leader
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0  # monotonic instant at which _observed was first seen

    @property
    def held(self) -> bool:
        return self.is_leading()

    def is_leading(self) -> bool:
        return time.monotonic() < self._valid_until

    def request_timeout(self) -> float:
        """Each Lease call gives up well before the renew deadline (room for a retry)."""
        return max(1.0, self.renew_deadline / 3)

    def _observe(self, lease: dict[str, Any]) -> None:
        spec = lease.get("spec") or {}
        record = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("acquireTime"),
                  lease.get("metadata", {}).get("resourceVersion"))
        if record != self._observed:
            self._observed = record
            self._observed_at = time.monotonic()

    def _free(self, lease: dict[str, Any]) -> bool:
        spec = lease.get("spec") or {}
        if not spec.get("holderIdentity"):
            return True
        duration = spec.get("leaseDurationSeconds") or self.duration
        return time.monotonic() - self._observed_at > duration

    async def try_acquire(self) -> bool:
        """One attempt to take or renew the lease; True when this replica holds it afterwards."""
        started = time.monotonic()  # validity counts from before the request: it may land late
        timeout = self.request_timeout()
        now = _micro_now()
        lease = await self.client.get("Lease", self.namespace, self.name, timeout=timeout)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration),
                         "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
            }
            try:
                created = await self.client.create(body, timeout=timeout)
            except ApiError as error:
                if error.status == 409:
                    return False
                raise
            self._observe(created)
            self._valid_until = started + self.renew_deadline
            return True
        self._observe(lease)
        spec = lease.setdefault("spec", {})
        mine = spec.get("holderIdentity") == self.identity
        if not mine and not self._free(lease):
            self._valid_until = 0.0
            return False
        if not mine:
            spec["leaseTransitions"] = spec.get("leaseTransitions", 0) + 1
            spec["acquireTime"] = now
        spec.update({"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration), "renewTime": now})
        try:
            written = await self.client.replace(lease, timeout=timeout)  # resourceVersion: a concurrent writer gets 409
        except ApiError as error:
            if error.status == 409:
                self._valid_until = 0.0
                return False
            raise
        self._observe(written)
        self._valid_until = started + self.renew_deadline
        return True

    async def acquire(self) -> None:
        """Block until this replica holds the lease."""
        announced = False
        while not await self._attempt():
            if not announced:
                log.info("lease %s/%s is held by another replica; standing by", self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.retry_period)
        log.info("acquired lease %s/%s as %s", self.namespace, self.name, self.identity)

    async def _attempt(self) -> bool:
        try:
            return await self.try_acquire()
        except (ApiError, OSError, asyncio.TimeoutError) as error:
            log.warning("lease attempt failed: %s", error)
            return False

    async def keep(self) -> None:
        """Renew every retry period; return once leadership is lost (not renewed by the deadline,
        or another replica holds the lease)."""
        while True:
            remaining = self._valid_until - time.monotonic()
            await asyncio.sleep(max(0.0, min(self.retry_period, remaining)))
            if not self.is_leading():
                break
            renewed = await self._attempt()
            if not renewed and (self._valid_until == 0.0 or not self.is_leading()):
                break
        self._valid_until = 0.0
        log.error("lost lease %s/%s", self.namespace, self.name)

    async def release(self) -> None:
        if not self.is_leading():
            return
        self._valid_until = 0.0
        try:
            timeout = self.request_timeout()
            lease = await self.client.get("Lease", self.namespace, self.name, timeout=timeout)
            if lease and lease.get("spec", {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = None
                lease["spec"]["renewTime"] = None
                await self.client.replace(lease, timeout=timeout)
        except (ApiError, OSError, asyncio.TimeoutError) as error:
            log.warning("could not release the lease: %s", error)
