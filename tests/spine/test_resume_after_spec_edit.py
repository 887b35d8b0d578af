"""A collector restarted after an edit of `epoch` or `interval` (the operator restarts it) resumes
only from stored rows of the new sequence space: the new readings are stored, not dropped as
duplicates nor counted as a gap. Real CollectorSink, real Parquet dataset."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sensorfleet.collectors.base import CollectorSink, SequenceSpace
from sensorfleet.dataset import read_dataset
from sensorfleet.metrics import FleetMetrics
from sensorfleet.signals import SignalModel
from sensorfleet.spec import FleetSpec

DEVICES = np.arange(3)


def spec(**fields: Any) -> FleetSpec:
    base: dict[str, Any] = {"protocols": {"mqtt": {"devices": len(DEVICES), "interval": 1.0}}}
    base.update(fields)
    return FleetSpec.model_validate(base)


def collect(fleet_spec: FleetSpec, data: Path, ticks_back: int, at: float) -> CollectorSink:
    """A collector's sink that resumes from the dataset, then receives the `ticks_back` ticks up to `at`."""
    sink = CollectorSink("demo", "mqtt", str(data), FleetMetrics("demo", "mqtt", "collector"))
    sink.resume_from_dataset(space=SequenceSpace.of(fleet_spec, "mqtt"))
    model = SignalModel(fleet_spec, "demo", "mqtt")
    now = model.current_tick(DEVICES, at)
    for back in range(ticks_back, 0, -1):
        block = model.block(DEVICES, now - back + 1)
        for reading in model.readings(block):
            sink.accept(reading, datetime.now(timezone.utc))
    sink.flush()
    return sink


@pytest.mark.parametrize("edit", [
    {"epoch": datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(days=300)},  # seqs restart lower
    {"epoch": datetime(2025, 1, 1, tzinfo=timezone.utc)},  # seqs jump higher
    {"protocols": {"mqtt": {"devices": len(DEVICES), "interval": 0.25}}},  # seqs jump higher
    {"protocols": {"mqtt": {"devices": len(DEVICES), "interval": 4.0}}},  # seqs restart lower
], ids=["epoch-later", "epoch-earlier", "interval-shorter", "interval-longer"])
def test_new_sequence_space_is_neither_duplicate_nor_lost(tmp_path: Path, edit: dict[str, Any]) -> None:
    data = tmp_path / "data"
    at = time.time()
    before = collect(spec(), data, ticks_back=5, at=at)
    assert before.totals["stored"] == 5 * len(DEVICES) * len(spec().sensors)
    after = collect(spec(**edit), data, ticks_back=3, at=at + 1)
    readings = 3 * len(DEVICES) * len(spec().sensors)
    assert (after.totals["stored"], after.totals["duplicates"], after.totals["lost"]) == (readings, 0, 0)


def test_unchanged_space_still_resumes_without_duplicates_or_a_false_gap(tmp_path: Path) -> None:
    data = tmp_path / "data"
    at = time.time()
    collect(spec(), data, ticks_back=5, at=at)
    again = collect(spec(), data, ticks_back=5, at=at)  # the same ticks again: a redelivery after a restart
    assert again.totals["stored"] == 0
    assert again.totals["duplicates"] == 5 * len(DEVICES) * len(spec().sensors)
    assert again.totals["lost"] == 0


def test_seqs_missing_below_the_last_stored_one_are_stored_when_they_come(tmp_path: Path) -> None:
    """After a scale-down another replica's session still holds readings older than the newest
    stored one: the resumed collector stores them (not duplicates), without counting them late."""
    data = tmp_path / "data"
    fleet_spec = spec()
    model = SignalModel(fleet_spec, "demo", "mqtt")
    now = model.current_tick(DEVICES, time.time())
    first = CollectorSink("demo", "mqtt", str(data), FleetMetrics("demo", "mqtt", "collector"), count_gaps=False)
    held_elsewhere = []  # ticks 3 and 4 from the end went to a replica that is gone now
    for back in range(6, 0, -1):
        readings = model.readings(model.block(DEVICES, now - back + 1))
        if back in (3, 4):
            held_elsewhere += readings
            continue
        for reading in readings:
            first.accept(reading, datetime.now(timezone.utc))
    first.flush()
    resumed = CollectorSink("demo", "mqtt", str(data), FleetMetrics("demo", "mqtt", "collector"))
    resumed.resume_from_dataset(space=SequenceSpace.of(fleet_spec, "mqtt"))
    for reading in held_elsewhere:
        assert resumed.accept(reading, datetime.now(timezone.utc)), reading
    resumed.flush()
    assert (resumed.totals["stored"], resumed.totals["duplicates"], resumed.totals["lost"], resumed.totals["late"]) == (len(held_elsewhere), 0, 0, 0)
    again = model.readings(model.block(DEVICES, now))
    assert not any(resumed.accept(r, datetime.now(timezone.utc)) for r in again), "the newest stored tick is still a duplicate"


