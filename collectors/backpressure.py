"""Backpressure between a collector's intake and its dataset store.

    network loop -> intake -> CollectorSink (validate, de-duplicate) -> StorageWriter -> Parquet
                                   \\___ bounded: current batch + batches waiting to be written

A full disk or an unreachable object store must not make a collector grow until it is killed for
memory. The sink hands each finished batch to the `StorageWriter`, whose one thread writes batches
in order and retries a failed write with exponential back-off (tenacity), never blocking the
thread that takes readings in. Readings waiting to be written (the open batch and the queued ones)
are bounded by `spec.storage.maxBufferedReadings`; when the bound is reached the protocol decides
what backpressure means (see docs/storage.md, "When the store is full or down"):

- MQTT stops taking messages and acknowledges none it has not written: the broker keeps them
  (QoS 1, persistent session), so nothing is lost while the broker's queue holds;
- CoAP and OPC UA readings beyond the bound are dropped and counted as lost with reason
  `storage_unavailable` (`sensorfleet_readings_lost_total` and
  `sensorfleet_readings_unstored_total{reason="storage_unavailable"}`).

While writes fail, `sensorfleet_storage_degraded` is 1, `/readyz` answers 503 with the cause and
the log names the path or endpoint and the errno once per change of cause (then once a minute).
"""

from __future__ import annotations

import collections
import errno as errno_codes
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential, wait_random

from sensorfleet.dataset import DatasetWriter, ReadingBatch
from sensorfleet.metrics import WRITE_FAILURE_REASONS, FleetMetrics

log = logging.getLogger("sensorfleet.collectors.storage")

# Reasons of a failed write (a fixed set: they are label values).
NO_SPACE, READ_ONLY, PERMISSION, UNREACHABLE, IO_ERROR, OTHER = "no_space", "read_only", "permission_denied", "unreachable", "io_error", "other"
assert set(WRITE_FAILURE_REASONS) == {NO_SPACE, READ_ONLY, PERMISSION, UNREACHABLE, IO_ERROR, OTHER}
_REASON_BY_ERRNO = {
    errno_codes.ENOSPC: NO_SPACE, errno_codes.EDQUOT: NO_SPACE, errno_codes.EFBIG: NO_SPACE,
    errno_codes.EROFS: READ_ONLY,
    errno_codes.EACCES: PERMISSION, errno_codes.EPERM: PERMISSION,
    errno_codes.ECONNREFUSED: UNREACHABLE, errno_codes.ECONNRESET: UNREACHABLE, errno_codes.ECONNABORTED: UNREACHABLE,
    errno_codes.EHOSTUNREACH: UNREACHABLE, errno_codes.ENETUNREACH: UNREACHABLE, errno_codes.ETIMEDOUT: UNREACHABLE,
    errno_codes.EPIPE: UNREACHABLE,
}
# Exceptions of the S3 stack that mean "could not reach the endpoint" and carry no errno.
_UNREACHABLE_TYPES = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                      "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "TimeoutError")
REMIND_EVERY = 60.0  # seconds between log lines while the cause stays the same
CLOSE_GRACE = 10.0  # seconds a stopping collector keeps retrying before it gives up on its buffer


@dataclass(frozen=True)
class WriteFailure:
    reason: str  # one of WRITE_FAILURE_REASONS
    errno_name: str | None  # "ENOSPC", "ECONNREFUSED", ...
    message: str  # for users: what, where, errno

    @classmethod
    def of(cls, exc: BaseException, where: str) -> WriteFailure:
        """Classify `exc` (following its cause chain) and say what failed `where`."""
        found: OSError | None = None
        type_names: list[str] = []
        seen: set[int] = set()
        todo: list[BaseException | None] = [exc]
        while todo:
            current = todo.pop(0)
            if current is None or id(current) in seen:
                continue
            seen.add(id(current))
            type_names.append(type(current).__name__)
            if found is None and isinstance(current, OSError) and isinstance(current.errno, int) and current.errno in errno_codes.errorcode:
                found = current
            todo += [current.__cause__, current.__context__, getattr(current, "os_error", None)]
        if found is not None:
            code = found.errno
            name = errno_codes.errorcode[code]
            reason = _REASON_BY_ERRNO.get(code, IO_ERROR)
            detail = f"[Errno {code}] {os.strerror(code)} ({name})"
        else:
            name = None
            reason = UNREACHABLE if any(t in _UNREACHABLE_TYPES for t in type_names) else OTHER
            detail = f"{type(exc).__name__}"
        # The file or object being written (DatasetWriter notes it), then what the library said
        # unless that is only the errno again.
        notes = [n.removeprefix("while ") for n in getattr(exc, "__notes__", []) if n.startswith("while writing ")]
        text = str(exc).strip()
        said = "" if found is exc and os.strerror(found.errno) in text else f": {text[:300]}" if text else ""
        message = f"cannot write to {where}{' (' + notes[0] + ')' if notes else ''}: {detail}{said}"
        return cls(reason, name, message)


