"""Compaction and retention of the dataset (`sensorfleet compact`, the fleet's compaction CronJob).

Collectors write one small file per flush into the partition of the hour its readings belong to
(`protocol=P/date=D/hour=HH/`). Once an hour is closed (its end plus a grace period has passed),
compaction merges that hour's files into one file (or a few, past `max_rows_per_file`) sorted by
device, sensor and time: what readers like, and ~1,800 files an hour fewer per collector.

Atomic on a local filesystem (a PersistentVolumeClaim, a laptop folder): the compacted file is
written into a hidden staging folder beside the hour (`date=D/.compact-HH-<token>/`, skipped by
pyarrow and pandas like every "."-name), then the staging folder and the hour folder swap places
in one `renameat2(RENAME_EXCHANGE)`. A reader lists either the old folder (the small files) or the
new one (the compacted file): never both, never neither. Killed with SIGKILL at any point, what
is left is a hidden staging folder; the next run finishes or discards it:

    before the swap   the staging folder holds only compacted-<token>*.parquet -> discarded
    after the swap    hour=HH holds compacted-<token>*, the staging folder the old files -> files
                      that arrived during the run (not among the inputs) move in, the rest go

Object stores (`s3://`) have no multi-object atomicity: there compaction writes the compacted
object first, then deletes the inputs, with a journal under `_compaction/` so a re-run finishes
the job; a plain reader may see both for the seconds in between (docs/storage.md).

Retention drops whole `date=` partitions older than `retention_days` (hidden by one rename first
on a local filesystem, so a reader never sees half a day).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sensorfleet.dataset import FILE_SCHEMA, filesystem, is_local

log = logging.getLogger(__name__)

COMPACTED_PREFIX = "compacted-"
STAGING_PREFIX = ".compact-"
JOURNAL_DIR = "_compaction"
SORT_KEYS = [("device", "ascending"), ("sensor", "ascending"), ("ts", "ascending"), ("seq", "ascending")]
DEFAULT_GRACE = timedelta(minutes=10)
# ~2 M readings are ~20-40 MiB of zstd Parquet: "tens of MiB", one file per hour for most fleets.
DEFAULT_MAX_ROWS_PER_FILE = 2_000_000

_HOUR_DIR = re.compile(r"^hour=(\d{2})$")
_DATE_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class CompactionError(RuntimeError):
    pass


@dataclass
class CompactionResult:
    hours_compacted: int = 0
    files_in: int = 0
    files_out: int = 0
    rows: int = 0
    recovered: int = 0  # staging folders / journals of an interrupted run, finished or discarded
    partitions_dropped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# finding closed hours
# --------------------------------------------------------------------------------------------


def _children(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    try:
        return sorted(fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def _visible_parquet(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    return [p for p in _children(fs, directory) if p.endswith(".parquet") and not os.path.basename(p).startswith((".", "_"))]


def closed_hours(url: str, now: datetime, grace: timedelta = DEFAULT_GRACE) -> list[tuple[str, str, int, str]]:
    """(protocol, date, hour, folder) of every hour partition whose end + grace lies before now."""
    fs, root = filesystem(url)
    found = []
    for proto_dir in _children(fs, root):
        name = os.path.basename(proto_dir)
        if not name.startswith("protocol="):
            continue
        for date_dir in _children(fs, proto_dir):
            m = _DATE_DIR.match(os.path.basename(date_dir))
            if not m:
                continue
            day = date.fromisoformat(m.group(1))
            for hour_dir in _children(fs, date_dir):
                h = _HOUR_DIR.match(os.path.basename(hour_dir))
                if not h:
                    continue
                end = datetime(day.year, day.month, day.day, tzinfo=timezone.utc) + timedelta(hours=int(h.group(1)) + 1)
                if end + grace <= now:
                    found.append((name.removeprefix("protocol="), m.group(1), int(h.group(1)), hour_dir))
    return found


def _needs_compaction(files: list[str]) -> bool:
    return len(files) > 1 or (len(files) == 1 and not os.path.basename(files[0]).startswith(COMPACTED_PREFIX))


# --------------------------------------------------------------------------------------------
# merging
# --------------------------------------------------------------------------------------------


def _merged(fs: fsspec.AbstractFileSystem, files: list[str]) -> pa.Table:
    tables = []
    for path in files:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle, schema=FILE_SCHEMA))
    table = pa.concat_tables(tables) if tables else FILE_SCHEMA.empty_table()
    return table.take(pc.sort_indices(table, sort_keys=SORT_KEYS))


def _write_parts(fs: fsspec.AbstractFileSystem, table: pa.Table, directory: str, token: str,
                 max_rows: int, inputs: list[str], atomic_rename: bool) -> list[str]:
    """Write the sorted table as compacted-<token>-<n>.parquet files; the inputs' names go into
    the footer metadata (what a re-run and a curious reader can check)."""
    metadata = {b"sensorfleet.compacted_from": json.dumps([os.path.basename(p) for p in inputs]).encode()}
    outputs = []
    for n, start in enumerate(range(0, max(table.num_rows, 1), max_rows)):
        part = table.slice(start, max_rows).replace_schema_metadata(metadata)
        final = f"{directory}/{COMPACTED_PREFIX}{token}-{n:03d}.parquet"
        if atomic_rename:
            temporary = f"{directory}/.{os.path.basename(final)}.tmp"
            pq.write_table(part, temporary, compression="zstd", row_group_size=256_000)
            _fsync(temporary)
            os.rename(temporary, final)
        else:
            pq.write_table(part, final, filesystem=fs, compression="zstd", row_group_size=256_000)
        outputs.append(final)
    return outputs


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> None:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE, glibc >= 2.28)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE) != 0:
        errno = ctypes.get_errno()
        raise CompactionError(f"cannot swap {a} and {b} atomically: {os.strerror(errno)} (a Linux filesystem with renameat2 RENAME_EXCHANGE is needed)")


# --------------------------------------------------------------------------------------------
# local filesystem: staging folder + exchange
# --------------------------------------------------------------------------------------------


def _staging_name(hour: int, token: str) -> str:
    return f"{STAGING_PREFIX}{hour:02d}-{token}"


def _recover_local(date_dir: str) -> int:
    """Finish or discard what an interrupted run left in this date folder."""
    recovered = 0
    for entry in sorted(os.listdir(date_dir)):
        if not entry.startswith(STAGING_PREFIX):
            continue
        staging = os.path.join(date_dir, entry)
        hour, token = entry.removeprefix(STAGING_PREFIX).split("-", 1)
        hour_dir = os.path.join(date_dir, f"hour={hour}")
        swapped = os.path.isdir(hour_dir) and any(n.startswith(f"{COMPACTED_PREFIX}{token}-") for n in os.listdir(hour_dir))
        if swapped:
            _move_newcomers(staging, hour_dir)
        shutil.rmtree(staging)
        log.info("%s an interrupted compaction of %s", "finished" if swapped else "discarded", hour_dir)
        recovered += 1
    return recovered


def _move_newcomers(old: str, hour_dir: str) -> None:
    """After the swap: files that a collector wrote into the hour while it was being compacted are
    in the old folder and not in the compacted file; they move into the new folder."""
    merged: set[str] = set()
    for name in os.listdir(hour_dir):
        if name.startswith(COMPACTED_PREFIX) and name.endswith(".parquet"):
            raw = pq.read_schema(os.path.join(hour_dir, name)).metadata or {}
            merged.update(json.loads(raw.get(b"sensorfleet.compacted_from", b"[]")))
    for name in os.listdir(old):
        if name.endswith(".parquet") and not name.startswith(".") and name not in merged:
            os.rename(os.path.join(old, name), os.path.join(hour_dir, name))


def _compact_hour_local(hour_dir: str, hour: int, max_rows: int) -> tuple[int, int, int]:
    fs = fsspec.filesystem("file")
    inputs = _visible_parquet(fs, hour_dir)
    if not _needs_compaction(inputs):
        return 0, 0, 0
    token = uuid.uuid4().hex[:12]
    staging = os.path.join(os.path.dirname(hour_dir), _staging_name(hour, token))
    os.mkdir(staging)
    table = _merged(fs, inputs)
    outputs = _write_parts(fs, table, staging, token, max_rows, inputs, atomic_rename=True)
    _fsync(staging)
    _exchange(staging, hour_dir)
    _fsync(os.path.dirname(hour_dir))
    _move_newcomers(staging, hour_dir)
    shutil.rmtree(staging)
    return len(inputs), len(outputs), table.num_rows


# --------------------------------------------------------------------------------------------
# object stores: journal, write, delete
# --------------------------------------------------------------------------------------------


def _journal_path(root: str, protocol: str, day: str, hour: int) -> str:
    return f"{root}/{JOURNAL_DIR}/protocol={protocol}/date={day}/hour={hour:02d}.json"


def _finish_journal(fs: fsspec.AbstractFileSystem, journal: str) -> bool:
    """An interrupted run on an object store: all outputs written -> delete the inputs left;
    otherwise delete the partial outputs (the inputs are all still there). Returns whether it
    finished (True) or rolled back (False)."""
    entry = json.loads(fs.cat_file(journal))
    complete = all(fs.exists(p) for p in entry["outputs"])
    for path in entry["inputs"] if complete else entry["outputs"]:
        if fs.exists(path):
            fs.rm_file(path)
    fs.rm_file(journal)
    return complete


def _compact_hour_object_store(fs: fsspec.AbstractFileSystem, root: str, protocol: str, day: str,
                               hour: int, hour_dir: str, max_rows: int) -> tuple[int, int, int]:
    inputs = _visible_parquet(fs, hour_dir)
    if not _needs_compaction(inputs):
        return 0, 0, 0
    token = uuid.uuid4().hex[:12]
    table = _merged(fs, inputs)
    outputs = [f"{hour_dir}/{COMPACTED_PREFIX}{token}-{n:03d}.parquet" for n in range(max(1, -(-table.num_rows // max_rows)))]
    journal = _journal_path(root, protocol, day, hour)
    fs.pipe_file(journal, json.dumps({"inputs": inputs, "outputs": outputs}).encode())
    written = _write_parts(fs, table, hour_dir, token, max_rows, inputs, atomic_rename=False)
    assert written == outputs, (written, outputs)
    for path in inputs:
        fs.rm_file(path)
    fs.rm_file(journal)
    return len(inputs), len(outputs), table.num_rows


# --------------------------------------------------------------------------------------------
# the entry points
# --------------------------------------------------------------------------------------------


def compact(url: str, now: datetime | None = None, grace: timedelta = DEFAULT_GRACE,
            max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE) -> CompactionResult:
    """Compact every closed hour of the dataset at `url`. Idempotent: a second run (or one after a
    crash) only finishes what is left."""
    now = now or datetime.now(timezone.utc)
    fs, root = filesystem(url)
    result = CompactionResult()
    if not fs.exists(root):
        return result
    local = is_local(fs)
    if local:
        date_dirs = {os.path.dirname(d) for *_, d in closed_hours(url, now, grace)}
        for date_dir in sorted(date_dirs):
            result.recovered += _recover_local(date_dir)
    else:
        for journal in sorted(p for p in fs.find(f"{root}/{JOURNAL_DIR}") if p.endswith(".json")) if fs.exists(f"{root}/{JOURNAL_DIR}") else []:
            _finish_journal(fs, journal)
            result.recovered += 1
    for protocol, day, hour, hour_dir in closed_hours(url, now, grace):
        if local:
            n_in, n_out, rows = _compact_hour_local(hour_dir, hour, max_rows_per_file)
        else:
            n_in, n_out, rows = _compact_hour_object_store(fs, root, protocol, day, hour, hour_dir, max_rows_per_file)
        if n_in:
            result.hours_compacted += 1
            result.files_in += n_in
            result.files_out += n_out
            result.rows += rows
            log.info("compacted %s: %d files -> %d (%d rows)", hour_dir, n_in, n_out, rows)
    return result


def apply_retention(url: str, retention_days: int, now: datetime | None = None) -> list[str]:
    """Drop every `date=` partition (all protocols) older than `retention_days` whole days before
    today (UTC); returns the partitions dropped."""
    now = now or datetime.now(timezone.utc)
    oldest_kept = (now - timedelta(days=retention_days)).date()
    fs, root = filesystem(url)
    dropped = []
    for proto_dir in _children(fs, root) if fs.exists(root) else []:
        if not os.path.basename(proto_dir).startswith("protocol="):
            continue
        for date_dir in _children(fs, proto_dir):
            m = _DATE_DIR.match(os.path.basename(date_dir))
            if not m or date.fromisoformat(m.group(1)) >= oldest_kept:
                continue
            if is_local(fs):
                hidden = os.path.join(proto_dir, f".drop-{os.path.basename(date_dir)}-{uuid.uuid4().hex[:8]}")
                os.rename(date_dir, hidden)  # the whole day disappears for readers in one step
                shutil.rmtree(hidden)
            else:
                fs.rm(date_dir, recursive=True)
            dropped.append(date_dir)
            log.info("retention: dropped %s (older than %d days)", date_dir, retention_days)
    if is_local(fs):  # leftovers of a drop interrupted before its rmtree finished
        for proto_dir in _children(fs, root) if fs.exists(root) else []:
            for leftover in (p for p in _children(fs, proto_dir) if os.path.basename(p).startswith(".drop-")):
                shutil.rmtree(leftover, ignore_errors=True)
    return dropped
