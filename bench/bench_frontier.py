"""Forecast accuracy-time frontier on the realistic default signal (issue 14, item 4).

A stated random sample of --series series of the default fleet (realism and faults on, 1-minute
readings, resampled to 1 hour: statsforecast's seasonal models need seasons of tens, not 1,440),
--days days; every model fits on all but the last 24 hours and forecasts them (horizon 24):
the default Harmonic regression, SeasonalNaive, and statsforecast's AutoETS, AutoARIMA, MSTL
(daily + weekly seasons) and AutoTheta. Accuracy: MASE (scale: in-sample seasonal-naive MAE).
Time: wall seconds of each model's fit + forecast on the sample, one process; the time for all
series of a fleet is extrapolated per series. Writes bench/results/frontier.json and frontier.png.

Run: `python bench/bench_frontier.py [--series 100] [--days 14]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"
H, SEASON = 24, 24


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=100)
    parser.add_argument("--days", type=float, default=14.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="SeasonalNaive,AutoETS,AutoTheta,MSTL,AutoARIMA", help="statsforecast models to fit beside Harmonic (AutoARIMA takes > 7 min on 100 series on a loaded 2-core machine)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from statsforecast import StatsForecast
    from statsforecast.models import MSTL, AutoARIMA, AutoETS, AutoTheta, SeasonalNaive

    from sensorfleet.forecasting.models import HarmonicRegression, filled_for_fitting, long_frame
    from sensorfleet.forecasting.load import read_readings
    from sensorfleet.forecasting.prepare import finish_prepare, resample

    load_start = [round(x, 2) for x in os.getloadavg()]
    devices = int(np.ceil(args.series / 3))
    with tempfile.TemporaryDirectory(prefix="bench-frontier-") as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "sensorfleet.cli", "generate", str(FLEET), "--days", str(args.days), "--data", str(data),
                        "--interval", "60", "--devices", str(devices), "-p", "mqtt", "-q", "--start", "2026-11-02"], check=True, capture_output=True)
        readings = read_readings(str(data), args.days, None)
        panel = finish_prepare(resample(readings, "1h"), len(readings), H, 1).panel
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(panel.n_series, size=min(args.series, panel.n_series), replace=False))
    panel = panel.subset(rows)
    origin = panel.n_steps - H
    actual = panel.raw[:, origin:]
    train = filled_for_fitting(panel.y[:, :origin])
    scale = np.nanmean(np.abs(train[:, SEASON:] - train[:, :-SEASON]), axis=1)

    def mase(mean: np.ndarray) -> float:
        err = np.nanmean(np.abs(actual - mean), axis=1) / scale
        return float(np.nanmean(err))

    results = {}
    started = time.perf_counter()
    block, _ = HarmonicRegression().fit_predict(panel, origin, H, 95)
    results["Harmonic"] = {"mase": mase(block.mean), "seconds": time.perf_counter() - started}
    print(f"Harmonic: MASE {results['Harmonic']['mase']:.3f} in {results['Harmonic']['seconds']:.1f} s", flush=True)
    # The same model with calendar features (a weekend level and daily profile), same sample.
    started = time.perf_counter()
    block, _ = HarmonicRegression(calendar=True).fit_predict(panel, origin, H, 95)
    results["Harmonic+calendar"] = {"mase": mase(block.mean), "seconds": time.perf_counter() - started}
    print(f"Harmonic+calendar: MASE {results['Harmonic+calendar']['mase']:.3f} in {results['Harmonic+calendar']['seconds']:.1f} s", flush=True)
    frame = long_frame(panel, origin)
    candidates = {
        "SeasonalNaive": SeasonalNaive(season_length=SEASON),
        "AutoETS": AutoETS(season_length=SEASON),
        "AutoTheta": AutoTheta(season_length=SEASON),
        "MSTL": MSTL(season_length=[SEASON, 7 * SEASON], trend_forecaster=AutoETS(model="ZZN")),
        "AutoARIMA": AutoARIMA(season_length=SEASON),
    }
    chosen = [m for m in args.models.split(",") if m]
    for name in chosen:
        model = candidates[name]
        started = time.perf_counter()
        out = StatsForecast(models=[model], freq=panel.freq, n_jobs=1).forecast(df=frame, h=H)
        seconds = time.perf_counter() - started
        column = [c for c in out.columns if c not in ("unique_id", "ds")][0]
        mean = np.full((panel.n_series, H), np.nan)
        rank = out.groupby("unique_id", sort=False).cumcount().to_numpy()
        mean[out["unique_id"].to_numpy().astype(int), rank] = out[column].to_numpy()
        results[name] = {"mase": mase(mean), "seconds": seconds}
        print(f"{name}: MASE {results[name]['mase']:.3f} in {seconds:.1f} s", flush=True)
    for r in results.values():
        r["seconds_per_series"] = r["seconds"] / panel.n_series
        r["extrapolated_seconds_1000_series"] = r["seconds_per_series"] * 1000
        r["mase"], r["seconds"] = round(r["mase"], 4), round(r["seconds"], 3)
    pareto = []
    for name, r in sorted(results.items(), key=lambda kv: kv[1]["seconds"]):
        if not pareto or r["mase"] < results[pareto[-1]]["mase"]:
            pareto.append(name)
    result = {
        "benchmark": "frontier", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sample": {"series": int(panel.n_series), "of": int(devices * 3), "seed": args.seed, "days": args.days, "frequency": "1h", "horizon": H},
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "models": results, "pareto_front": pareto,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "frontier.json").write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.scatter(r["seconds_per_series"], r["mase"], color="tab:green" if name in pareto else "tab:grey")
        ax.annotate(name, (r["seconds_per_series"], r["mase"]), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per series (fit + forecast)")
    ax.set_ylabel("MASE (hold-out, 24 h)")
    ax.set_title("accuracy-time frontier, realistic signal (green: Pareto front)", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "frontier.png", dpi=100)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
