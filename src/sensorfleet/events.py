"""Device events beside the dataset: what clients did to devices (setpoint writes, injected
faults, resets) and limit-alarm crossings, one row per event. Readings stay in the one Reading schema; an event is not a
reading (no sequence number, not on a tick), so it gets its own small table:

    DIR/_events/protocol=opcua/part-<writer>-<time>-<n>.parquet

Under `_events` pyarrow's dataset discovery (and so `pandas.read_parquet(DIR)`, `read_dataset`,
compaction) skips it; it lives with the dataset (same claim, same bucket and credentials).
`read_events(DIR)` gives a DataFrame; the forecast report lists the events of its window.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from sensorfleet.dataset import filesystem, is_local, write_parquet_file

EVENTS_DIR = "_events"
EVENT_SCHEMA = pa.schema(
    [
        pa.field("fleet", pa.string()),
        pa.field("device", pa.string()),
        pa.field("ts", pa.timestamp("us", tz="UTC")),  # when the action took effect (server clock)
        pa.field("action", pa.string()),  # setpoint | fault | reset | limit_high | limit_low | limit_normal
        pa.field("sensor", pa.string()),  # setpoint: the sensor
        pa.field("value", pa.float64()),  # setpoint: the new setpoint; fault: null
        pa.field("fault", pa.string()),  # fault: its kind
        pa.field("duration", pa.float64()),  # fault: seconds
        pa.field("message", pa.string()),
        pa.field("client", pa.string()),
        pa.field("received_at", pa.timestamp("us", tz="UTC")),
    ]
)
COLUMNS = [f.name for f in EVENT_SCHEMA] + ["protocol"]


class EventWriter:
    """Writes batches of one protocol's device events (one file a batch; events are rare)."""

    def __init__(self, url: str, protocol: str, writer_id: str | None = None):
        self.fs, root = filesystem(url)
        self.directory = f"{root}/{EVENTS_DIR}/protocol={protocol}"
        self.writer_id = writer_id or uuid.uuid4().hex[:8]
        self.files_written = 0

    def write(self, rows: list[dict]) -> str | None:
        if not rows:
            return None
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in EVENT_SCHEMA} for r in rows], schema=EVENT_SCHEMA)
        self.files_written += 1
        name = f"part-{self.writer_id}-{time.time_ns()}-{self.files_written:06d}.parquet"
        return write_parquet_file(self.fs, is_local(self.fs), table, self.directory, name)


def read_events(url: str, start: datetime | None = None, end: datetime | None = None) -> pd.DataFrame:
    """Every stored device event (optionally of [start, end)), oldest first."""
    fs, root = filesystem(url)
    directory = f"{root}/{EVENTS_DIR}"
    if not fs.exists(directory):
        return pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS})
    partitioning = pads.partitioning(pa.schema([("protocol", pa.string())]), flavor="hive")
    ds = pads.dataset(directory, filesystem=fs, format="parquet", partitioning=partitioning, schema=EVENT_SCHEMA.append(pa.field("protocol", pa.string())))
    expr = None
    if start is not None:
        expr = pads.field("ts") >= pa.scalar(start.astimezone(timezone.utc), pa.timestamp("us", tz="UTC"))
    if end is not None:
        upper = pads.field("ts") < pa.scalar(end.astimezone(timezone.utc), pa.timestamp("us", tz="UTC"))
        expr = upper if expr is None else expr & upper
    return ds.to_table(filter=expr).to_pandas().sort_values("ts", kind="stable").reset_index(drop=True)
