"""What every collector does once a payload has arrived, whatever the protocol:
validate -> de-duplicate -> account for gaps -> batch -> write to the dataset -> metrics.

Protocol adapters (mqtt.py, coap.py, opcua.py) only receive payloads and call `CollectorSink`.
"""

from __future__ import annotations

import collections
import logging
import operator
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd

from sensorfleet.collectors.backpressure import StorageWriter
from sensorfleet.dataset import DatasetWriter, ReadingBatch, columns_table, read_dataset
from sensorfleet.internals import histogram_observe_many
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import DecodedPayload, Reading, ReadingColumns, readings_from_documents

log = logging.getLogger(__name__)

# Readings held in memory by default while the store fails (spec.storage.maxBufferedReadings).
DEFAULT_BUFFER_LIMIT = 100_000

# Seqs remembered per series as "counted lost, may still arrive"; beyond this a gap is final.
MAX_PENDING_GAP = 4096


@dataclass
class _SeriesState:
    last: int
    pending: set[int] = field(default_factory=set)
    resumed: bool = False  # `last` came from the dataset, not from this process
    # Seqs below `last` the dataset does not hold (another replica's session still has them,
    # e.g. after a scale-down): new when they come, neither lost nor late.
    holes: set[int] = field(default_factory=set)
    # The seqs counted offline at the first reading after a resume ([lo, hi)), and those of them
    # that arrived after all.
    offline_range: tuple[int, int] | None = None
    offline_arrived: set[int] = field(default_factory=set)


@dataclass
class SeqVerdict:
    new: bool
    lost: int = 0  # newly counted lost (gap)
    late: int = 0  # previously counted lost, now arrived
    offline: int = 0  # skipped across a restart: never produced while the fleet was stopped


class SequenceTracker:
    """Per (device, sensor) sequence accounting: duplicates, gaps (lost) and late arrivals.

    The first seq seen for a series is its baseline; any later jump counts the skipped seqs as
    lost. A skipped seq that shows up afterwards is stored and un-counts its loss (`late`).
    A series resumed from the dataset is different: the jump from its last stored seq to the first
    one received spans the time no collector ran. With a persistent MQTT session the broker
    redelivers what was published meanwhile, so what is still missing was never produced (the
    fleet was stopped too), and it is counted `offline`, not lost.
    """

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], _SeriesState] = {}

    def __len__(self) -> int:
        return len(self._series)

    def seed(self, device: str, sensor: str, last_seq: int, holes: Iterable[int] = ()) -> None:
        """Start from what the dataset already holds (a restarted collector): its last seq of the
        series and the seqs below it that it lacks."""
        state = self._series.get((device, sensor))
        if state is None or state.last < last_seq:
            self._series[(device, sensor)] = _SeriesState(last_seq, resumed=True, holes=set(holes))

    def advance_if_consecutive(self, devices: list[str], sensors: list[str], seqs: list[int]) -> bool:
        """`observe` for a whole message when it has nothing to count: if every series' seqs go
        on one by one from where it left off (or start a new series), record them and return
        True, the state `observe` would leave; otherwise change nothing and return False."""
        series = self._series
        keys = list(zip(devices, sensors))
        states = list(map(series.get, keys))
        if all(states) and len(set(keys)) == len(keys):
            # The usual gateway message: known series, one reading each. map() runs in C.
            if list(map(operator.sub, seqs, map(_LAST, states))).count(1) != len(keys):
                return False
            for state, seq in zip(states, seqs):
                state.last = seq
                state.resumed = False
            return True
        ahead: dict[tuple[str, str], int] = {}
        for key, seq in zip(keys, seqs):
            previous = ahead.get(key)
            if previous is None:
                state = series.get(key)
                if state is not None and seq != state.last + 1:
                    return False
            elif seq != previous + 1:
                return False
            ahead[key] = seq
        for key, seq in ahead.items():
            state = series.get(key)
            if state is None:
                series[key] = _SeriesState(seq)
            else:
                state.last = seq
                state.resumed = False
        return True

    def observe(self, device: str, sensor: str, seq: int) -> SeqVerdict:
        key = (device, sensor)
        state = self._series.get(key)
        if state is None:
            self._series[key] = _SeriesState(seq)
            return SeqVerdict(True)
        if seq == state.last + 1:
            state.last = seq
            state.resumed = False
            return SeqVerdict(True)
        if seq > state.last and state.resumed:
            offline = seq - state.last - 1
            # Kept open: after a scale-down the session of a removed replica may still hold some
            # of them; one that comes is stored and taken back from `offline`.
            state.offline_range = (state.last + 1, seq)
            state.last = seq
            state.resumed = False
            return SeqVerdict(True, offline=offline)
        if seq > state.last:
            gap = seq - state.last - 1
            if gap <= MAX_PENDING_GAP:
                state.pending.update(range(state.last + 1, seq))
            state.last = seq
            return SeqVerdict(True, lost=gap)
        if seq in state.pending:
            state.pending.discard(seq)
            return SeqVerdict(True, late=1)
        if seq in state.holes:
            state.holes.discard(seq)
            return SeqVerdict(True)
        if state.offline_range and state.offline_range[0] <= seq < state.offline_range[1] and seq not in state.offline_arrived:
            state.offline_arrived.add(seq)  # grows only with what arrives
            return SeqVerdict(True, offline=-1)
        return SeqVerdict(False)


