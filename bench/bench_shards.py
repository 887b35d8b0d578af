"""Per-shard cost of sharded forecasting (issue 14: the 1 M-series plan in docs/forecasting.md).

1. `sensorfleet generate` writes --devices devices x 3 sensors (MQTT) x --days days at 1-minute
   readings of the default fleet to a temporary dataset (10,002 series at the defaults).
2. For each N in --shards, shard 0 of N runs as `sensorfleet forecast --shard 0/N
   --merge-when-done` in a child process (what one pod of the Indexed Job runs): wall seconds,
   CPU seconds, peak RSS, and the stage timings the run records in its metrics.json.
3. The split of a shard's cost comes from its stage timings: "read dataset" scans every reading
   of the window (each shard filters the whole dataset), the later stages grow with the shard's
   series. Two values of N on the same data give the per-series slope and the fixed part.

4. A whole `--jobs 2` run (shards + merge) on --merge-devices devices: the merge's time and memory.

Run: `python bench/bench_shards.py [--devices 3334] [--days 2] [--shards 20,5] [--merge-devices 334]`;
writes bench/results/shards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"


def run_child(args: list[str]) -> dict[str, float]:
    """Run `sensorfleet ARGS` in a child process: wall and CPU seconds, peak RSS of the child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sensorfleet.cli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"sensorfleet {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 2),
            # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: run the smallest first.
            "peak_rss_mib_children_so_far": round(after.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=3334)
    parser.add_argument("--days", type=float, default=2.0)
    parser.add_argument("--shards", default="20,5", help="N of the shards measured (shard 0 of each), largest N first")
    parser.add_argument("--merge-devices", type=int, default=334, help="devices of the fleet a whole `--jobs 2` run (with the merge) is measured on; 0: skip")
    args = parser.parse_args()
    load_start = [round(x, 2) for x in os.getloadavg()]
    result: dict = {"benchmark": "shards", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average_at_start": load_start}}
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        data = Path(tmp) / "data"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sensorfleet.cli", "generate", str(FLEET), "--days", str(args.days), "--data", str(data),
                        "--interval", "60", "--devices", str(args.devices), "-p", "mqtt", "-q", "--start", "2026-11-02"], check=True, capture_output=True)
        size = sum(f.stat().st_size for f in data.rglob("*.parquet"))
        result["data"] = {"devices": args.devices, "series": args.devices * 3, "days": args.days, "readings": args.devices * 3 * int(args.days * 1440),
                          "parquet_mib": round(size / 2**20, 1), "generate_s": round(time.perf_counter() - started, 1)}
        print(f"dataset: {result['data']}", flush=True)
        result["shards"] = {}
        for count in (int(n) for n in args.shards.split(",")):
            out = Path(tmp) / f"out-{count}"
            measured = run_child(["forecast", "--data", str(data), "--out", str(out), "--window-days", str(args.days), "--shard", f"0/{count}",
                                  "--merge-when-done", "--run-id", f"bench-{count}", "--quiet"])
            metrics = json.loads((out / "shards" / "0" / "metrics.json").read_text())
            measured.update({"series": metrics["data"]["series"], "readings_kept": metrics["data"]["readings"],
                             "peak_rss_mib": metrics["peak_rss_mb"]["total"], "stages_s": metrics["timings_s"]})
            result["shards"][f"0/{count}"] = measured
            print(f"shard 0/{count}: {measured}", flush=True)
        if args.merge_devices:
            # 4. A whole sharded run (`--jobs 2`: two shard processes, then the merge in the parent)
            # on a smaller fleet, for the merge's own time and memory.
            small = Path(tmp) / "small"
            subprocess.run([sys.executable, "-m", "sensorfleet.cli", "generate", str(FLEET), "--days", str(args.days), "--data", str(small),
                            "--interval", "60", "--devices", str(args.merge_devices), "-p", "mqtt", "-q", "--start", "2026-11-02"], check=True, capture_output=True)
            out = Path(tmp) / "out-merge"
            measured = run_child(["forecast", "--data", str(small), "--out", str(out), "--window-days", str(args.days), "--jobs", "2", "--quiet"])
            metrics = json.loads((out / "metrics.json").read_text())
            merge_stages = {k: v for k, v in metrics["timings_s"].items() if not k.startswith("shards")}
            measured.update({"series": metrics["data"]["series"], "merge_stages_s": merge_stages, "merge_peak_rss_mib": metrics["peak_rss_mb"]["total"],
                             "shards": metrics["shards"]})
            result["merge"] = measured
            print(f"--jobs 2 on {metrics['data']['series']} series: {measured}", flush=True)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shards.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
