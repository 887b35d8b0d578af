"""Stage 1a, load: Parquet readings in, one DataFrame out (prepare.py then cleans it into a panel).

    read_readings(url, ...)   only the needed columns and time window, one protocol and day at a
                              time, strings as categoricals
    read_selected(url, ...)   the same keeping only some series (a shard's, some devices), and the
                              span of the whole window so that every shard uses the same time grid
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from sensorfleet.dataset import dataset_files, filesystem, read_dataset
from sensorfleet.forecasting.errors import EmptySelection, ForecastInputError, NoReadings

REQUIRED_COLUMNS = ("protocol", "device", "sensor", "value", "ts")


OPTIONAL_COLUMNS = ("unit", "anomaly")


def dataset_window(url: str, window_days: float, protocols: Sequence[str] | None = None) -> tuple[datetime, datetime]:
    """[start, end) of the last `window_days` days of data in the dataset."""
    files = dataset_files(url)
    dates = sorted({m.group(1) for f in files if (m := re.search(r"date=(\d{4}-\d{2}-\d{2})", f))})
    if protocols:
        wanted = tuple(f"protocol={p}/" for p in protocols)
        dates = sorted({m.group(1) for f in files if any(w in f for w in wanted) if (m := re.search(r"date=(\d{4}-\d{2}-\d{2})", f))})
    if not dates:
        raise NoReadings(f"no readings in {url}: the dataset is empty; collect data first or run `sensorfleet generate FLEET.yaml --days 7 --data {url}`")
    _check_columns(url, files)
    last_day = datetime.fromisoformat(dates[-1]).replace(tzinfo=timezone.utc)
    ts = read_dataset(url, ["ts"], start=last_day, end=last_day + timedelta(days=1), protocols=protocols)["ts"]
    if ts.dropna().empty:
        raise NoReadings(f"no readings in {url}: the dataset's files hold no rows")
    end = ts.max().to_pydatetime() + timedelta(microseconds=1)
    return end - timedelta(days=window_days), end


def _check_columns(url: str, files: list[str]) -> None:
    fs, _ = filesystem(url)
    with fs.open(files[-1], "rb") as handle:
        names = set(pq.read_schema(handle).names) | {"protocol"}  # protocol comes from the partition
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ForecastInputError(f"{files[-1]}: missing column(s) {', '.join(missing)}; the dataset needs {', '.join(REQUIRED_COLUMNS)} (the collectors' schema)")


def _dictionary_dataset(url: str, partition: str | None = None):
    """The dataset with its string columns read as dictionaries (pandas categoricals): no Python
    string object per reading, which is most of the time and memory of reading ten million rows."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from sensorfleet.dataset import FILE_SCHEMA, PARTITIONING

    fs, root = filesystem(url)
    dictionary = {"device", "sensor", "unit", "anomaly"}
    schema = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), pa.string())) if f.name in dictionary else f for f in FILE_SCHEMA])
    schema = schema.append(pa.field("protocol", pa.string())).append(pa.field("date", pa.string()))
    fmt = pads.ParquetFileFormat(read_options=pads.ParquetReadOptions(dictionary_columns=dictionary))
    # One partition folder (e.g. "protocol=mqtt/date=2026-11-25"): only its files are listed, and
    # partition_base_dir keeps protocol/date/hour parsed from the path below the root.
    source = f"{root}/{partition}" if partition else root
    return pads.dataset(source, filesystem=fs, format=fmt, partitioning=PARTITIONING, schema=schema,
                        ignore_prefixes=[".", "_"], partition_base_dir=root)


