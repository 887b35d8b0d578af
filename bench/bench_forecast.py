"""Forecasting benchmark (issue 4): 1,000 series x 7 days at 1-minute resolution, horizon 60.

1. Generate the dataset with `sensorfleet generate` (the real signal model): 500 devices (250 MQTT,
   250 OPC UA) x 2 sensors (temperature, humidity) = 1,000 series, 10,080 steps each.
2. The default model: `sensorfleet forecast` in a child process, the whole job (read, prepare,
   harmonic model on 5 origins, SeasonalNaive baseline, evaluation, anomaly flags, plots, report):
   wall time and the child's peak RSS. Targets: <= 60 s, MASE <= 0.8 x SeasonalNaive's.
3. The reference, in the same run on the same data: statsmodels' ExponentialSmoothing (additive
   trend and season, seasonal_periods=1440), fitted on the same hold-out training data. It takes
   seconds per series, so it runs on a sample of --ets-sample series and its time is extrapolated
   per series to all 1,000 (stated in the output). Its MASE on the sample is reported too.

Run: `python bench/bench_forecast.py [--ets-sample N] [--keep DIR]`; writes bench/results/forecast.json
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import yaml
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()
HORIZON, DAYS, SEASON = 60, 7, 1440
START = "2026-11-01"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(), "platform": platform.platform(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def fleet_document() -> dict:
    from sensorfleet.spec import DEFAULT_SENSORS

    return {
        "apiVersion": "sensorfleet.io/v1alpha1",
        "kind": "SensorFleet",
        "metadata": {"name": "bench-forecast"},
        "spec": {
            "sensors": [s for s in DEFAULT_SENSORS if s["name"] in ("temperature", "humidity")],
            "protocols": {"mqtt": {"devices": 250, "interval": 60}, "opcua": {"enabled": True, "devices": 250, "interval": 60}, "coap": {"enabled": False}},
            "forecasting": {"horizon": HORIZON},
        },
    }


# The `sensorfleet` command of this interpreter's environment; on exit it prints its own peak RSS
# (KiB on Linux) as the last line of stderr, so each child is measured alone.
_SENSORFLEET = (
    "import resource, sys\n"
    "from sensorfleet.cli import app\n"
    "try:\n    app()\n"
    "finally:\n    print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def sensorfleet(*args: str) -> list[str]:
    return [sys.executable, "-c", _SENSORFLEET, *args]


def child_peak_rss_mib(stderr: str) -> float:
    line = [x for x in stderr.splitlines() if x.startswith("peak_rss_kib")][-1]
    return round(int(line.split()[1]) / 1024, 1)


def run_default_model(workdir: Path, fleet: Path, data: Path) -> dict:
    """`sensorfleet forecast` with the default model, in a child process: wall time, peak RSS."""
    out = workdir / "out"
    started = time.perf_counter()
    proc = subprocess.run(sensorfleet("forecast", "--data", str(data), "--out", str(out), "--fleet", str(fleet), "--quiet"), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"sensorfleet forecast failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": round(wall, 2), "peak_rss_mib": child_peak_rss_mib(proc.stderr), "metrics": metrics, "out": str(out)}


def reference_ets(data: Path, sample: int, seed: int) -> dict:
    """statsmodels ExponentialSmoothing on `sample` series: seconds per series and MASE vs SeasonalNaive."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    from sensorfleet.forecasting.load import read_readings
    from sensorfleet.forecasting.prepare import prepare

    panel = prepare(read_readings(str(data), DAYS), "1min", HORIZON, 3).panel
    origin = panel.n_steps - HORIZON
    rows = np.sort(np.random.default_rng(seed).choice(panel.n_series, size=min(sample, panel.n_series), replace=False))
    times, mases, naive_mases = [], [], []
    for row in rows:
        train, actual = panel.y[row, :origin], panel.y[row, origin:]
        train = train[~np.isnan(train)]
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = ExponentialSmoothing(train, trend="add", seasonal="add", seasonal_periods=SEASON, initialization_method="estimated").fit()
            forecast = fit.forecast(HORIZON)
        times.append(time.perf_counter() - started)
        scale = np.mean(np.abs(train[SEASON:] - train[:-SEASON]))
        naive = train[-SEASON:][np.arange(HORIZON) % SEASON]
        ok = ~np.isnan(actual)
        mase_ets = np.mean(np.abs(actual[ok] - forecast[ok])) / scale
        mase_naive = np.mean(np.abs(actual[ok] - naive[ok])) / scale
        mases.append(mase_ets)
        naive_mases.append(mase_naive)
    return {
        "model": "statsmodels ExponentialSmoothing(trend=add, seasonal=add, seasonal_periods=1440)",
        "sampled_series": [str(panel.ids["unique_id"].iat[r]) for r in rows],
        "s_per_series": round(float(np.mean(times)), 3),
        "s_per_series_each": [round(t, 3) for t in times],
        "extrapolated_1000_series_s": round(float(np.mean(times)) * 1000, 1),
        "mase_mean": round(float(np.mean(mases)), 4),
        "seasonalnaive_mase_mean": round(float(np.mean(naive_mases)), 4),
        "mase_vs_seasonalnaive": round(float(np.mean(mases) / np.mean(naive_mases)), 4),
        "note": f"timed on {len(rows)} sampled series (one fit + forecast each on the hold-out training data) and extrapolated per series to 1,000",
    }