_LAST = operator.attrgetter("last")


# Slack of the (ts, seq) consistency check, in ticks: microsecond timestamps at a 1 ms interval.
_SEQUENCE_SPACE_TOLERANCE = 0.01
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class SequenceSpace:
    """Where seqs lie in time: a device's tick k is taken at epoch + (k + phase) * interval with
    0 <= phase < 1 (README, "The signal model"). Stored rows outside it were written under another
    `spec.epoch` or `interval`; their seqs say nothing about the ones that arrive now."""

    epoch: datetime
    interval: float

    @classmethod
    def of(cls, spec: object, protocol: str) -> SequenceSpace | None:
        """The space of a fleet spec's protocol; None for a replayed recording (its seqs count rows)."""
        if getattr(spec, "replay", None) is not None:
            return None
        return cls(spec.epoch, spec.protocol(protocol).interval)  # type: ignore[attr-defined]

    def holds(self, ts: pd.Series, seq: pd.Series) -> pd.Series:
        ticks = (pd.to_datetime(ts, utc=True) - pd.Timestamp(self.epoch)).dt.total_seconds() / self.interval
        offset = ticks - seq.astype("float64")
        return (offset > -_SEQUENCE_SPACE_TOLERANCE) & (offset < 1 + _SEQUENCE_SPACE_TOLERANCE)

    def holds_one(self, ts: datetime, seq: int) -> bool:
        """`holds` for one reading."""
        offset = (ts - self.epoch).total_seconds() / self.interval - seq
        return -_SEQUENCE_SPACE_TOLERANCE < offset < 1 + _SEQUENCE_SPACE_TOLERANCE

    def holds_all(self, ts: Any, seq: list[int]) -> bool:
        """`holds_one` for every reading of a message (an Arrow array of UTC timestamps), with
        the same float arithmetic; False also where it might round otherwise (beyond 2**53 us)."""
        micros = ts.cast("int64").to_numpy() - (self.epoch - _UNIX_EPOCH) // _MICROSECOND
        if len(micros) and np.abs(micros).max() >= 2**53:
            return False
        offset = micros / 1e6 / self.interval - np.asarray(seq, dtype=np.float64)
        return bool(((offset > -_SEQUENCE_SPACE_TOLERANCE) & (offset < 1 + _SEQUENCE_SPACE_TOLERANCE)).all())


