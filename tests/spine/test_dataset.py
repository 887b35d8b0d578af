"""The dataset: plain pandas reads it; fsspec URLs work; windows and protocols filter."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd

from sensorfleet.dataset import DatasetWriter, ReadingBatch, dataset_files, read_dataset
from sensorfleet.signals import SignalModel
from sensorfleet.spec import SensorFleet


def readings(protocol: str, start_tick: int, n: int):
    fleet = SensorFleet.model_validate({"metadata": {"name": "ds"}})
    m = SignalModel(fleet.spec, "ds", protocol, interval=3600.0)
    return m.readings(m.block(np.zeros(n, dtype=np.int64), np.arange(start_tick, start_tick + n)))


def write(url: str, protocol: str, rows) -> list[str]:
    batch = ReadingBatch(protocol)
    now = datetime.now(timezone.utc)
    for r in rows:
        batch.add(r, now)
    return DatasetWriter(url, protocol).write(batch)


def test_plain_pandas_reads_the_partitioned_dataset(tmp_path):
    rows = readings("mqtt", 8000, 48)  # 48 hourly ticks: the batch spans days, one file per day
    paths = write(str(tmp_path), "mqtt", rows)
    assert len(paths) >= 2 and all("protocol=mqtt/date=" in p for p in paths)
    df = pd.read_parquet(tmp_path)
    assert len(df) == len(rows)
    assert {"fleet", "protocol", "device", "sensor", "value", "unit", "ts", "seq", "quality", "anomaly", "received_at", "date"} <= set(df.columns)
    assert str(df["ts"].dt.tz) == "UTC"
    assert set(df["protocol"].astype(str)) == {"mqtt"}


def test_fsspec_url_and_filters(tmp_path):
    url = f"file://{tmp_path}/store"
    write(url, "mqtt", readings("mqtt", 9000, 24))
    write(url, "coap", readings("coap", 9000, 24))
    assert len(dataset_files(url)) >= 2
    everything = read_dataset(url)
    assert set(everything["protocol"]) == {"mqtt", "coap"}
    only_coap = read_dataset(url, columns=["device", "value", "protocol"], protocols=["coap"])
    assert set(only_coap["protocol"]) == {"coap"} and list(only_coap.columns) == ["device", "value", "protocol"]
    middle = everything["ts"].sort_values().iloc[len(everything) // 2].to_pydatetime()
    window = read_dataset(url, start=middle, end=middle + timedelta(hours=3))
    assert len(window) and window["ts"].min() >= middle and window["ts"].max() < middle + timedelta(hours=3)


def test_missing_dataset_reads_as_empty(tmp_path):
    assert read_dataset(str(tmp_path / "nothing-here"), columns=["value"]).empty


def test_half_written_files_are_invisible(tmp_path):
    rows = readings("mqtt", 100, 5)
    write(str(tmp_path), "mqtt", rows)
    day = next(tmp_path.glob("protocol=mqtt/date=*"))
    (day / ".part-crashed.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert len(pd.read_parquet(tmp_path)) == len(rows)
    assert len(read_dataset(str(tmp_path))) == len(rows)


def test_a_batch_of_rows_and_whole_tables_writes_them_all_in_the_order_they_came(tmp_path):
    first, middle, last = readings("mqtt", 9000, 3), readings("mqtt", 9003, 4), readings("mqtt", 9007, 2)
    now = datetime.now(timezone.utc)
    rows_batch = ReadingBatch("mqtt")
    for r in middle:
        rows_batch.add(r, now)
    batch = ReadingBatch("mqtt")
    for r in first:
        batch.add(r, now)
    batch.add_table(rows_batch.to_table())
    for r in last:
        batch.add(r, now)
    everything = first + middle + last
    assert len(batch) == len(everything) and batch.oldest_ts() == min(r.ts for r in everything)
    merged = batch.merged(ReadingBatch("mqtt"))
    assert merged.to_table()["seq"].to_pylist() == [r.seq for r in everything]
    assert list(merged.ts_seconds()) == [r.ts.timestamp() for r in everything]
    DatasetWriter(str(tmp_path), "mqtt").write(merged)
    assert sorted(pd.read_parquet(tmp_path)["seq"]) == sorted(r.seq for r in everything)
