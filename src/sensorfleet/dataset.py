"""The dataset: Parquet files under one directory or fsspec URL, hive-partitioned by protocol and date.

    DIR/protocol=mqtt/date=2026-11-25/part-<writer>-<time>-<n>.parquet

Any pandas user reads it with `pandas.read_parquet(DIR)`; `protocol` and `date` come back as
columns from the partition names (so they are not stored again inside the files).
Files are written under a dot-name and renamed into place, so readers never see half a file.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from sensorfleet.reading import Reading

FILE_SCHEMA = pa.schema(
    [
        pa.field("fleet", pa.string()),
        pa.field("device", pa.string()),
        pa.field("sensor", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("unit", pa.string()),
        pa.field("ts", pa.timestamp("us", tz="UTC")),
        pa.field("seq", pa.int64()),
        pa.field("quality", pa.string()),
        pa.field("anomaly", pa.string()),
        pa.field("received_at", pa.timestamp("us", tz="UTC")),
    ]
)
PARTITIONING = pads.partitioning(pa.schema([("protocol", pa.string()), ("date", pa.string())]), flavor="hive")
COLUMNS = ["fleet", "protocol", "device", "sensor", "value", "unit", "ts", "seq", "quality", "anomaly", "received_at"]


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or "/"


@dataclass
class ReadingBatch:
    """Readings collected column by column, ready to become one Arrow table per date."""

    protocol: str
    columns: dict[str, list] = field(default_factory=lambda: {f.name: [] for f in FILE_SCHEMA})

    def __len__(self) -> int:
        return len(self.columns["seq"])

    def add(self, reading: Reading, received_at: datetime) -> None:
        c = self.columns
        c["fleet"].append(reading.fleet)
        c["device"].append(reading.device)
        c["sensor"].append(reading.sensor)
        c["value"].append(reading.value)
        c["unit"].append(reading.unit)
        c["ts"].append(reading.ts)
        c["seq"].append(reading.seq)
        c["quality"].append(reading.quality)
        c["anomaly"].append(reading.anomaly)
        c["received_at"].append(received_at)

    def oldest_ts(self) -> datetime | None:
        return min(self.columns["ts"]) if len(self) else None

    def to_table(self) -> pa.Table:
        return pa.table(self.columns, schema=FILE_SCHEMA)


class DatasetWriter:
    """Writes batches of one protocol's readings into the partitioned dataset."""

    def __init__(self, url: str, protocol: str, writer_id: str | None = None):
        self.url = url
        self.protocol = protocol
        self.fs, self.root = filesystem(url)
        self.writer_id = writer_id or uuid.uuid4().hex[:8]
        self.files_written = 0
        self.fs.makedirs(self.root, exist_ok=True)

    def write_table(self, table: pa.Table) -> list[str]:
        if table.num_rows == 0:
            return []
        # UTC day number per row (integer arithmetic; formatting a string per row is slow).
        micros = pc.cast(table["ts"], pa.int64()).to_numpy(zero_copy_only=False)
        days = micros // 86_400_000_000
        unique_days = np.unique(days)
        paths = []
        for day in unique_days.tolist():
            part = table.filter(pa.array(days == day)) if len(unique_days) > 1 else table
            label = (date(1970, 1, 1) + timedelta(days=day)).isoformat()
            paths.append(self._write_one(part, label))
        return paths

    def write(self, batch: ReadingBatch) -> list[str]:
        return self.write_table(batch.to_table())

    def _write_one(self, table: pa.Table, day: str) -> str:
        directory = f"{self.root}/protocol={self.protocol}/date={day}"
        self.fs.makedirs(directory, exist_ok=True)
        self.files_written += 1
        name = f"part-{self.writer_id}-{time.time_ns()}-{self.files_written:06d}.parquet"
        final, temporary = f"{directory}/{name}", f"{directory}/.{name}.tmp"
        pq.write_table(table, temporary, filesystem=self.fs, compression="zstd")
        self.fs.mv(temporary, final)
        return final


def read_dataset(
    url: str,
    columns: Sequence[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    protocols: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Read the dataset (only the needed columns, partitions and time window) into a DataFrame."""
    fs, root = filesystem(url)
    if not fs.exists(root):
        return pd.DataFrame({c: pd.Series(dtype="object") for c in (columns or COLUMNS)})
    ds = pads.dataset(root, filesystem=fs, format="parquet", partitioning=PARTITIONING, schema=FILE_SCHEMA.append(pa.field("protocol", pa.string())).append(pa.field("date", pa.string())), exclude_invalid_files=False, ignore_prefixes=[".", "_"])
    expr = None

    def both(e):
        return e if expr is None else expr & e

    if protocols is not None:
        expr = both(pads.field("protocol").isin(list(protocols)))
    if start is not None:
        expr = both(pads.field("date") >= _day(start))
        expr = both(pads.field("ts") >= pa.scalar(start.astimezone(timezone.utc), pa.timestamp("us", tz="UTC")))
    if end is not None:
        expr = both(pads.field("date") <= _day(end))
        expr = both(pads.field("ts") < pa.scalar(end.astimezone(timezone.utc), pa.timestamp("us", tz="UTC")))
    table = ds.to_table(columns=list(columns) if columns else COLUMNS, filter=expr)
    return table.to_pandas()


def _day(ts: datetime | date) -> str:
    return ts.strftime("%Y-%m-%d")


def dataset_files(url: str) -> list[str]:
    fs, root = filesystem(url)
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.find(root) if p.endswith(".parquet") and not os.path.basename(p).startswith("."))
