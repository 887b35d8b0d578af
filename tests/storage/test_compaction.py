"""Compaction and retention: closed hours become one sorted file; SIGKILL at any point loses and
duplicates nothing; a reader never sees both or neither; old days are dropped whole."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from sensorfleet.compaction import apply_retention, compact
from sensorfleet.dataset import FILE_SCHEMA, DatasetWriter, dataset_files, read_dataset

HOURS = 6
DEVICES = [f"mqtt-{i:05d}" for i in range(4)]
SENSORS = ["temperature", "humidity"]


def small_files_dataset(root: Path, start: datetime, hours: int = HOURS, per_file: int = 60) -> int:
    """A collector's output: readings every 10 s for `hours` hours, one small file per flush
    (batches arrive interleaved across devices, as on the wire). Returns the row count."""
    writer = DatasetWriter(str(root), "mqtt", writer_id="test")
    ticks = hours * 360
    rows = []
    for tick in range(ticks):
        ts = start + timedelta(seconds=10 * tick)
        for device in DEVICES:
            for sensor in SENSORS:
                rows.append((device, sensor, 20.0 + tick % 7, ts, tick))
    for i in range(0, len(rows), per_file):
        chunk = rows[i:i + per_file]
        columns = {f.name: [] for f in FILE_SCHEMA}
        for device, sensor, value, ts, seq in chunk:
            for name, v in (("fleet", "demo"), ("device", device), ("sensor", sensor), ("value", value), ("unit", "degC"),
                            ("ts", ts), ("seq", seq), ("quality", "good"), ("anomaly", None), ("received_at", ts)):
                columns[name].append(v)
        writer.write_table(pa.table(columns, schema=FILE_SCHEMA))
    return len(rows)


def keys(root: Path) -> pd.DataFrame:
    df = pd.read_parquet(root, columns=["device", "sensor", "seq"])  # what a plain pandas user sees
    return df.astype({"device": str, "sensor": str}).sort_values(["device", "sensor", "seq"]).reset_index(drop=True)


def hidden_leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".")]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, int, datetime]:
    root = tmp_path_factory.mktemp("pristine") / "data"
    start = (datetime.now(timezone.utc) - timedelta(hours=HOURS + 2)).replace(minute=0, second=0, microsecond=0)
    n = small_files_dataset(root, start)
    return root, n, start


def copy_of(pristine, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(pristine[0], root)
    return root


def test_closed_hours_become_one_file_sorted_by_device_and_time(pristine, tmp_path):
    root = copy_of(pristine, tmp_path)
    before = keys(root)
    files_before = len(dataset_files(str(root)))
    assert files_before >= HOURS * 40

    result = compact(str(root))

    assert result.hours_compacted == HOURS and result.files_in == files_before and result.rows == pristine[1]
    files = dataset_files(str(root))
    assert len(files) == HOURS and all(os.path.basename(f).startswith("compacted-") for f in files)
    pd.testing.assert_frame_equal(keys(root), before)
    one = pd.read_parquet(files[0])
    assert one[["device", "sensor", "ts"]].equals(one.sort_values(["device", "sensor", "ts"])[["device", "sensor", "ts"]])
    assert not hidden_leftovers(root)
    # A re-run has nothing to do, and the partitions still read with the dataset's own reader.
    again = compact(str(root))
    assert again.hours_compacted == 0 and len(dataset_files(str(root))) == HOURS
    assert len(read_dataset(str(root))) == pristine[1]


def test_the_open_hour_and_the_grace_period_are_left_alone(tmp_path):
    root = tmp_path / "data"
    now = datetime.now(timezone.utc)
    # Two files in the current hour (still being written) and two in an hour that ended 1 min ago.
    small_files_dataset(root, now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1), hours=1, per_file=1500)
    open_hour = now.replace(minute=0, second=0, microsecond=0)
    small_files_dataset(root, open_hour, hours=1, per_file=1500)
    files = dataset_files(str(root))
    result = compact(str(root), now=open_hour + timedelta(minutes=5))  # the last hour closed 5 min ago
    assert result.hours_compacted == 0 and dataset_files(str(root)) == files
    result = compact(str(root), now=open_hour + timedelta(minutes=11))
    assert result.hours_compacted == 1
    assert sum(os.path.basename(f).startswith("compacted-") for f in dataset_files(str(root))) == 1


def test_sigkill_at_any_point_loses_and_duplicates_nothing(pristine, tmp_path):
    """Kill `sensorfleet compact` at many points (before, while merging, around the swap, while
    cleaning up); after each kill a plain pandas read has exactly the original keys, and a re-run
    finishes the job with the same keys."""
    root = copy_of(pristine, tmp_path)
    before = keys(root)
    cli = [sys.executable, "-m", "sensorfleet.cli", "compact", "--data", str(root)]
    rng = random.Random(11)
    kills = 0
    for attempt in range(10):
        proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill once the work has started (a staging folder exists), at a random offset into it.
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(".compact-") for p in root.glob("protocol=*/date=*/*")):
                break
            time.sleep(0.005)
        # Small offsets: on an idle machine a whole run takes well under a second after staging.
        time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        pd.testing.assert_frame_equal(keys(root), before, obj=f"after kill {attempt}")
        if not any(not os.path.basename(f).startswith("compacted-") for f in dataset_files(str(root))):
            break  # everything got compacted before a kill landed
    assert kills >= 3, "the compaction finished before most kills: make the dataset bigger"
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    pd.testing.assert_frame_equal(keys(root), before)
    files = dataset_files(str(root))
    assert len(files) == HOURS and all(os.path.basename(f).startswith("compacted-") for f in files)
    assert not hidden_leftovers(root)


def test_a_reader_never_sees_both_or_neither(pristine, tmp_path):
    root = copy_of(pristine, tmp_path)
    expected = pristine[1]
    seen: list[int] = []
    stop = threading.Event()

    def read_forever():
        while not stop.is_set():
            try:
                seen.append(len(pd.read_parquet(root, columns=["seq"])))
            except (FileNotFoundError, OSError):
                continue  # a file listed before the swap is gone when opened: the reader retries

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        compact(str(root))
        time.sleep(0.2)
    finally:
        stop.set()
        reader.join(timeout=60)
    assert seen and set(seen) == {expected}, f"reads saw row counts {sorted(set(seen))}, expected only {expected}"


def test_retention_drops_whole_old_days(tmp_path):
    root = tmp_path / "data"
    now = datetime.now(timezone.utc)
    for days_ago in (0, 1, 5, 9):
        small_files_dataset(root, (now - timedelta(days=days_ago)).replace(hour=3, minute=0, second=0, microsecond=0), hours=1, per_file=2000)
    days = sorted({f.split("date=")[1][:10] for f in dataset_files(str(root))})
    assert len(days) == 4

    cli = subprocess.run([sys.executable, "-m", "sensorfleet.cli", "compact", "--data", str(root), "--retention-days", "7"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert "dropped 1 partition" in cli.stdout
    assert sorted({f.split("date=")[1][:10] for f in dataset_files(str(root))}) == days[1:]

    dropped = apply_retention(str(root), retention_days=3, now=now)
    assert [d.split("date=")[1] for d in dropped] == days[1:2]
    assert sorted({f.split("date=")[1][:10] for f in dataset_files(str(root))}) == days[2:]
    assert len(read_dataset(str(root))) == 2 * 360 * len(DEVICES) * len(SENSORS)
    assert not hidden_leftovers(root)