def read_readings(url: str, window_days: float, protocols: Sequence[str] | None = None, on_day: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """The last `window_days` days of readings: only the columns forecasting needs, one protocol
    and day at a time, strings as categoricals, so 10 M readings stay well under 1 GiB."""
    return read_selected(url, window_days, protocols, on_day)[0]


Span = tuple[pd.Timestamp, pd.Timestamp]


def read_selected(
    url: str,
    window_days: float,
    protocols: Sequence[str] | None = None,
    on_day: Callable[[int, int], None] | None = None,
    keep: Callable[[pd.DataFrame], np.ndarray] | None = None,
    devices: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, Span]:
    """`read_readings` keeping only some series: `keep(part) -> bool mask` drops rows of each part
    as it is read (a shard's series), `devices` reads only those devices. Also returns the span
    ((first, last) ts) of the window's readings before `keep`, so that every shard resamples onto
    the grid of the whole dataset."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    start, end = dataset_window(url, window_days, protocols)
    fs, root = filesystem(url)
    present = sorted(os.path.basename(p).removeprefix("protocol=") for p in fs.ls(root, detail=False)
                     if os.path.basename(p).startswith("protocol="))
    chosen = [p for p in present if not protocols or p in protocols]
    columns = ["device", "sensor", "value", "ts", "unit", "anomaly"]
    days = []
    day = start
    while day < end:
        days.append((day, min(end, datetime.combine(day.date() + timedelta(days=1), datetime.min.time(), timezone.utc))))
        day = days[-1][1]
    parts, done, total = [], 0, len(days) * len(chosen)
    span: tuple[pd.Timestamp, pd.Timestamp] | None = None
    for protocol in chosen:
        for lo, hi in days:
            expr = (
                (pads.field("protocol") == protocol)
                & (pads.field("date") == lo.strftime("%Y-%m-%d"))
                & (pads.field("ts") >= pa.scalar(lo, pa.timestamp("us", tz="UTC")))
                & (pads.field("ts") < pa.scalar(hi, pa.timestamp("us", tz="UTC")))
            )
            if devices is not None:
                expr = expr & pads.field("device").isin(list(devices))
            # Only the partitions of the window are listed and read (not the whole dataset).
            partition = f"protocol={protocol}/date={lo:%Y-%m-%d}"
            if not fs.exists(f"{root}/{partition}"):
                part = pd.DataFrame()
            elif keep is None:
                part = _dictionary_dataset(url, partition).to_table(columns=columns, filter=expr).to_pandas()
            else:
                part, part_span = _read_kept(_dictionary_dataset(url, partition), columns, expr, protocol, keep)
                span = part_span if span is None else span if part_span is None else (min(span[0], part_span[0]), max(span[1], part_span[1]))
            if len(part):
                part.insert(0, "protocol", pd.Categorical.from_codes(np.zeros(len(part), dtype=np.int8), [protocol]))
                if keep is None:
                    first, last = part["ts"].min(), part["ts"].max()
                    span = (first, last) if span is None else (min(span[0], first), max(span[1], last))
                parts.append(part)
            done += 1
            if on_day:
                on_day(done, total)
    if not parts and span is not None:
        raise EmptySelection(f"none of the series in {url} between {start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC is selected")
    if not parts:
        raise NoReadings(f"no readings in {url} between {start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC")
    assert span is not None
    return _concat_categorical(parts), span


KEEP_BATCH_ROWS = 1 << 20


def _read_kept(dataset: Any, columns: list[str], expr: Any, protocol: str, keep: Callable[[pd.DataFrame], np.ndarray]) -> tuple[pd.DataFrame, Span | None]:
    """The rows of one partition that `keep` selects, read in batches of ~1 M rows: a shard holds
    its own rows plus one batch of everyone's, not a whole day of the fleet (with a million series
    that would be a billion rows). Also the span of all the partition's readings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kept, first, last = [], None, None
    for batch in dataset.to_batches(columns=columns, filter=expr, batch_size=KEEP_BATCH_ROWS):
        if batch.num_rows == 0:
            continue
        lo, hi = pc.min_max(batch.column("ts")).values()
        first = lo.as_py() if first is None else min(first, lo.as_py())
        last = hi.as_py() if last is None else max(last, hi.as_py())
        keys = batch.select(["device", "sensor"]).to_pandas()
        keys.insert(0, "protocol", pd.Categorical.from_codes(np.zeros(len(keys), dtype=np.int8), [protocol]))
        mask = keep(keys)
        if mask.any():
            kept.append(batch.filter(pa.array(mask)))
    span = None if first is None else (pd.Timestamp(first), pd.Timestamp(last))
    if not kept:
        return pd.DataFrame(), span
    return pa.Table.from_batches(kept).unify_dictionaries().to_pandas(), span


def _concat_categorical(parts: list[pd.DataFrame]) -> pd.DataFrame:
    if len(parts) == 1:
        return parts[0]
    out = {}
    for c in parts[0].columns:
        if isinstance(parts[0][c].dtype, pd.CategoricalDtype):
            out[c] = pd.api.types.union_categoricals([p[c] for p in parts], ignore_order=True)
        else:
            out[c] = np.concatenate([p[c].to_numpy() for p in parts]) if c != "ts" else pd.concat([p[c] for p in parts], ignore_index=True)
    return pd.DataFrame(out)
