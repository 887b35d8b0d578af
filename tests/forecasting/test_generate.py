"""`sensorfleet generate`: the dataset a fleet would have collected, from the real signal model."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from sensorfleet.dataset import FILE_SCHEMA, dataset_files, read_dataset
from sensorfleet.forecasting.generate import generate_dataset
from sensorfleet.reading import ANOMALIES
from sensorfleet.signals import SignalModel, device_index
from sensorfleet.spec import parse_fleet


def test_layout_schema_and_row_count(dataset: Path, start: datetime) -> None:
    files = dataset_files(str(dataset))
    days = sorted({Path(f).parent.parent.name for f in files})  # protocol=P/date=D/hour=HH/file
    assert days == [f"date=2026-11-0{d}" for d in range(1, 5)]
    assert all("protocol=mqtt" in f for f in files)
    assert pq.read_schema(files[0]).remove_metadata() == FILE_SCHEMA
    frame = read_dataset(str(dataset))
    # 2 devices x 3 sensors, one reading a minute for 4 days, each inside the window.
    assert len(frame) == 6 * 4 * 1440
    assert frame["ts"].min() >= pd.Timestamp(start) and frame["ts"].max() < pd.Timestamp(start + timedelta(days=4))
    assert frame.groupby(["device", "sensor"]).size().eq(4 * 1440).all()


def test_readings_are_the_signal_models(dataset: Path, start: datetime, fleet_document: dict) -> None:
    frame = read_dataset(str(dataset), start=start + timedelta(days=2), end=start + timedelta(days=2, hours=3))
    fleet = parse_fleet(fleet_document)
    model = SignalModel(fleet.spec, fleet.name, "mqtt")
    temperature = frame[frame["sensor"] == "temperature"].sort_values(["device", "seq"])
    block = model.block(temperature["device"].map(device_index).to_numpy(), temperature["seq"].to_numpy())
    seconds = ((temperature["ts"] - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy()
    np.testing.assert_allclose(block.times, seconds, rtol=0, atol=1e-5)
    expected = block.values[:, 0]
    got = temperature["value"].to_numpy(dtype=float, na_value=np.nan)
    np.testing.assert_array_equal(np.isnan(expected), np.isnan(got))
    np.testing.assert_allclose(got[~np.isnan(got)], expected[~np.isnan(expected)])


def test_anomalies_are_marked(dataset: Path) -> None:
    frame = read_dataset(str(dataset), columns=["value", "quality", "anomaly"])
    counts = frame["anomaly"].value_counts()
    assert set(counts.index) <= set(ANOMALIES)
    assert counts.get("spike", 0) > 0 and counts.get("stuck", 0) > 0 and counts.get("dropout", 0) > 0
    dropouts = frame["anomaly"] == "dropout"
    assert frame.loc[dropouts, "value"].isna().all() and (frame.loc[dropouts, "quality"] == "bad").all()
    assert frame.loc[~dropouts, "value"].notna().all()
    assert (frame.loc[frame["anomaly"] == "stuck", "quality"] == "uncertain").all()


def test_generation_is_deterministic_and_honours_overrides(tmp_path: Path, start: datetime, fleet_document: dict) -> None:
    fleet = parse_fleet(fleet_document)
    one = generate_dataset(fleet, str(tmp_path / "a"), days=0.25, start=start, interval=30)
    generate_dataset(fleet, str(tmp_path / "b"), days=0.25, start=start, interval=30)
    a = read_dataset(str(tmp_path / "a")).sort_values(["device", "sensor", "seq"]).reset_index(drop=True)
    b = read_dataset(str(tmp_path / "b")).sort_values(["device", "sensor", "seq"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns=["received_at"]), b.drop(columns=["received_at"]))
    # 6 hours at 30 s: 720 readings per series.
    assert one.rows == {"mqtt": 6 * 720} and len(a) == 6 * 720
