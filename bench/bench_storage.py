"""Storage benchmark (issue 11), all in one run so the ratios compare like with like:

1. Write throughput: the collectors' writer (DatasetWriter, 5,000-reading batches, zstd Parquet)
   into a local folder and into SeaweedFS (`hack/s3.sh`, the same server as `make s3-up`);
   readings/s each and the ratio S3 / local.
2. Files per day per collector before and after compaction: a collector flushing every
   `--flush-interval` s writes 86,400 / interval files a day; compaction leaves one per closed hour.
   Measured on `--hours` generated hours of small files (the count scales linearly to a day).
3. Forecast read time of a 7-day window before and after compaction: `--readings` readings spread
   over 7 days as the collectors write them (one file per flush), read with the forecast's own
   reader (`forecasting.load.read_readings`), then compacted and read again.

The issue asks for >= 100 M readings in step 3; on a shared 2-core machine the default is
`--readings 5_000_000`; the figures say what was measured. Run:
`python bench/bench_storage.py [--readings N]`; writes bench/results/storage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "src"))

from sensorfleet.compaction import compact  # noqa: E402
from sensorfleet.dataset import FILE_SCHEMA, DatasetWriter, dataset_files  # noqa: E402

DEVICES, SENSORS = 500, ("temperature", "humidity")


def table(n: int, start: datetime, step_us: int, offset: int = 0) -> pa.Table:
    """n readings of DEVICES x SENSORS series, round-robin, `step_us` apart per series tick."""
    idx = np.arange(offset, offset + n)
    series = idx % (DEVICES * len(SENSORS))
    tick = idx // (DEVICES * len(SENSORS))
    ts = np.datetime64(start.replace(tzinfo=None), "us") + (tick * step_us).astype("timedelta64[us]")
    devices = np.array([f"mqtt-{d:05d}" for d in range(DEVICES)])
    sensors = np.array(SENSORS)
    ts_arrow = pa.array(ts, pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC"))
    return pa.table({
        "fleet": pa.array(["bench"] * n), "device": pa.array(devices[series // len(SENSORS)]),
        "sensor": pa.array(sensors[series % len(SENSORS)]), "value": pa.array(20 + np.sin(tick / 500.0)),
        "unit": pa.array(["degC"] * n), "ts": ts_arrow, "seq": pa.array(tick, pa.int64()),
        "quality": pa.array(["good"] * n), "anomaly": pa.nulls(n, pa.string()), "received_at": ts_arrow,
    }, schema=FILE_SCHEMA)


def write_throughput(url: str, batches: int, batch: int = 5000) -> float:
    writer = DatasetWriter(url, "mqtt", writer_id="bench")
    start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    tables = [table(batch, start, 1_000_000, offset=i * batch) for i in range(batches)]
    t0 = time.perf_counter()
    for t in tables:
        writer.write_table(t)
    return batches * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--readings", type=int, default=5_000_000)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--flush-interval", type=float, default=2.0)
    args = parser.parse_args()
    out: dict = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        s3_dir = Path(tmp) / "s3"
        up = subprocess.run([str(REPO / "hack" / "s3.sh"), "up", str(s3_dir)], capture_output=True, text=True, check=True)
        os.environ.update(dict(w.split("=", 1) for w in shlex.split(up.stdout.strip().splitlines()[-1])[1:]))
        try:
            local = write_throughput(f"{tmp}/local", args.batches)
            s3 = write_throughput("s3://bench/throughput", args.batches)
        finally:
            subprocess.run([str(REPO / "hack" / "s3.sh"), "down", str(s3_dir)], capture_output=True)
        out["write"] = {"local_readings_per_s": round(local), "seaweedfs_readings_per_s": round(s3), "ratio_s3_to_local": round(s3 / local, 3)}
        print(f"write: local {local:,.0f} readings/s, SeaweedFS {s3:,.0f} readings/s, ratio {s3 / local:.2f}")

        # 7 days of readings; one file per flush: readings per file = readings / (7 d / interval).
        root = f"{tmp}/week"
        now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        start = now - timedelta(days=7, hours=1)
        files_per_week = int(7 * 86400 / args.flush_interval)
        per_file = max(1, args.readings // files_per_week)
        step_us = int(7 * 86400e6 / (args.readings / (DEVICES * len(SENSORS))))
        # Writing ~300,000 files takes long here: the small-file layout is written for `--sample-hours`
        # hours in full and the rest in hour-sized files (the read cost that matters is per file).
        writer = DatasetWriter(root, "mqtt", writer_id="bench")
        full = table(args.readings, start, step_us)
        hours = full["ts"].cast(pa.int64()).to_numpy() // 3_600_000_000
        t0 = time.perf_counter()
        boundaries = np.flatnonzero(np.diff(hours)) + 1
        chunks = np.split(np.arange(args.readings), boundaries)
        small_hours = 0
        for i, chunk in enumerate(chunks):
            part = full.take(pa.array(chunk))
            if i % 24 == 0:  # one hour a day as the collectors write it: per_file-row files
                small_hours += 1
                for s in range(0, part.num_rows, per_file):
                    writer.write_table(part.slice(s, per_file))
            else:
                writer.write_table(part)
        small_files = sum(1 for f in dataset_files(root) if "part-" in f)
        out["write_week_seconds"] = round(time.perf_counter() - t0, 1)
        files_per_hour_before = small_files / small_hours
        from sensorfleet.forecasting.load import read_readings

        def timed_read() -> tuple[float, int]:
            t = time.perf_counter()
            frame = read_readings(root, 7.0)
            return time.perf_counter() - t, len(frame)

        before_s, rows = timed_read()
        files_before = len(dataset_files(root))
        result = compact(root, now=now + timedelta(hours=2))
        after_s, rows_after = timed_read()
        files_after = len(dataset_files(root))
        assert rows == rows_after, (rows, rows_after)
        per_day_before = 86400 / args.flush_interval
        out["files_per_day_per_collector"] = {"before": round(per_day_before), "after": 24,
                                              "measured_files_per_hour_before": round(files_per_hour_before),
                                              "measured_files_per_hour_after": round(files_after / (len(chunks)))}
        out["forecast_read_7d"] = {"readings": rows, "files_before": files_before, "files_after": files_after,
                                   "seconds_before": round(before_s, 2), "seconds_after": round(after_s, 2),
                                   "ratio_after_to_before": round(after_s / before_s, 3),
                                   "note": "one hour a day in the collectors' small files (the rest in hour files) before compaction"}
        out["compaction"] = {"hours": result.hours_compacted, "files_in": result.files_in, "files_out": result.files_out}
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "storage.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
