"""`sensorfleet forecast-merge`: N shard outputs -> one OUT with the same content as one run.

Every figure of metrics.json is a function of per-series rows (scores, forecast-table rows,
cleaning counts), so the merge recomputes them from the shards' tables with the functions the
unsharded run uses (`evaluate.summarise_scores`, `anomalies.summarise_flags`), in the same row
order; `tests/forecasting/test_merge.py` checks that the outputs equal an unsharded run's.

The plots need the history of a few sampled series and the fleet overview: the merge picks the
same series as a run over every series would (seeded, over the merged ids), reads just those
series from the dataset again (a device filter on the Parquet scan), and draws the overview from
the coarse rows each shard wrote (`overview.npz`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sensorfleet.events import read_events
from sensorfleet.forecasting import anomalies, animation, evaluate, plots
from sensorfleet.forecasting.errors import ForecastInputError
from sensorfleet.forecasting.models import BASELINE
from sensorfleet.forecasting.pipeline import ForecastRun, Progress, build_metrics, choose_plot_rows, device_events_summary, write_outputs
from sensorfleet.forecasting.load import read_selected
from sensorfleet.forecasting.prepare import CleaningReport, Panel, finish_prepare, resample
from sensorfleet.forecasting.shards import MANIFEST, SHARDS_DIR, series_filter

# Options that differ between the shards of one run, or between a shard and the merged run.
PER_SHARD_OPTIONS = ("out", "shard", "for_merge", "run_id", "n_jobs")
SUMMED_CLEANING = ("series", "readings", "missing_cells", "interpolated_cells", "stuck_cells", "spike_cells", "long_gaps", "long_gap_cells")
GRID = ("steps", "frequency", "season", "start", "end", "windows")
ID_COLUMNS = ["unique_id", "protocol", "device", "sensor", "unit"]


def find_shards(root: Path, run_id: str | None = None) -> dict[int, Path]:
    """Complete shard directories under `root` (OUT/shards) of one run, every index once: run
    `run_id`, or the run of the newest manifest. Directories of other runs are ignored."""
    paths = sorted(Path(root).glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime) if Path(root).is_dir() else []
    if not paths:
        raise ForecastInputError(f"--shards {root}: no complete shard (no */{MANIFEST}); run `sensorfleet forecast --shard i/N --merge-when-done` first")
    manifests = {p.parent: json.loads(p.read_text()) for p in paths}
    newest = manifests[paths[-1].parent]
    run_id = newest.get("run_id") if run_id is None else run_id
    mine = {path: m for path, m in manifests.items() if m.get("run_id") == run_id}
    if not mine:
        raise ForecastInputError(f"--shards {root}: no shard of run {run_id!r}")
    count = next(iter(mine.values()))["count"]
    shards: dict[int, Path] = {}
    for path, m in mine.items():
        if m["count"] != count:
            raise ForecastInputError(f"{path / MANIFEST}: shard {m['index']}/{m['count']} but other shards of run {run_id!r} are of N={count}")
        shards[m["index"]] = path
    missing = sorted(set(range(count)) - set(shards))
    if missing:
        raise ForecastInputError(f"--shards {root}: shard(s) {', '.join(f'{i}/{count}' for i in missing)} of run {run_id!r} not complete (no {MANIFEST})")
    return dict(sorted(shards.items()))


def merge_cleaning(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The cleaning report of all series from the shards' reports (counts add; the longest gaps
    and dropped series keep the order one run gives them: by length, then series)."""
    merged = CleaningReport().as_dict()
    for key in SUMMED_CLEANING:
        merged[key] = sum(int(r[key]) for r in reports)
    merged["steps"], merged["max_gap_steps"] = reports[0]["steps"], reports[0]["max_gap_steps"]
    gaps = [g for r in reports for g in r["long_gap_examples"]]
    merged["long_gap_examples"] = sorted(gaps, key=lambda g: (-g["steps"], g["unique_id"], g["start"]))[:20]
    merged["dropped_series"] = sorted(s for r in reports for s in r["dropped_series"])
    merged["detector_scores"] = {}
    for name in reports[0]["detector_scores"]:
        flagged = sum(r["detector_scores"][name]["flagged"] for r in reports)
        true = sum(r["detector_scores"][name]["true"] for r in reports)
        tp = sum(r["detector_scores"][name]["true_positives"] for r in reports)
        merged["detector_scores"][name] = {
            "flagged": flagged, "true": true, "true_positives": tp,
            "precision": round(tp / flagged, 4) if flagged else None,
            "recall": round(tp / true, 4) if true else None,
        }
    return merged


