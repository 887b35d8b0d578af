"""The dataset: Parquet files under one directory or fsspec URL, hive-partitioned by protocol,
date and hour (UTC):

    DIR/protocol=mqtt/date=2026-11-25/hour=13/part-<writer>-<time>-<n>.parquet
    DIR/protocol=mqtt/date=2026-11-25/hour=12/compacted-<token>.parquet   (see compaction.py)

Any pandas user reads it with `pandas.read_parquet(DIR)` (or `"s3://bucket/prefix"`);
`protocol`, `date` and `hour` come back as columns from the partition names (so they are not
stored again inside the files). Datasets written before the hour level (files directly under
`date=`) read the same way, with no hour.

On a local filesystem files are written under a dot-name and renamed into place, so readers never
see half a file; on an object store one PUT is already all-or-nothing, so the object is written
under its final key. `s3://` URLs honour the standard AWS variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, profiles) through botocore,
and the bucket is created when missing.
"""

from __future__ import annotations

import contextlib
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

from sensorfleet.reading import Reading, ReadingColumns

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
_TS = FILE_SCHEMA.field("ts").type
PARTITIONING = pads.partitioning(pa.schema([("protocol", pa.string()), ("date", pa.string()), ("hour", pa.string())]), flavor="hive")
DATASET_SCHEMA = FILE_SCHEMA.append(pa.field("protocol", pa.string())).append(pa.field("date", pa.string())).append(pa.field("hour", pa.string()))
COLUMNS = ["fleet", "protocol", "device", "sensor", "value", "unit", "ts", "seq", "quality", "anomaly", "received_at"]


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    # Object stores: no cached listings, or a reader in the process that also writes (a collector
    # resuming, the runner's summary, compaction) would miss the newest files.
    options = {"use_listings_cache": False} if url.startswith(("s3://", "s3a://")) else {}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path.rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def partition_dir(root: str, protocol: str, day: str, hour: int) -> str:
    return f"{root}/protocol={protocol}/date={day}/hour={hour:02d}"


@dataclass
class ReadingBatch:
    """Readings collected column by column, ready to become one Arrow table per date: rows added
    one by one (`add`, CoAP/OPC UA) into lists, whole decoded messages (`add_table`, the MQTT
    columnar path) as Arrow tables, kept in the order they came."""

    protocol: str
    columns: dict[str, list] = field(default_factory=lambda: {f.name: [] for f in FILE_SCHEMA})
    tables: list[pa.Table] = field(default_factory=list)
    table_rows: int = 0

    def __len__(self) -> int:
        return len(self.columns["seq"]) + self.table_rows

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

    def add_table(self, table: pa.Table) -> None:
        """Append rows already in FILE_SCHEMA (after the rows added so far)."""
        self._seal_rows()
        self.tables.append(table)
        self.table_rows += table.num_rows

    def _seal_rows(self) -> None:
        if self.columns["seq"]:
            rows = pa.table(self.columns, schema=FILE_SCHEMA)
            self.columns = {f.name: [] for f in FILE_SCHEMA}
            self.tables.append(rows)
            self.table_rows += rows.num_rows

    def merged(self, other: ReadingBatch) -> ReadingBatch:
        """This batch followed by `other` (both left as they are)."""
        batch = ReadingBatch(self.protocol)
        for part in (self, other):
            table = part.to_table()
            if table.num_rows:
                batch.add_table(table)
        return batch

    def ts_seconds(self) -> np.ndarray:
        """Every row's source timestamp as seconds since the epoch (float64)."""
        micros = pc.cast(self.to_table()["ts"], pa.int64()).to_numpy(zero_copy_only=False)
        return micros / 1e6

    def oldest_ts(self) -> datetime | None:
        oldest = [min(self.columns["ts"])] if self.columns["seq"] else []
        oldest += [pc.min(t["ts"]).as_py() for t in self.tables if t.num_rows]
        return min(oldest) if oldest else None

    def to_table(self) -> pa.Table:
        rows = [pa.table(self.columns, schema=FILE_SCHEMA)] if self.columns["seq"] or not self.tables else []
        tables = self.tables + rows
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def columns_table(columns: ReadingColumns, received_at: datetime) -> pa.Table | None:
    """One decoded message's readings as an Arrow table in FILE_SCHEMA, one array per field (the
    columnar intake); None if a timestamp is no real time (e.g. February 30)."""
    string = pa.string()
    try:
        ts = pc.cast(pa.array(columns.ts, string), _TS)
    except pa.ArrowInvalid:
        return None
    return pa.Table.from_arrays([
        pa.array(columns.fleet, string), pa.array(columns.device, string), pa.array(columns.sensor, string),
        pa.array(columns.value, pa.float64()), pa.array(columns.unit, string), ts,
        pa.array(columns.seq, pa.int64()), pa.array(columns.quality, string), pa.array(columns.anomaly, string),
        pa.repeat(pa.scalar(received_at, _TS), len(columns)),
    ], schema=FILE_SCHEMA)


