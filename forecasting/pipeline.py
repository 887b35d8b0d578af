"""`sensorfleet forecast`: prepare -> features -> models -> evaluate -> anomalies -> plots/report.

Each stage is a function over DataFrames (or the panel built from one) in its own module; this
module only orders them, shows progress and writes the outputs:

    OUT/forecasts.parquet        every model's forecasts of the scored windows and the future
    OUT/metrics.json             headline, per-model aggregates (hold-out and CV), cleaning, anomalies
    OUT/metrics_by_series.csv    per-series metrics
    OUT/*.png, OUT/report.html   plots and the offline report that shows them
    OUT/animation.gif (.mp4)     one series played forward with the rolling forecast cone
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sensorfleet.events import read_events
from sensorfleet.forecasting import anomalies, animation, evaluate, plots, report
from sensorfleet.forecasting.errors import ForecastInputError, NoReadings, NotEnoughData
from sensorfleet.forecasting.models import BASELINE, MODEL_CHOICES, TIMEGPT_KEY_MISSING, ForecastBlock, SeasonalNaiveBaseline, make_model
from sensorfleet.forecasting.errors import EmptySelection
from sensorfleet.forecasting.load import read_selected
from sensorfleet.forecasting.prepare import TRUTH_NAMES, Panel, finish_prepare, min_steps, need_detail, parse_frequency, resample, season_length
from sensorfleet.forecasting.shards import parse_shard, shard_filter, write_manifest
from sensorfleet.spec import SensorFleet

TRUTH_LABELS = np.array([None, *sorted(TRUTH_NAMES, key=TRUTH_NAMES.get)], dtype=object)


@dataclass
class ForecastOptions:
    """Everything `sensorfleet forecast` takes; `from_fleet` fills it from a fleet's spec.forecasting."""

    data: str
    out: Path
    horizon: int = 60
    model: str = "auto"
    level: int = 95
    frequency: str = "1min"
    window_days: float = 7.0
    cv_windows: int = 3
    seed: int = 0
    n_jobs: int = 1
    protocols: Sequence[str] | None = None
    drop_short: bool = False
    plot_series: int = 4
    fleet: str | None = None
    shard: str | None = None  # "i/N": only the series whose crc32(unique_id) % N == i
    wait_for_data: bool = False  # an empty dataset is young (0 steps), not an error: the fleet's CronJob
    # A shard of a run to be merged (`--jobs N`, `--merge-when-done`, the Indexed Job's pods):
    # no plots, animation or report (the merge draws them), plus what the merge needs.
    for_merge: bool = False
    run_id: str | None = None  # shards of one run carry the same id (the Job's name in Kubernetes)

    @classmethod
    def from_fleet(cls, fleet: SensorFleet | None, **given: Any) -> ForecastOptions:
        """Options from the fleet spec, overridden by every value given (None means 'not given')."""
        values: dict[str, Any] = {}
        if fleet is not None:
            f = fleet.spec.forecasting
            values = {"horizon": f.horizon, "model": f.model, "level": f.level, "frequency": f.frequency, "window_days": f.window_days, "fleet": fleet.name}
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**values)

    def check(self) -> None:
        if self.horizon < 1:
            raise ForecastInputError(f"--horizon: must be >= 1 step, got {self.horizon}")
        if self.model not in MODEL_CHOICES:
            raise ForecastInputError(f"--model: unknown model {self.model!r}; choose one of {', '.join(MODEL_CHOICES)}")
        if not 50 <= self.level <= 99:
            raise ForecastInputError(f"--level: prediction-interval level must be between 50 and 99 percent, got {self.level}")
        if self.window_days <= 0:
            raise ForecastInputError(f"--window-days: must be > 0, got {self.window_days}")
        if self.model == "timegpt" and not os.environ.get("NIXTLA_API_KEY"):
            raise ForecastInputError(TIMEGPT_KEY_MISSING)  # before reading days of data
        if self.n_jobs < 1:
            raise ForecastInputError(f"--jobs: must be >= 1, got {self.n_jobs}")
        if self.shard is not None:
            parse_shard(self.shard)
        # A dataset can grow into the horizon; a window too small to hold it never will.
        step = parse_frequency(self.frequency)
        capacity = int(self.window_days * 86400 // step.total_seconds())
        need = self.steps_needed()
        if need > capacity:
            raise ForecastInputError(
                f"--window-days {self.window_days:g}: the window holds at most {capacity} steps of {self.frequency}, but horizon {self.horizon} "
                f"with {self.cv_windows} CV window(s) and a daily season needs {need}; raise --window-days (spec.forecasting.windowDays) "
                "or lower --horizon / --cv-windows")

    def steps_needed(self) -> int:
        """History every series needs (`prepare.min_steps` at this frequency)."""
        return min_steps(season_length(parse_frequency(self.frequency)), self.horizon, self.cv_windows)


StageCallback = Callable[[int, int], None]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


class Progress:
    """Progress of the stages: a rich progress bar on stderr, or nothing (quiet / tests)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}  # process peak so far, after each stage
        self._progress = None

    @contextmanager
    def running(self) -> Iterator[Progress]:
        if not self.enabled:
            yield self
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        with RichProgress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True), transient=False) as bar:
            self._progress = bar
            try:
                yield self
            finally:
                self._progress = None

    @contextmanager
    def stage(self, name: str, total: int = 1) -> Iterator[StageCallback]:
        started = time.perf_counter()
        task = self._progress.add_task(name, total=total) if self._progress else None

        def advance(done: int, of: int) -> None:
            if self._progress is not None and task is not None:
                self._progress.update(task, completed=done, total=of)

        try:
            yield advance
        finally:
            if self._progress is not None and task is not None:
                self._progress.update(task, completed=self._progress.tasks[task].total)
            self.timings[name] = round(time.perf_counter() - started, 3)
            self.peak_rss_mb[name] = peak_rss_mb()


@dataclass
class ForecastRun:
    """Results of one run, kept in memory for callers and tests."""

    panel: Panel
    table: pd.DataFrame
    metrics: dict[str, Any]
    plots: list[dict[str, str]] = field(default_factory=list)


def origins_for(n_steps: int, horizon: int, cv_windows: int) -> dict[int, str]:
    """Forecast origins (step numbers) and their window labels: cv1..cvN, test, future."""
    labels = {n_steps - horizon * (k + 1): f"cv{cv_windows - k + 1}" for k in range(cv_windows, 0, -1)}
    labels[n_steps - horizon] = "test"
    labels[n_steps] = "future"
    return dict(sorted(labels.items()))


def forecast_table(panel: Panel, blocks: dict[str, list[ForecastBlock]], labels: dict[int, str], level: int) -> pd.DataFrame:
    """One row per series, window and step: actuals (clean and raw), ground truth, each model's forecasts."""
    n = panel.n_series
    frames = []
    origins = sorted(labels)
    for origin in origins:
        h = next(b for bl in blocks.values() for b in bl if b.origin == origin).mean.shape[1]
        steps = np.arange(origin, origin + h)
        inside = steps < panel.n_steps
        def actual(matrix: np.ndarray, fill: float | int) -> np.ndarray:
            out = np.full((n, h), fill, dtype=matrix.dtype)
            out[:, inside] = matrix[:, steps[inside]]
            return out.ravel()

        frame = {
            "sid": np.repeat(np.arange(n), h),
            "window": labels[origin],
            "cutoff": (panel.start + panel.step * (origin - 1)).tz_convert(None),
            "ds": np.tile(panel.times(origin, origin + h).tz_convert(None).values, n),
            "step": np.tile(np.arange(1, h + 1), n),
            "y": actual(panel.y, np.nan),
            "y_raw": actual(panel.raw, np.nan),
            "truth": TRUTH_LABELS[actual(panel.truth, 0)],
        }
        for name, model_blocks in blocks.items():
            block = next((b for b in model_blocks if b.origin == origin), None)
            for suffix, attr in (("", "mean"), (f"-lo-{level}", "lo"), (f"-hi-{level}", "hi")):
                frame[f"{name}{suffix}"] = getattr(block, attr).ravel() if block is not None else np.full(n * h, np.nan)
        frames.append(pd.DataFrame(frame))
    table = pd.concat(frames, ignore_index=True)
    ids = panel.ids.reset_index(drop=True)
    for column in ("unique_id", "protocol", "device", "sensor", "unit"):
        table.insert(1 + ["unique_id", "protocol", "device", "sensor", "unit"].index(column), column, ids[column].to_numpy()[table["sid"].to_numpy()])
    return table


def choose_plot_rows(ids: pd.DataFrame, count: int, seed: int) -> np.ndarray:
    """A seeded sample of series (rows of `ids`, the panel's) to draw, one per sensor first so
    every kind of signal is shown."""
    rng = np.random.default_rng(seed)
    rows: list[int] = []
    for _, group in ids.groupby("sensor", sort=True):
        rows.append(int(rng.choice(group.index.to_numpy())))
    remaining = np.setdiff1d(np.arange(len(ids)), rows)
    extra = max(0, count - len(rows))
    if extra and len(remaining):
        rows.extend(int(r) for r in rng.choice(remaining, size=min(extra, len(remaining)), replace=False))
    return np.array(sorted(rows[: max(count, 1)]))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, pd.Timestamp | datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


MAX_EVENTS_LISTED = 200


def device_events_summary(events: pd.DataFrame) -> dict[str, Any]:
    """What clients did to devices in the window (sensorfleet.events), for metrics.json and the report."""
    rows = []
    for e in events.tail(MAX_EVENTS_LISTED).itertuples():
        rows.append({"ts": pd.Timestamp(e.ts).isoformat(), "protocol": e.protocol, "device": e.device, "action": e.action,
                     "sensor": e.sensor, "value": None if pd.isna(e.value) else float(e.value), "fault": e.fault,
                     "duration": None if pd.isna(e.duration) else float(e.duration), "message": e.message})
    return {"count": int(len(events)), "by_action": {k: int(v) for k, v in events["action"].value_counts().items()}, "rows": rows}


def options_dict(options: ForecastOptions) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple | list) else str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}


