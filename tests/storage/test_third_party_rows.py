"""Readings of third-party devices (spec.sources) have `seq` null. They share the protocol's
partitions with simulated readings, and everything downstream reads them: the dataset, a
collector resuming its series, compaction, the forecast's prepare stage."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow.parquet as pq

from sensorfleet.collectors.base import CollectorSink
from sensorfleet.collectors.foreign import third_party_reading
from sensorfleet.compaction import compact
from sensorfleet.dataset import FILE_SCHEMA, dataset_files, read_dataset
from sensorfleet.forecasting.load import read_readings
from sensorfleet.forecasting.prepare import prepare
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import Reading

HOURS = 4


def mixed_dataset(url: str, start: datetime, hours: int = HOURS, step_minutes: int = 1) -> int:
    """A simulated device (seq 0, 1, ...) and a third-party one (seq null) in the mqtt partition,
    a reading every `step_minutes` each, written through the collector's sink."""
    sink = CollectorSink("demo", "mqtt", url, FleetMetrics("demo", "mqtt", "collector"), batch_size=100)
    n = hours * 60 // step_minutes
    for minute in range(n):
        ts = start + timedelta(minutes=minute * step_minutes)
        value = 20.0 + np.sin(minute / 30.0)
        assert sink.accept(Reading("demo", "mqtt", "mqtt-00000", "temperature", value, "degC", ts, minute), ts)
        assert sink.accept(third_party_reading("demo", "mqtt", "boiler-7", "temperature", value + 5 if minute % 50 else None, "degC", ts), ts)
    sink.flush()
    assert sink.totals["unsequenced"] == n and sink.totals["bad_quality"] == len(range(0, n, 50))
    assert sink.totals["lost"] == 0 and sink.totals["duplicates"] == 0
    return 2 * n


def test_null_seq_reads_back_and_survives_compaction(tmp_path):
    url = str(tmp_path / "data")
    start = (datetime.now(timezone.utc) - timedelta(hours=HOURS + 2)).replace(minute=0, second=0, microsecond=0)
    rows = mixed_dataset(url, start)
    assert pq.read_schema(dataset_files(url)[0]).field("seq").type == FILE_SCHEMA.field("seq").type

    df = read_dataset(url)
    assert len(df) == rows
    assert df.loc[df["device"] == "boiler-7", "seq"].isna().all()
    assert (df.loc[df["device"] == "mqtt-00000", "seq"].sort_values().to_numpy() == np.arange(HOURS * 60)).all()

    result = compact(url)
    assert result.hours_compacted == HOURS and result.rows == rows
    after = read_dataset(url)
    assert len(after) == rows and after.loc[after["device"] == "boiler-7", "seq"].isna().sum() == HOURS * 60
    assert (after[after["device"] == "boiler-7"]["quality"] == "bad").sum() == len(range(0, HOURS * 60, 50))


def test_a_restarted_collector_resumes_only_sequenced_series(tmp_path):
    url = str(tmp_path / "data")
    start = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(hours=HOURS)
    mixed_dataset(url, start)
    restarted = CollectorSink("demo", "mqtt", url, FleetMetrics("demo", "mqtt", "collector"))
    assert restarted.resume_from_dataset() == 1, "the third-party series has no seq to resume from"
    # The next simulated reading follows on without a gap; a repeat is a duplicate.
    ts = datetime.now(timezone.utc)
    assert restarted.accept(Reading("demo", "mqtt", "mqtt-00000", "temperature", 1.0, "degC", ts, HOURS * 60), ts)
    assert not restarted.accept(Reading("demo", "mqtt", "mqtt-00000", "temperature", 1.0, "degC", ts, HOURS * 60 - 1), ts)
    assert restarted.totals["lost"] == 0 and restarted.totals["duplicates"] == 1


def test_the_forecast_prepares_third_party_series(tmp_path):
    url = str(tmp_path / "data")
    hours = 30  # an hourly panel needs a daily season (24 steps) + horizon x (CV windows + 1) + 1
    start = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(hours=hours)
    mixed_dataset(url, start, hours=hours, step_minutes=10)
    readings = read_readings(url, window_days=2)
    prepared = prepare(readings, freq="1h", horizon=2, cv_windows=1)
    assert sorted(prepared.panel.ids["device"].astype(str)) == ["boiler-7", "mqtt-00000"]
    third_party = int(np.flatnonzero(prepared.panel.ids["device"].astype(str).to_numpy() == "boiler-7")[0])
    assert np.isfinite(prepared.panel.y[third_party]).sum() >= hours - 1, "its values made it into the panel"