def test_a_reading_counted_offline_that_arrives_after_all_is_stored_and_taken_back(tmp_path: Path) -> None:
    """The first reading after a resume counts the jump offline; a removed replica's session may
    still deliver some of those seqs: stored once, and no longer counted offline."""
    data = tmp_path / "data"
    fleet_spec = spec()
    model = SignalModel(fleet_spec, "demo", "mqtt")
    now = model.current_tick(DEVICES, time.time())
    ticks = {back: model.readings(model.block(DEVICES, now - back + 1)) for back in range(6, 0, -1)}
    first = CollectorSink("demo", "mqtt", str(data), FleetMetrics("demo", "mqtt", "collector"))
    for reading in ticks[6]:
        first.accept(reading, datetime.now(timezone.utc))
    first.flush()
    resumed = CollectorSink("demo", "mqtt", str(data), FleetMetrics("demo", "mqtt", "collector"))
    resumed.resume_from_dataset(space=SequenceSpace.of(fleet_spec, "mqtt"))
    series = len(ticks[1])
    for back in (1, 3, 3):  # the newest first (offline jump of 4), then one of the four, twice
        for reading in ticks[back]:
            resumed.accept(reading, datetime.now(timezone.utc))
    resumed.flush()
    t = resumed.totals
    assert (t["stored"], t["duplicates"], t["offline"], t["lost"]) == (2 * series, series, 3 * series, 0)


@pytest.mark.parametrize("edit", [
    {"epoch": datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(days=300)},  # the new seqs are lower
    {"epoch": datetime(2025, 1, 1, tzinfo=timezone.utc)},  # the new seqs are higher
], ids=["new-seqs-lower", "new-seqs-higher"])
def test_during_a_rollout_readings_of_both_specs_arrive_and_each_is_stored_once(tmp_path: Path, edit: dict[str, Any]) -> None:
    """The new collector took over the broker session: the old simulator's last readings (queued
    there) and the new simulator's arrive interleaved. The old ones are stored as another space,
    and do not make the new ones look duplicate (nor a gap); a redelivery of either is one
    duplicate. The old collector, still running, stores the new simulator's the same way."""
    data = tmp_path / "data"
    old_spec, new_spec = spec(), spec(**edit)
    old_model, new_model = SignalModel(old_spec, "demo", "mqtt"), SignalModel(new_spec, "demo", "mqtt")
    at = time.time()
    old_tick, new_tick = old_model.current_tick(DEVICES, at), new_model.current_tick(DEVICES, at)
    old_tail = [old_model.readings(old_model.block(DEVICES, old_tick - back)) for back in (2, 1, 0)]
    new_head = [new_model.readings(new_model.block(DEVICES, new_tick + k)) for k in (0, 1, 2)]
    old_collector = CollectorSink("demo", "mqtt", str(data), FleetMetrics("demo", "mqtt", "collector"))
    old_collector.resume_from_dataset(space=SequenceSpace.of(old_spec, "mqtt"))
    received = lambda sink, ticks: sum(sink.accept(r, datetime.now(timezone.utc)) for tick in ticks for r in tick)  # noqa: E731
    assert received(old_collector, old_tail[:1] + new_head[:1]) == 2 * len(old_tail[0])
    old_collector.flush()
    assert (old_collector.totals["other_space"], old_collector.totals["duplicates"], old_collector.totals["lost"]) == (len(new_head[0]), 0, 0)

    new_collector = CollectorSink("demo", "mqtt", str(data), FleetMetrics("demo", "mqtt", "collector"))
    new_collector.resume_from_dataset(space=SequenceSpace.of(new_spec, "mqtt"))  # resumes from the new tick it finds
    series = len(old_tail[0])
    interleaved = [old_tail[1], new_head[1], old_tail[2], new_head[2], old_tail[2], new_head[2]]  # the last two again: redelivered
    assert received(new_collector, interleaved) == 4 * series
    new_collector.flush()
    t = new_collector.totals
    assert (t["stored"], t["other_space"], t["duplicates"], t["lost"], t["offline"]) == (4 * series, 2 * series, 2 * series, 0, 0)
    stored = read_dataset(str(data))
    assert len(stored) == 6 * series and not stored.duplicated(["device", "sensor", "seq"]).any()