def run(report: dict, ets_sample: int = 3, keep: Path | None = None) -> None:
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench-forecast-"))
    workdir.mkdir(parents=True, exist_ok=True)
    fleet = workdir / "fleet.yaml"
    fleet.write_text(yaml.safe_dump(fleet_document()))
    data = workdir / "data"
    report["machine"] = machine()

    console.print(f"generating 1,000 series x {DAYS} days at 1 minute into {data} ...")
    if not data.exists():
        started = time.perf_counter()
        subprocess.run(sensorfleet("generate", str(fleet), "--days", str(DAYS), "--data", str(data), "--start", START, "--quiet"), check=True, stdout=subprocess.DEVNULL)
        report["generate_s"] = round(time.perf_counter() - started, 2)

    console.print("default model: sensorfleet forecast (child process) ...")
    default = run_default_model(workdir, fleet, data)
    metrics = default.pop("metrics")
    head = metrics["headline"]
    stage = metrics["timings_s"].get(f"fit + forecast {head['model']}")
    origins = len(metrics["data"]["windows"])
    report["default_model"] = {
        "model": head["model"],
        "series": head["series"],
        "readings": metrics["data"]["readings"],
        "wall_s": default["wall_s"],
        "peak_rss_mib": default["peak_rss_mib"],
        "model_stage_s": stage,
        "model_fit_s_per_origin": round(stage / origins, 3) if stage else None,
        "origins": origins,
        "stage_timings_s": metrics["timings_s"],
        "mase": head["mase"],
        "mase_vs_seasonalnaive": head["mase_vs_baseline"],
        "cv_mase_vs_seasonalnaive": head["cv_mase_vs_baseline"],
        "baseline_mase": head["baseline_mase"],
        "anomaly_precision_recall": {k: metrics["anomalies"]["scored_windows"][k] for k in ("precision", "recall")},
    }

    console.print(f"reference: statsmodels ExponentialSmoothing on {ets_sample} sampled series ...")
    reference = reference_ets(data, ets_sample, seed=0)
    report["reference"] = reference
    per_origin = report["default_model"]["model_fit_s_per_origin"]
    report["headline"] = {
        "series": head["series"],
        "default_model": head["model"],
        "forecast_wall_s": default["wall_s"],
        "forecast_peak_rss_mib": default["peak_rss_mib"],
        "target_wall_s": 60,
        "meets_wall_target": default["wall_s"] <= 60,
        "mase_vs_seasonalnaive": head["mase_vs_baseline"],
        "target_mase_ratio": 0.8,
        "meets_mase_target": head["mase_vs_baseline"] is not None and head["mase_vs_baseline"] <= 0.8,
        "ets_reference_1000_series_s (extrapolated)": reference["extrapolated_1000_series_s"],
        "speedup_model_fit_vs_ets": round(reference["extrapolated_1000_series_s"] / per_origin, 1) if per_origin else None,
        "speedup_whole_job_vs_ets_fit": round(reference["extrapolated_1000_series_s"] / default["wall_s"], 1),
        "ets_mase_vs_seasonalnaive (sample)": reference["mase_vs_seasonalnaive"],
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def print_table(report: dict) -> None:
    table = Table(title="forecast benchmark: 1,000 series x 7 days at 1 min, horizon 60")
    table.add_column("figure")
    table.add_column("value", justify="right")
    d, r, h = report["default_model"], report["reference"], report["headline"]
    rows = [
        ("generate (sensorfleet generate)", f"{report.get('generate_s', 'reused')} s"),
        (f"default model ({d['model']}): whole forecast job", f"{d['wall_s']} s (target <= 60 s)"),
        ("  of which model fit+forecast, per origin", f"{d['model_fit_s_per_origin']} s ({d['origins']} origins)"),
        ("  peak RSS of the job", f"{d['peak_rss_mib']} MiB"),
        ("  MASE / SeasonalNaive (hold-out)", f"{d['mase_vs_seasonalnaive']} (target <= 0.8)"),
        ("  MASE / SeasonalNaive (3 CV windows)", f"{d['cv_mase_vs_seasonalnaive']}"),
        ("statsmodels ETS, s per series", f"{r['s_per_series']} s ({len(r['sampled_series'])} sampled)"),
        ("statsmodels ETS, 1,000 series (extrapolated)", f"{r['extrapolated_1000_series_s']} s"),
        ("speed-up, model fit vs ETS", f"{h['speedup_model_fit_vs_ets']}x"),
        ("speed-up, whole job vs ETS fits alone", f"{h['speedup_whole_job_vs_ets_fit']}x"),
        ("ETS MASE / SeasonalNaive (sample)", f"{r['mase_vs_seasonalnaive']}"),
        ("machine", f"{report['machine']['cpus']} CPUs, {report['machine']['memory_gib']} GiB, load {report['machine']['load_average_at_start']}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ets-sample", type=int, default=3, help="series fitted with statsmodels ETS (the reference); time is extrapolated per series")
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep (dataset reused when present)")
    args = parser.parse_args()
    report: dict = {}
    run(report, ets_sample=args.ets_sample, keep=args.keep)
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / "forecast.json"
    target.write_text(json.dumps(report, indent=2))
    print_table(report)
    console.print(f"wrote {target}")


if __name__ == "__main__":
    main()