def _holes_below_last(df: pd.DataFrame) -> dict[tuple[str, str], list[int]]:
    """Per series, the seqs missing between stored ones, within MAX_PENDING_GAP of the last."""
    ordered = df[["device", "sensor", "seq"]].astype({"device": str, "sensor": str}).sort_values(["device", "sensor", "seq"])
    seq = ordered["seq"].to_numpy()
    same = (ordered["device"].to_numpy()[1:] == ordered["device"].to_numpy()[:-1]) & (ordered["sensor"].to_numpy()[1:] == ordered["sensor"].to_numpy()[:-1])
    last = ordered.groupby(["device", "sensor"])["seq"].transform("max").to_numpy()
    holes: dict[tuple[str, str], list[int]] = {}
    for i in (same & (seq[1:] - seq[:-1] > 1) & (last[1:] - seq[1:] < MAX_PENDING_GAP)).nonzero()[0]:
        key = (ordered["device"].iat[i], ordered["sensor"].iat[i])
        holes.setdefault(key, []).extend(range(max(int(seq[i]) + 1, int(last[i]) - MAX_PENDING_GAP), int(seq[i + 1])))
    return holes


class CollectorSink:
    """Thread-safe: adapters may call `accept_*` from a network thread and `flush` from a timer.

    After `start_storage_thread()` a flush only hands the batch to the `StorageWriter`, which
    writes it (retrying while the store fails); readings waiting to be written are bounded by
    `buffer_limit` (see collectors/backpressure.py). Without it, `flush` writes synchronously."""

    def __init__(
        self,
        fleet: str,
        protocol: str,
        data_url: str,
        metrics: FleetMetrics,
        batch_size: int = 5000,
        flush_interval: float = 2.0,
        writer_id: str | None = None,
        count_gaps: bool = True,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        redelivered: bool = False,
    ):
        self.fleet = fleet
        self.protocol = protocol
        self.metrics = metrics
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.count_gaps = count_gaps
        self.writer = DatasetWriter(data_url, protocol, writer_id)
        self.tracker = SequenceTracker()
        # The sequence space of this collector's spec (set by resume_from_dataset). During a
        # rollout after an edit of seed, epoch or interval, readings of the other spec still
        # arrive (the old simulator's last ones, queued in the broker session this collector took
        # over, or the new simulator's while the old collector runs). Their seqs count elsewhere:
        # in this tracker one old-space reading would make every new-space one look duplicate.
        self.space: SequenceSpace | None = None
        self.other_space = SequenceTracker()  # de-duplicates them; their gaps are not this spec's
        self._batch = ReadingBatch(protocol)
        self._batch_started = time.monotonic()
        self._lock = threading.RLock()
        self._logged_kinds: set[str] = set()
        self.malformed_by_reason: collections.Counter[str] = collections.Counter()
        self.totals = {"received": 0, "stored": 0, "lost": 0, "duplicates": 0, "malformed": 0, "late": 0, "offline": 0,
                       # readings of third-party devices (no seq), and those of them with quality bad
                       "unsequenced": 0, "bad_quality": 0,
                       # readings of another seed/epoch/interval, during a rollout (see `space`)
                       "other_space": 0}
        self.buffer_limit = buffer_limit
        # True when the sender keeps what is not acknowledged (MQTT QoS 1): nothing is dropped at
        # the bound (the adapter stops taking messages), nothing unwritten at exit is lost.
        self.redelivered = redelivered
        self.storage: StorageWriter | None = None
        metrics.buffer_limit.set(buffer_limit)

    def start_storage_thread(self) -> StorageWriter:
        """Write batches in a thread of their own from now on (bounded buffer, retries)."""
        self.storage = StorageWriter(self.writer, self.metrics, self.buffer_limit, self._record_written, merge_up_to=self.batch_size)
        # Vital: a collector whose storage thread died would buffer until its bound, then stall.
        self.metrics.watch(self.storage.start())
        self.metrics.readiness = self.storage.health.report  # /readyz: 503 while writes fail
        return self.storage

    def buffered(self) -> int:
        """Readings accepted and not yet written."""
        return len(self._batch) + (self.storage.queued if self.storage else 0)

    def full(self) -> bool:
        """At the bound: MQTT takes no more messages, CoAP/OPC UA drop what comes (counted lost)."""
        return self.buffered() >= self.buffer_limit

    def wait_for_room(self, stop: threading.Event, poll: float = 0.05) -> bool:
        """Block while the buffer is full (MQTT's backpressure); False if `stop` was set first."""
        while self.full():
            if stop.wait(poll):
                return False
        return True

    def close(self) -> int:
        """Seal the open batch, write what is buffered (retrying briefly while the store fails)
        and stop the storage thread. Returns the readings that could not be written; unless the
        sender redelivers them (MQTT), they are counted lost (`storage_unavailable`)."""
        if self.storage is None:
            return 0
        self.flush()
        left = self.storage.close()
        if left:
            if self.redelivered:
                log.error("stopping with %d readings not written (the store is still failing); the broker redelivers them to the next collector", left)
            else:
                log.error("stopping with %d readings not written (the store is still failing); counted as lost (storage_unavailable)", left)
                self._count_unstored(left)
        self.metrics.buffered.set(self.buffered())
        return left

    def _count_unstored(self, n: int, reason: str = "storage_unavailable") -> None:
        """Readings received and given up without storing them: lost, and why."""
        with self._lock:
            self.metrics.lost.inc(n)
            self.metrics.unstored(reason).inc(n)
            self.totals["lost"] += n

    # --- start-up -------------------------------------------------------------------------------
    def resume_from_dataset(self, days: int = 2, space: SequenceSpace | None = None) -> int:
        """Seed the tracker with the last stored seq of each series, so a restarted collector
        neither stores again what it already wrote nor counts the restart as a gap. With `space`,
        only rows of that sequence space count: after an edit of epoch or interval the new seqs
        start elsewhere, and old ones would make them look like duplicates or a gap."""
        self.space = space
        since = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        since = since.fromtimestamp(since.timestamp() - (days - 1) * 86400, tz=timezone.utc)
        columns = ["fleet", "device", "sensor", "seq"] + (["ts"] if space is not None else [])
        df = read_dataset(self.writer.url, columns=columns, start=since, protocols=[self.protocol])
        # Third-party readings (seq null) of the same protocol share the partition: not a series to resume.
        df = df[(df["fleet"] == self.fleet) & df["seq"].notna()]
        if space is not None and not df.empty:
            df = df[space.holds(df["ts"], df["seq"])]
        if df.empty:
            return 0
        last = df.groupby(["device", "sensor"], observed=True)["seq"].max()
        holes = _holes_below_last(df)
        with self._lock:
            for (device, sensor), seq in last.items():
                self.tracker.seed(device, sensor, int(seq), holes.get((device, sensor), ()))
        return len(last)

    def skip_to(self, device: str, sensor: str, last_seq: int) -> None:
        """Move a series on to `last_seq` without counting the seqs in between lost: a device that
        said it went silent (Sparkplug DDEATH) and came back sent nothing for them."""
        with self._lock:
            self.tracker.seed(device, sensor, last_seq)

    # --- intake ---------------------------------------------------------------------------------
    def reject(self, kind: str, detail: str) -> None:
        self.metrics.malformed(kind).inc()
        self.totals["malformed"] += 1
        self.malformed_by_reason[kind] += 1
        if kind not in self._logged_kinds:  # once per kind: a flood of bad payloads must not flood the log
            self._logged_kinds.add(kind)
            log.warning("skipping malformed %s payload (%s): %s; further ones of this kind are only counted", self.protocol, kind, detail)

    def accept_decoded(self, decoded: DecodedPayload, received_at: datetime | None = None, where: str = "") -> int:
        """Count every refused document by its reason and accept the valid readings; returns how
        many were new. `where` (e.g. the topic) prefixes the logged detail."""
        for exc in decoded.rejected:
            self.reject(exc.kind, f"{where}{exc}")
        received_at = received_at or datetime.now(timezone.utc)
        return sum(self.accept(reading, received_at) for reading in decoded.readings)

    def accept_documents(self, documents: Iterable[object], received_at: datetime | None = None) -> int:
        """Validate already-decoded wire documents and accept the valid ones."""
        return self.accept_decoded(readings_from_documents(list(documents)), received_at)

    def accept_columns(self, columns: ReadingColumns, received_at: datetime) -> bool:
        """Accept a whole decoded message at once when `accept` would take each of its readings
        with nothing to count: all of this fleet and protocol, every series continuing where it
        left off, room for all. Otherwise take nothing and return False: the caller gives the
        message to `accept_decoded`, which counts each reading's verdict exactly."""
        n = len(columns)
        if columns.fleet.count(self.fleet) != n or columns.protocol.count(self.protocol) != n:
            return False
        table = columns_table(columns, received_at)
        if table is None:
            return False
        with self._lock:
            if not self.redelivered and self.buffered() + n > self.buffer_limit:
                return False  # `accept` stores what fits and counts the rest lost
            if self.space is not None and not self.space.holds_all(table["ts"], columns.seq):
                return False  # readings of another spec, during a rollout (`_accept_other_space`)
            if not self.tracker.advance_if_consecutive(columns.device, columns.sensor, columns.seq):
                return False
            self.metrics.received.inc(n)
            self.totals["received"] += n
            if not len(self._batch):
                self._batch_started = time.monotonic()
            self._batch.add_table(table)
            return True

    def accept(self, reading: Reading, received_at: datetime) -> bool:
        if reading.fleet != self.fleet or reading.protocol != self.protocol:
            self.reject("foreign_fleet", f"reading of fleet {reading.fleet!r}/{reading.protocol!r} reached the {self.fleet!r}/{self.protocol!r} collector")
            return False
        with self._lock:
            self.metrics.received.inc()
            self.totals["received"] += 1
            if reading.seq is None:
                return self._accept_unsequenced(reading, received_at)
            if self.space is not None and not self.space.holds_one(reading.ts, reading.seq):
                return self._accept_other_space(reading, received_at)
            verdict = self.tracker.observe(reading.device, reading.sensor, reading.seq)
            if not verdict.new:
                self.metrics.duplicates.inc()
                self.totals["duplicates"] += 1
                return False
            if self.count_gaps and verdict.lost:
                self.metrics.lost.inc(verdict.lost)
                self.totals["lost"] += verdict.lost
            if self.count_gaps and verdict.late:
                # Counters never go down: the late counter lets PromQL subtract it (lost - late).
                self.metrics.late.inc(verdict.late)
                self.totals["lost"] -= verdict.late
                self.totals["late"] += verdict.late
            if self.count_gaps and verdict.offline > 0:
                self.metrics.offline.inc(verdict.offline)
                self.totals["offline"] += verdict.offline
            elif self.count_gaps and verdict.offline < 0:
                # Counted offline, arrived after all (a removed replica's session held it): the
                # summary takes it back; the counter cannot go down (offline_late_total).
                self.metrics.offline_late.inc(-verdict.offline)
                self.totals["offline"] += verdict.offline
            if not self.redelivered and self.full():
                # Observed (a later reading is no gap) but not stored: lost, and counted as such.
                self._count_unstored(1)
                return False
            if not len(self._batch):
                self._batch_started = time.monotonic()
            self._batch.add(reading, received_at)
            return True

    def _accept_unsequenced(self, reading: Reading, received_at: datetime) -> bool:
        """A third-party device's reading (no seq): nothing to de-duplicate or to count as a gap;
        it is counted, and stored unless the buffer is at its bound (then counted lost)."""
        self.totals["unsequenced"] += 1
        if reading.quality == "bad":
            self.totals["bad_quality"] += 1
        if not self.redelivered and self.full():
            self._count_unstored(1)
            return False
        if not len(self._batch):
            self._batch_started = time.monotonic()
        self._batch.add(reading, received_at)
        return True

    def _accept_other_space(self, reading: Reading, received_at: datetime) -> bool:
        """A reading of another sequence space (see `space`): stored once, not counted for loss."""
        if not self.other_space.observe(reading.device, reading.sensor, reading.seq).new:
            self.metrics.duplicates.inc()
            self.totals["duplicates"] += 1
            return False
        self.metrics.other_space.inc()
        self.totals["other_space"] += 1
        if not self.redelivered and self.full():
            self._count_unstored(1)
            return False
        if not len(self._batch):
            self._batch_started = time.monotonic()
        self._batch.add(reading, received_at)
        return True

    def summary(self) -> dict[str, object]:
        """The final counts, as the `SUMMARY {json}` line a collector logs when it stops."""
        return {"component": "collector", "protocol": self.protocol, **self.totals, "malformed_by_reason": dict(self.malformed_by_reason)}

    # --- output ---------------------------------------------------------------------------------
    def pending(self) -> int:
        return len(self._batch)

    def due(self) -> bool:
        n = len(self._batch)
        return n >= self.batch_size or (n > 0 and time.monotonic() - self._batch_started >= self.flush_interval)

    def update_lag(self) -> None:
        oldest = self._batch.oldest_ts() if len(self._batch) else None
        self.metrics.batch_lag.set(max(0.0, time.time() - oldest.timestamp()) if oldest else 0.0)
        self.metrics.buffered.set(self.buffered())

    def flush(self, on_written: Callable[[], None] | None = None) -> int:
        """Write the current batch (if any); `on_written` runs once it is stored. Returns its size.
        With the storage thread: hands the batch over and returns at once. Without: writes it
        here and raises if the write fails, keeping the batch so nothing is lost."""
        with self._lock:
            batch = self._batch
            if not len(batch):
                if on_written is not None:
                    self.when_written(on_written)
                return 0
            if self.storage is not None:
                self._batch = ReadingBatch(self.protocol)
                self.storage.submit(batch, on_written)
                return len(batch)
            started = time.perf_counter()
            try:
                self.writer.write(batch)
            except Exception:
                self.metrics.error("write_failed").inc()
                raise
            self._batch = ReadingBatch(self.protocol)
            self._record_written(batch, time.perf_counter() - started)
        if on_written is not None:
            on_written()
        return len(batch)

    def when_written(self, callback: Callable[[], None]) -> None:
        """Run `callback` once every batch handed over so far is written (now, if none waits).
        MQTT acknowledges a message whose readings were all duplicates this way: the first copy
        may still wait in the storage queue, and an acknowledgement before it is written would
        lose it if the collector died meanwhile."""
        if self.storage is None or not self.storage.queued:
            callback()
        else:
            self.storage.submit(ReadingBatch(self.protocol), callback)

    def _record_written(self, batch: ReadingBatch, elapsed: float) -> None:
        with self._lock:
            stored_at = time.time()
            n = len(batch)
            self.metrics.batch_write_seconds.observe(elapsed)
            self.metrics.batches.inc()
            self.metrics.stored.inc(n)
            self.metrics.last_activity.set(stored_at)
            self.totals["stored"] += n
            # One vectorised update, not one observe() per reading (~2 µs each on the hot path).
            histogram_observe_many(self.metrics.latency, stored_at - batch.ts_seconds())
            self.metrics.batch_lag.set(0.0)
            self.metrics.buffered.set(self.buffered())