def build_metrics(model: str, options: dict[str, Any], data: dict[str, Any], scores: dict[str, Any], flagged: dict[str, Any],
                  cleaning: dict[str, Any], film: dict[str, str | None] | None, device_events: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.json (without timings) from the stages' results; the merge of shards calls it too."""
    holdout = scores.get("holdout", {}).get("models", {})
    cv = scores.get("cv", {}).get("models", {})
    return {
        "headline": {
            "model": model,
            "mae": holdout.get(model, {}).get("mae"),
            "mase": holdout.get(model, {}).get("mase"),
            "mase_vs_baseline": holdout.get(model, {}).get("mase_vs_baseline"),
            "cv_mase_vs_baseline": cv.get(model, {}).get("mase_vs_baseline"),
            "baseline": BASELINE,
            "baseline_mase": holdout.get(BASELINE, {}).get("mase"),
            "anomalies_flagged": flagged["holdout"]["flagged"],
            "series": data["series"],
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "options": options,
        "data": data,
        "holdout": {k: v for k, v in scores.get("holdout", {}).items()},
        "cv": {k: v for k, v in scores.get("cv", {}).items()},
        "anomalies": flagged,
        "cleaning": cleaning,
        "animation": film,
        "device_events": device_events,
        "timings_s": {},
    }


def write_outputs(out: Path, table: pd.DataFrame, per_series: dict[str, pd.DataFrame], metrics: dict[str, Any], drawn: list[dict[str, str]],
                  progress: Progress, started: float, report_html: bool = True) -> None:
    """metrics_by_series.csv, forecasts.parquet, metrics.json (with timings) and report.html."""
    frames = [df.drop(columns=["sid"]).assign(split=split) for split, df in per_series.items()]
    pd.concat(frames, ignore_index=True).to_csv(out / "metrics_by_series.csv", index=False)
    written = table.drop(columns=["sid"]).assign(ds=lambda d: d["ds"].dt.tz_localize("UTC"), cutoff=lambda d: d["cutoff"].dt.tz_localize("UTC"))
    pq.write_table(pa.Table.from_pandas(written, preserve_index=False), out / "forecasts.parquet", compression="zstd")
    metrics["timings_s"] = dict(progress.timings, total=round(time.perf_counter() - started, 3))
    metrics["peak_rss_mb"] = dict(progress.peak_rss_mb, total=peak_rss_mb())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    if report_html:
        report.write_report(out / "report.html", metrics, drawn)


def write_shard_extras(out: Path, options: ForecastOptions, panel: Panel, model: str, models: list[str], scores: dict[str, Any], span: tuple[Any, Any]) -> None:
    """What the merge needs beyond the tables: the overview's coarse rows, the animation's
    candidate, and last the manifest that marks the shard complete."""
    view = plots.overview_of(panel)
    np.savez(out / "overview.npz", coarse=view.coarse, times=view.times.to_numpy().astype("datetime64[ns]").astype(np.int64))
    faults = animation.fault_counts(panel, options.horizon)
    best = int(np.argmax(faults)) if len(faults) else 0
    index, count = parse_shard(options.shard or "0/1")
    write_manifest(out, {
        "index": index, "count": count, "run_id": options.run_id, "model": model, "models": models,
        "windows": {split: scores[split]["windows"] for split in ("holdout", "cv") if split in scores},
        "span": [pd.Timestamp(span[0]).isoformat(), pd.Timestamp(span[1]).isoformat()],
        "animation": {"unique_id": str(panel.ids["unique_id"].iat[best]), "faults": int(faults[best]) if len(faults) else 0},
        "options": options_dict(options),
    })


def run_forecast(options: ForecastOptions, progress: Progress | None = None) -> ForecastRun:
    options.check()
    progress = progress or Progress(enabled=False)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with progress.running():
        with progress.stage("read dataset", 1) as advance:
            keep = shard_filter(options.shard) if options.shard is not None else None
            try:
                readings, span = read_selected(options.data, options.window_days, options.protocols, on_day=advance, keep=keep)
            except EmptySelection:
                index, count = parse_shard(options.shard or "0/1")
                raise EmptySelection(f"--shard {options.shard}: no series of the dataset hashes to shard {index} of {count}") from None
            except NoReadings as empty:
                if not options.wait_for_data:
                    raise
                step, need = parse_frequency(options.frequency), options.steps_needed()
                detail = need_detail(season_length(step), options.horizon, options.cv_windows, need, step)
                raise NotEnoughData(0, need, options.frequency, f"{empty}; {detail}") from None
        with progress.stage("prepare (resample, clean)") as advance:
            # The window must hold the origins the CV needs: fail early with what to change.
            n_readings = len(readings)
            resampled = resample(readings, options.frequency, span=span)
            del readings  # the panel replaces ten million rows; free them before cleaning
            prepared = finish_prepare(resampled, n_readings, options.horizon, options.cv_windows, drop_short=options.drop_short)
            del resampled
        panel, cleaning = prepared.panel, prepared.report
        labels = origins_for(panel.n_steps, options.horizon, options.cv_windows)
        scored = [o for o, label in labels.items() if label != "future"]
        model = make_model(options.model, panel.season, options.n_jobs)
        blocks: dict[str, list[ForecastBlock]] = {}
        with progress.stage(f"fit + forecast {model.name}", len(labels)) as advance:
            blocks[model.name] = model.forecast(panel, sorted(labels), options.horizon, options.level, progress=advance)
        if model.name != BASELINE:
            baseline = SeasonalNaiveBaseline(panel.season)
            with progress.stage(f"fit + forecast {BASELINE}", len(scored)) as advance:
                blocks[BASELINE] = baseline.forecast(panel, scored, options.horizon, options.level, progress=advance)
        models = list(blocks)
        with progress.stage("evaluate (hold-out, CV)") as advance:
            table = forecast_table(panel, blocks, labels, options.level)
            def train(sids: np.ndarray) -> pd.DataFrame:
                frame = panel.subset(sids).to_long(hi=min(scored), int_ids=True)
                frame["unique_id"] = sids[frame["unique_id"].to_numpy()]
                return frame

            scores = evaluate.evaluate_forecasts(table, models, BASELINE, train, panel.season, panel.ids)
        with progress.stage("anomaly flags") as advance:
            table, flagged = anomalies.detect(table, model.name, options.level)
        drawn: list[dict[str, str]] = []
        film: dict[str, str | None] | None = None
        events_summary: dict[str, Any] | None = None
        if not options.for_merge:  # the merge reads the events and draws for every shard
            with progress.stage("device events", 1):
                events = read_events(options.data, panel.start, panel.start + panel.step * panel.n_steps)
                events_summary = device_events_summary(events)
            with progress.stage("plots", 1) as advance:
                rows = choose_plot_rows(panel.ids, options.plot_series, options.seed)
                drawn = plots.draw_all(out, panel, table, rows, model.name, BASELINE, options.level, labels, on_plot=advance, events=events)
            with progress.stage("animation", 1):
                film = animation.write_animation(out, panel, animation.pick_series(panel, options.horizon), options.horizon, options.level)
        data = {
            "readings": n_readings,
            "series": panel.n_series,
            "steps": panel.n_steps,
            "frequency": panel.freq,
            "season": panel.season,
            "start": panel.start.isoformat(),
            "end": (panel.start + panel.step * panel.n_steps).isoformat(),
            "windows": {label: (panel.start + panel.step * origin).isoformat() for origin, label in labels.items()},
        }
        metrics = build_metrics(model.name, options_dict(options), data, scores, flagged, cleaning.as_dict(), film, events_summary)
        with progress.stage("write outputs") as advance:
            write_outputs(out, table, scores["per_series"], metrics, drawn, progress, started, report_html=not options.for_merge)
            if options.for_merge:
                write_shard_extras(out, options, panel, model.name, models, scores, span)
    return ForecastRun(panel, table, metrics, drawn)


def headline_text(head: dict[str, Any]) -> str:
    """One line for status.lastForecast, e.g. `Harmonic MASE 0.81 (0.93x SeasonalNaive), 24 series`."""
    def figure(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    return (f"{head['model']} MASE {figure(head.get('mase'))} ({figure(head.get('mase_vs_baseline'))}x {head['baseline']}), "
            f"{head['series']} series")


def outcome_message(reason: str, **fields: Any) -> str:
    """The forecast container's termination message: one JSON object, `reason` Forecast (with a
    `headline`), WaitingForData or Failed (with a `message`). The operator's status.last_forecast
    reads it; Kubernetes keeps at most 4096 bytes of it."""
    text = json.dumps({"reason": reason, **fields}, default=_json_default)
    return text if len(text) <= 4096 else json.dumps({"reason": reason, "message": str(fields.get("message", ""))[:3000]})


__all__ = ["ForecastOptions", "ForecastRun", "Progress", "run_forecast", "origins_for", "forecast_table", "min_steps", "headline_text", "outcome_message"]
