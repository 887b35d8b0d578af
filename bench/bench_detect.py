"""Anomaly-detection benchmark (issue 14): the ensemble on the fleet's labelled data, scored the NAB
way beside NAB's reference detectors (null, random, windowed Gaussian) in the same run.

1. `sensorfleet generate` writes --devices devices x 3 sensors x --days days at 1-minute readings of
   the default fleet (realism and every fault kind on, default rates) to a temporary dataset.
2. The dataset is read back as `sensorfleet detect` reads it; the ensemble and each of its
   detectors score every reading; throughput = readings / seconds of the ensemble, one process,
   BLAS and OpenMP pinned to one thread (single core).
3. NAB scores (standard, reward-low-FP, reward-low-FN; threshold optimised per profile over the
   corpus), event recall / precision per fault kind, and the reference detectors' scores and speed.

Run: `python bench/bench_detect.py [--devices 30] [--days 7]`; writes bench/results/detect.json.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"
console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=30)
    parser.add_argument("--days", type=float, default=7.0)
    args = parser.parse_args()

    from sensorfleet.detection import detectors, run as detect_run
    from sensorfleet.forecasting.load import read_readings

    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "sensorfleet.cli", "generate", str(FLEET), "--days", str(args.days), "--data", str(data),
                        "--interval", "60", "--devices", str(args.devices), "-p", "mqtt", "-q", "--start", "2026-11-02"], check=True, capture_output=True)
        readings = read_readings(str(data), args.days, None)
        frame = detect_run.series_from_readings(readings)
        # Throughput: the ensemble alone, best of 3 (the machine is shared).
        timings, cpu = [], []
        for _ in range(3):
            _, elapsed, spent = detect_run.score_series(frame)
            timings.append(elapsed)
            cpu.append(spent)
        parts, _, _ = detect_run.score_series(frame, with_parts=True)
        # "Before": the same ensemble without the ramp test (the drift detector added for issue 14),
        # scored in this run on these readings.
        before, _, before_cpu = detect_run.score_series(frame, detectors.DetectorSettings(ramp_weight=0.0))
        before_report = detect_run.nab_report(frame, {"ensemble": before["ensemble"]})
        started, started_cpu = time.perf_counter(), time.process_time()
        refs = detect_run.reference_scores(frame, seed=0)
        ref_seconds, ref_cpu = time.perf_counter() - started, time.process_time() - started_cpu
        report = detect_run.nab_report(frame, dict(parts, **refs))
    n = len(frame.values)
    result = {
        "benchmark": "detect",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average_at_start": load_start, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "data": {"devices": args.devices, "days": args.days, "series": int(len(frame.keys)), "readings": n, "interval_s": 60, "labelled_windows": report["windows"]},
        "throughput": {"ensemble_readings_per_s": round(n / min(timings)), "ensemble_seconds": [round(t, 3) for t in timings],
                       "ensemble_readings_per_cpu_s": round(n / min(cpu)), "ensemble_cpu_seconds": [round(t, 3) for t in cpu],
                       "references_readings_per_s": round(n / ref_seconds), "references_readings_per_cpu_s": round(n / ref_cpu)},
        "nab": report,
        "before_ramp": {"nab": before_report["detectors"]["ensemble"], "per_kind": before_report["per_kind"],
                        "readings_per_cpu_s": round(n / before_cpu)},
        "default_threshold": detect_run.DEFAULT_THRESHOLD,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "detect.json").write_text(json.dumps(result, indent=2, default=float))
    table = Table(title=f"NAB scores, {len(frame.keys)} series x {args.days:g} days ({n:,} readings, {report['windows']} windows)")
    for column in ("detector", "standard", "reward low FP", "reward low FN", "threshold (std)"):
        table.add_column(column, justify="right")
    for name, profiles in report["detectors"].items():
        table.add_row(name, *(f"{profiles[p]['score']:.1f}" for p in ("standard", "reward_low_fp", "reward_low_fn")), f"{profiles['standard']['threshold']:.3f}")
    console.print(table)
    kinds = Table(title="ensemble per fault kind at its standard threshold: without the ramp test (before) -> with it")
    for column in ("kind", "events", "recall before", "recall", "precision before", "precision"):
        kinds.add_column(column, justify="right")

    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    old_kinds = result["before_ramp"]["per_kind"]
    for kind, row in report["per_kind"].items():
        if not kind.startswith("_"):
            was = old_kinds.get(kind, {})
            kinds.add_row(kind, str(row["events"]), show(was.get("recall")), show(row["recall"]), show(was.get("precision")), show(row["precision"]))
    kinds.add_row("NAB standard", "", f"{result['before_ramp']['nab']['standard']['score']:.1f}", f"{report['detectors']['ensemble']['standard']['score']:.1f}", "", "")
    console.print(kinds)
    t = result["throughput"]
    console.print(f"ensemble: {t['ensemble_readings_per_cpu_s']:,} readings per CPU-second on one core ({t['ensemble_readings_per_s']:,}/s wall, best of 3); "
                  f"the three reference detectors together: {t['references_readings_per_cpu_s']:,} per CPU-second; load {load_start} -> {result['machine']['load_average_at_end']}")


if __name__ == "__main__":
    main()