class StorageHealth:
    """Whether the last write succeeded, and if not why and since when (thread-safe)."""

    def __init__(self, metrics: FleetMetrics):
        self.metrics = metrics
        self.failure: WriteFailure | None = None
        self.since: float | None = None  # time.time() of the first failure in a row
        self.failures = 0
        self._logged: tuple[tuple[str, str | None], float] | None = None  # ((reason, errno), when)
        metrics.storage_degraded.set(0)

    @property
    def degraded(self) -> bool:
        return self.failure is not None

    def failed(self, failure: WriteFailure, buffered: int, limit: int, retry_in: float) -> None:
        self.metrics.write_failures(failure.reason).inc()
        self.metrics.error("write_failed").inc()
        self.metrics.storage_degraded.set(1)
        self.failures += 1
        if self.failure is None:
            self.since = time.time()
        self.failure = failure
        now = time.monotonic()
        cause = (failure.reason, failure.errno_name)  # not the message: it names a new file each try
        if self._logged is None or self._logged[0] != cause or now - self._logged[1] >= REMIND_EVERY:
            self._logged = (cause, now)
            log.error("%s; %d readings buffered (limit %d, spec.storage.maxBufferedReadings), retrying in %.1f s (failed %d time(s) since %s)",
                      failure.message, buffered, limit, retry_in, self.failures, time.strftime("%H:%M:%S", time.gmtime(self.since or 0)))

    def recovered(self, written: int) -> None:
        if self.failure is None:
            return
        log.warning("the dataset store is writable again after %.0f s and %d failed attempt(s); writing the %d buffered readings",
                    time.time() - (self.since or time.time()), self.failures, written)
        self.failure, self.since, self.failures, self._logged = None, None, 0, None
        self.metrics.storage_degraded.set(0)

    def report(self) -> dict[str, object]:
        """What /readyz says."""
        failure = self.failure
        if failure is None:
            return {"storage": "ok"}
        return {"storage": "degraded", "reason": failure.reason, "errno": failure.errno_name, "message": failure.message,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since or 0)), "failedWrites": self.failures}


OnWritten = Callable[[], None]


class StorageWriter:
    """One thread that writes sealed batches in order, retrying with back-off while the store fails.

    `submit` never blocks. `record(batch, seconds)` runs after each successful write (metrics,
    totals), then every `on_written` callback of the batches it held (MQTT acknowledges then)."""

    def __init__(self, writer: DatasetWriter, metrics: FleetMetrics, limit: int, record: Callable[[ReadingBatch, float], None],
                 merge_up_to: int = 5000, where: str | None = None):
        self.writer = writer
        self.limit = limit
        self.record = record
        self.merge_up_to = merge_up_to
        self.where = where or describe_store(writer.url)
        self.health = StorageHealth(metrics)
        self.metrics = metrics
        self._queue: collections.deque[tuple[ReadingBatch, OnWritten | None]] = collections.deque()
        self._queued = 0  # readings in the queue and in the write under way
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._give_up = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._run, name=f"{self.writer.protocol}-storage", daemon=True)
        self._thread.start()
        return self._thread

    def submit(self, batch: ReadingBatch, on_written: OnWritten | None = None) -> None:
        with self._cond:
            self._queue.append((batch, on_written))
            self._queued += len(batch)
            self._cond.notify()

    def close(self, grace: float = CLOSE_GRACE) -> int:
        """Write what is queued (retrying for at most `grace` seconds more); returns the readings
        that could not be written."""
        self._closing.set()
        with self._cond:
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(grace)
            self._give_up.set()
            self._thread.join(30)
        return self._queued

    # --- the storage thread ---------------------------------------------------------------------
    def _next(self) -> tuple[ReadingBatch, list[OnWritten]] | None:
        """The queued batches merged, up to `merge_up_to` readings (fewer, larger files after an
        outage); None when closing and nothing is left."""
        with self._cond:
            while not self._queue:
                if self._closing.is_set():
                    return None
                self._cond.wait(0.5)
            batch, callback = self._queue.popleft()
            callbacks = [callback] if callback else []
            while self._queue and len(batch) + len(self._queue[0][0]) <= self.merge_up_to:
                more, callback = self._queue.popleft()
                batch = batch.merged(more)
                if callback:
                    callbacks.append(callback)
            return batch, callbacks

    def _run(self) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential(multiplier=0.25, max=10.0) + wait_random(0, 0.25),
            stop=stop_when_event_set(self._give_up),
            sleep=lambda seconds: self._give_up.wait(seconds) and None,
            before_sleep=self._failed,
            reraise=True,
        )
        while True:
            item = self._next()
            if item is None:
                return
            batch, callbacks = item
            if len(batch):  # an empty one only carries callbacks: run once everything before is written
                try:
                    started = time.perf_counter()
                    retrying(self.writer.write, batch)
                except Exception:  # noqa: BLE001 -- gave up at shutdown; close() reports what is left
                    with self._cond:
                        self._queue.appendleft((batch, None))
                    return
                elapsed = time.perf_counter() - started
                self.health.recovered(self._queued)
                with self._cond:
                    self._queued -= len(batch)
                self.record(batch, elapsed)
            for callback in callbacks:
                callback()

    def _failed(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None:
            return
        retry_in = state.next_action.sleep if state.next_action else 0.0
        self.health.failed(WriteFailure.of(exc, self.where), self._queued, self.limit, retry_in)


def describe_store(url: str) -> str:
    """Where a dataset lives, for messages: the path, or the URL and the S3 endpoint."""
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        return f"{url} (endpoint {endpoint})"
    return url