def drain_into_sink(sink: CollectorSink, intake: collections.deque, done: threading.Event, handle: Callable[[object], None], flush_check_every: int = 2000, flush: Callable[[], object] | None = None) -> None:
    """The intake thread of a collector whose network loop must never wait on Parquet writes:
    pop what the loop appended to `intake`, `handle` each item into `sink`, flush when due,
    until `done` is set and everything is written. With the sink's storage thread started a
    flush never blocks (the storage thread retries); without, a failed write keeps the batch
    and this loop retries. `flush` replaces `sink.flush` (MQTT hands the batch's acknowledgements
    over with it, sent once it is written)."""
    while True:
        finished = done.is_set()
        n = 0
        while intake:
            handle(intake.popleft())
            n += 1
            if n % flush_check_every == 0 and sink.due():
                _flush_retrying(sink, flush)
        if sink.due() or (finished and sink.pending()):
            _flush_retrying(sink, flush)
        sink.update_lag()
        if finished and not intake and not sink.pending():
            sink.close()
            return
        if not n:
            time.sleep(0.02)


def _flush_retrying(sink: CollectorSink, flush: Callable[[], object] | None = None) -> None:
    try:
        (flush or sink.flush)()
    except Exception as exc:  # the batch is kept; the next round retries
        log.error("writing a batch failed (%s); retrying", exc)
        time.sleep(1.0)