class DatasetWriter:
    """Writes batches of one protocol's readings into the partitioned dataset."""

    def __init__(self, url: str, protocol: str, writer_id: str | None = None):
        self.url = url
        self.protocol = protocol
        self.fs, self.root = filesystem(url)
        self.writer_id = writer_id or uuid.uuid4().hex[:8]
        self.files_written = 0
        self.local = is_local(self.fs)
        self.fs.makedirs(self.root, exist_ok=True)  # on S3: creates the bucket when missing

    def write_table(self, table: pa.Table) -> list[str]:
        if table.num_rows == 0:
            return []
        # UTC hour number per row (integer arithmetic; formatting a string per row is slow).
        micros = pc.cast(table["ts"], pa.int64()).to_numpy(zero_copy_only=False)
        hours = micros // 3_600_000_000
        unique_hours = np.unique(hours)
        paths = []
        for hour in unique_hours.tolist():
            part = table.filter(pa.array(hours == hour)) if len(unique_hours) > 1 else table
            day, hour_of_day = divmod(hour, 24)
            label = (date(1970, 1, 1) + timedelta(days=day)).isoformat()
            paths.append(self._write_one(part, label, hour_of_day))
        return paths

    def write(self, batch: ReadingBatch) -> list[str]:
        return self.write_table(batch.to_table())

    def _write_one(self, table: pa.Table, day: str, hour: int) -> str:
        directory = partition_dir(self.root, self.protocol, day, hour)
        self.files_written += 1
        name = f"part-{self.writer_id}-{time.time_ns()}-{self.files_written:06d}.parquet"
        return write_parquet_file(self.fs, self.local, table, directory, name)


def write_parquet_file(fs: fsspec.AbstractFileSystem, local: bool, table: pa.Table, directory: str, name: str) -> str:
    """Write `directory/name` so that readers never see half of it (see the module docstring);
    a failure names the file."""
    final = f"{directory}/{name}"
    if not local:
        try:
            pq.write_table(table, final, filesystem=fs, compression="zstd")
        except Exception as exc:
            exc.add_note(f"while writing {fs.unstrip_protocol(final)}")  # the object the log names
            raise
        return final
    temporary = f"{directory}/.{name}.tmp"
    try:
        fs.makedirs(directory, exist_ok=True)
        pq.write_table(table, temporary, filesystem=fs, compression="zstd")
        os.rename(temporary, final)
    except BaseException as exc:
        # A full disk leaves a partial temporary behind: remove it, the caller keeps the batch.
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        exc.add_note(f"while writing {final}")
        raise
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
    ds = pads.dataset(root, filesystem=fs, format="parquet", partitioning=PARTITIONING, schema=DATASET_SCHEMA, exclude_invalid_files=False, ignore_prefixes=[".", "_"])
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
    # Like pyarrow's discovery: nothing under a "." or "_" name (temporaries, compaction staging,
    # reports) at any level below the root.
    return sorted(
        p for p in fs.find(root)
        if p.endswith(".parquet") and not any(part.startswith((".", "_")) for part in p[len(root):].split("/"))
    )