def _check_same_run(shards: dict[int, Path], metrics: dict[int, dict[str, Any]]) -> None:
    first = metrics[min(metrics)]
    for index, m in metrics.items():
        for key in GRID:
            if m["data"][key] != first["data"][key]:
                raise ForecastInputError(f"{shards[index] / 'metrics.json'}: data.{key} is {m['data'][key]!r} but shard 0 has {first['data'][key]!r}; "
                                         "the shards read different windows (was data still arriving?); run them on one snapshot")
        for key, value in m["options"].items():
            if key not in PER_SHARD_OPTIONS and value != first["options"].get(key):
                raise ForecastInputError(f"{shards[index] / 'metrics.json'}: option {key} is {value!r} but shard 0 has {first['options'].get(key)!r}")


def _sub_panel(options: dict[str, Any], uids: list[str], span: list[str], cleaning: dict[str, Any]) -> Panel:
    """The panel of just these series, read again from the dataset and prepared as a full run
    prepares them (same grid, the same per-series cleaning)."""
    devices = sorted({u.split("/")[1] for u in uids})
    readings, _ = read_selected(options["data"], options["window_days"], options["protocols"], keep=series_filter(uids), devices=devices)
    panel = resample(readings, options["frequency"], span=(pd.Timestamp(span[0]), pd.Timestamp(span[1])))
    max_gap = panel.step * cleaning["max_gap_steps"]
    return finish_prepare(panel, len(readings), options["horizon"], options["cv_windows"], max_gap=max_gap.to_pytimedelta(), drop_short=True).panel


def merge_shards(root: Path, out: Path, progress: Progress | None = None, run_id: str | None = None) -> ForecastRun:
    """Merge the shards of one run (`run_id`, default the newest) under `root` (OUT/shards) into `out`."""
    progress = progress or Progress(enabled=False)
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with progress.running():
        with progress.stage("read shard outputs") as advance:
            shards = find_shards(root, run_id)
            manifests = manifests_all = {i: json.loads((p / MANIFEST).read_text()) for i, p in shards.items()}
            # A shard no series hashes to (N > series) wrote only its manifest.
            shards = {i: p for i, p in shards.items() if not manifests[i].get("empty")}
            if not shards:
                raise ForecastInputError(f"--shards {root}: every shard is empty (no series in the dataset)")
            manifests = {i: manifests[i] for i in shards}
            metrics = {i: json.loads((p / "metrics.json").read_text()) for i, p in shards.items()}
            _check_same_run(shards, metrics)
            table = pd.concat([pd.read_parquet(p / "forecasts.parquet") for p in shards.values()], ignore_index=True)
            per_series = pd.concat([pd.read_csv(p / "metrics_by_series.csv") for p in shards.values()], ignore_index=True)
        lead = min(shards)
        first, options = metrics[lead], dict(metrics[lead]["options"])
        model, models, level = manifests[lead]["model"], manifests[lead]["models"], int(options["level"])
        with progress.stage("merge tables") as advance:
            ids = table[ID_COLUMNS].drop_duplicates("unique_id").sort_values("unique_id", kind="stable").reset_index(drop=True)
            sid = pd.Series(np.arange(len(ids)), index=ids["unique_id"])
            # One run's order: window (by origin), series, step.
            window_rank = {label: i for i, label in enumerate(first["data"]["windows"])}
            table.insert(0, "sid", sid.loc[table["unique_id"]].to_numpy())
            order = np.lexsort((table["step"].to_numpy(), table["sid"].to_numpy(), table["window"].map(window_rank).to_numpy()))
            table = table.iloc[order].reset_index(drop=True)
            table["ds"] = table["ds"].dt.tz_convert(None)
            table["cutoff"] = table["cutoff"].dt.tz_convert(None)
            per_series.insert(1, "sid", sid.loc[per_series["unique_id"]].to_numpy())
            per_split = {split: rows.drop(columns="split").reset_index(drop=True) for split, rows in per_series.groupby("split", sort=False)}
            per_split = {split: per_split[split] for split in ("holdout", "cv") if split in per_split}
            scores = evaluate.summarise_scores(per_split, manifests[lead]["windows"], ids, models, BASELINE)
            flagged = anomalies.summarise_flags(table, model, level)
            cleaning = merge_cleaning([m["cleaning"] for m in metrics.values()])
        with progress.stage("plots", 1) as advance:
            rows = choose_plot_rows(ids, int(options["plot_series"]), int(options["seed"]))
            # A full run animates the first series (in id order) with the most faults, else its first series.
            faults, film_uid = min((-m["animation"]["faults"], m["animation"]["unique_id"]) for m in manifests.values())
            film_uid = film_uid if faults else str(ids["unique_id"].iat[0])
            needed = sorted(set(ids["unique_id"].iloc[rows]) | {film_uid})
            sub = _sub_panel(options, needed, manifests[lead]["span"], first["cleaning"])
            local = pd.Series(np.arange(sub.n_series), index=sub.ids["unique_id"])
            sub_table = table[table["unique_id"].isin(needed)].copy()
            sub_table["sid"] = local.loc[sub_table["unique_id"]].to_numpy()
            view = _overview(shards, ids)
            labels = {int(round((pd.Timestamp(t) - sub.start) / sub.step)): label for label, t in first["data"]["windows"].items()}
            events = read_events(options["data"], pd.Timestamp(first["data"]["start"]), pd.Timestamp(first["data"]["end"]))
            drawn = plots.draw_all(out, sub, sub_table, local.loc[ids["unique_id"].iloc[rows]].to_numpy(), model, BASELINE, level, labels,
                                   on_plot=advance, overview=view, fleet_table=table, events=events)
        with progress.stage("animation", 1):
            film = animation.write_animation(out, sub, int(local.loc[film_uid]), int(options["horizon"]), level)
        data = dict(first["data"], readings=sum(m["data"]["readings"] for m in metrics.values()), series=len(ids))
        merged_options = {**{k: v for k, v in options.items() if k not in PER_SHARD_OPTIONS}, "out": str(out), "shards": len(manifests_all)}
        result = build_metrics(model, merged_options, data, scores, flagged, cleaning, film, device_events_summary(events))
        result["shards"] = {str(i): {"series": m["data"]["series"], "seconds": m["timings_s"]["total"], "peak_rss_mb": m["peak_rss_mb"]["total"]}
                            for i, m in metrics.items()}
        with progress.stage("write outputs"):
            write_outputs(out, table, scores["per_series"], result, drawn, progress, started)
    return ForecastRun(sub, table, result, drawn)


def _overview(shards: dict[int, Path], ids: pd.DataFrame) -> plots.Overview:
    """The shards' coarse rows stacked in the merged series order."""
    coarse, uids, times = [], [], None
    for path in shards.values():
        with np.load(path / "overview.npz") as saved:
            coarse.append(saved["coarse"])
            times = saved["times"]
        uids.extend(pd.read_parquet(path / "forecasts.parquet", columns=["unique_id"])["unique_id"].drop_duplicates().sort_values().tolist())
    stacked = np.concatenate(coarse)
    position = pd.Series(np.arange(len(uids)), index=uids)
    return plots.Overview(ids, pd.DatetimeIndex(np.asarray(times, dtype="datetime64[ns]")), stacked[position.loc[ids["unique_id"]].to_numpy()])


__all__ = ["find_shards", "merge_cleaning", "merge_shards", "SHARDS_DIR"]
