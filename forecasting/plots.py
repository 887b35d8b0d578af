"""Stage 6a, plots: PNG files of the split, the forecasts, the errors and the fleet, via matplotlib (Agg).

Each function draws one figure from the panel and/or the forecast table and returns the file
name; `draw_all` draws the set the report shows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sensorfleet.forecasting.features import rolling_stats  # noqa: E402
from sensorfleet.forecasting.prepare import Panel  # noqa: E402

DPI = 90
COLORS = {"actual": "#333333", "train": "#4c72b0", "test": "#dd8452", "model": "#55a868", "baseline": "#c44e52", "flag": "#8172b3", "event": "#937860"}


def _save(fig: plt.Figure, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name


def _label(panel: Panel, row: int) -> str:
    ids = panel.ids.iloc[row]
    return f"{ids['unique_id']} [{ids['unit']}]"


def _mark_events(ax: plt.Axes, panel: Panel, row: int, events: pd.DataFrame | None, lo: pd.Timestamp, hi: pd.Timestamp) -> None:
    """Vertical lines where a client acted on the series' device (setpoint write, InjectFault,
    Reset: the dataset's events table, sensorfleet.events)."""
    if events is None or events.empty:
        return
    ids = panel.ids.iloc[row]
    mine = events[(events["protocol"] == ids["protocol"]) & (events["device"] == ids["device"])]
    for i, e in enumerate(mine.itertuples()):
        ts = pd.Timestamp(e.ts).tz_convert(None)
        if lo <= ts <= hi and (e.action != "setpoint" or e.sensor == ids["sensor"]):
            ax.axvline(ts, color=COLORS["event"], lw=0.9, ls=":", label="device event" if i == 0 else None)


def _axes(n: int, height: float = 2.4, width: float = 11.0) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(n, 1, figsize=(width, height * n + 0.4), squeeze=False)
    return fig, [a for a in axes[:, 0]]


def train_test_split(out: Path, panel: Panel, rows: np.ndarray, labels: dict[int, str], events: pd.DataFrame | None = None) -> str:
    """Each sampled series over the whole window: training data, CV windows and the hold-out."""
    test_origin = next(o for o, label in labels.items() if label == "test")
    cv = [o for o, label in labels.items() if label.startswith("cv")]
    times = panel.times().tz_convert(None)
    fig, axes = _axes(len(rows))
    for ax, row in zip(axes, rows):
        ax.plot(times[:test_origin], panel.y[row, :test_origin], color=COLORS["train"], lw=0.6, label="train")
        ax.plot(times[test_origin:], panel.y[row, test_origin:], color=COLORS["test"], lw=0.9, label="test (hold-out)")
        if cv:
            ax.axvspan(times[min(cv)], times[test_origin - 1], color="#bbbbbb", alpha=0.3, label="CV windows")
        _mark_events(ax, panel, row, events, times[0], times[-1])
        ax.set_title(_label(panel, row), fontsize=9, loc="left")
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle("Train / test split", fontsize=11)
    return _save(fig, out, "train_test_split.png")


def forecast_vs_actual(out: Path, panel: Panel, table: pd.DataFrame, rows: np.ndarray, model: str, baseline: str, level: int, events: pd.DataFrame | None = None) -> str:
    """The last hours of history, the hold-out actuals, the model's forecast with its interval, the
    baseline, flagged readings, and the forecast of the future."""
    test_origin = int(((table.loc[table["window"] == "test", "ds"].min() - panel.start.tz_convert(None)) / panel.step))
    # Enough history to see the cycle's shape, little enough to see the forecast window.
    h = int((table["window"] == "test").sum() // max(1, table["sid"].nunique()))
    lo = max(0, test_origin - max(6 * h, panel.season // 4))
    times = panel.times().tz_convert(None)
    fig, axes = _axes(len(rows), height=2.6)
    for ax, row in zip(axes, rows):
        ax.plot(times[lo:test_origin], panel.y[row, lo:test_origin], color=COLORS["train"], lw=0.6, label="history")
        for window, alpha in (("test", 1.0), ("future", 0.8)):
            part = table[(table["sid"] == row) & (table["window"] == window)]
            if part.empty:
                continue
            ax.fill_between(part["ds"], part[f"{model}-lo-{level}"], part[f"{model}-hi-{level}"], color=COLORS["model"], alpha=0.2, label=f"{model} {level}% interval" if window == "test" else None)
            ax.plot(part["ds"], part[model], color=COLORS["model"], lw=1.2, alpha=alpha, label=f"{model} forecast" if window == "test" else None)
            if window == "test":
                ax.plot(part["ds"], part["y_raw"], color=COLORS["actual"], lw=0.8, label="actual")
                if baseline in part:
                    ax.plot(part["ds"], part[baseline], color=COLORS["baseline"], lw=0.8, ls="--", label=baseline)
                flagged = part[part["anomaly_flag"]] if "anomaly_flag" in part else part.iloc[:0]
                ax.scatter(flagged["ds"], flagged["y_raw"], color=COLORS["flag"], s=18, zorder=5, label="flagged")
        _mark_events(ax, panel, row, events, times[lo], times[-1])
        ax.set_title(_label(panel, row), fontsize=9, loc="left")
        ax.legend(loc="upper left", fontsize=7, ncol=3)
    fig.suptitle(f"Forecast vs actual (hold-out and future), {model}", fontsize=11)
    return _save(fig, out, "forecast_vs_actual.png")


def residuals_over_time(out: Path, table: pd.DataFrame, panel: Panel, rows: np.ndarray, model: str, baseline: str, fleet_table: pd.DataFrame | None = None) -> str:
    """Forecast errors (actual - forecast) over the scored windows: sampled series, then the mean
    absolute error of all series (`fleet_table`, default `table`) at each time."""
    scored = table[table["window"] != "future"].dropna(subset=["y"])
    fleet = fleet_table if fleet_table is not None else table
    fleet_scored = fleet[fleet["window"] != "future"].dropna(subset=["y"])
    fig, axes = _axes(2, height=2.8)
    for row in rows:
        part = scored[scored["sid"] == row]
        axes[0].plot(part["ds"], part["y"] - part[model], lw=0.7, marker=".", ms=2, label=panel.ids["unique_id"].iat[row])
    axes[0].axhline(0, color="black", lw=0.6)
    axes[0].set_title(f"{model} residuals of sampled series", fontsize=9, loc="left")
    axes[0].legend(fontsize=7, loc="upper left")
    for name, color in ((model, COLORS["model"]), (baseline, COLORS["baseline"])):
        if name in fleet_scored:
            mean_abs = (fleet_scored["y"] - fleet_scored[name]).abs().groupby(fleet_scored["ds"]).mean()
            axes[1].plot(mean_abs.index, mean_abs.to_numpy(), color=color, lw=0.8, marker=".", ms=2, label=name)
    axes[1].set_title("Mean absolute error over all series", fontsize=9, loc="left")
    axes[1].legend(fontsize=7)
    fig.suptitle("Residuals over time (CV windows and hold-out)", fontsize=11)
    return _save(fig, out, "residuals_over_time.png")


def error_distribution(out: Path, table: pd.DataFrame, model: str, baseline: str) -> str:
    """Histogram of forecast errors scaled by each series' spread, model against baseline."""
    scored = table[table["window"] != "future"].dropna(subset=["y"])
    spread = scored.groupby("sid")["y"].transform("std").replace(0, np.nan)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for name, color in ((baseline, COLORS["baseline"]), (model, COLORS["model"])):
        if name in scored:
            err = ((scored["y"] - scored[name]) / spread).replace([np.inf, -np.inf], np.nan).dropna()
            if len(err):
                ax.hist(err.clip(-6, 6), bins=80, color=color, alpha=0.5, density=True, label=f"{name} (mean |e| {err.abs().mean():.3f})")
    ax.set_xlabel("error / series standard deviation in the window")
    ax.set_title("Error distribution", fontsize=11)
    ax.legend(fontsize=8)
    return _save(fig, out, "error_distribution.png")


def rolling_statistics(out: Path, panel: Panel, rows: np.ndarray) -> str:
    """Each sampled series with its one-hour rolling mean and +-2 rolling standard deviations."""
    window = max(2, panel.season // 24)
    mean, std = rolling_stats(panel.y[rows], window)
    times = panel.times().tz_convert(None)
    fig, axes = _axes(len(rows))
    for i, (ax, row) in enumerate(zip(axes, rows)):
        ax.plot(times, panel.y[row], color="#999999", lw=0.4, label="cleaned")
        ax.plot(times, mean[i], color=COLORS["train"], lw=1.0, label=f"rolling mean ({window} steps)")
        ax.fill_between(times, mean[i] - 2 * std[i], mean[i] + 2 * std[i], color=COLORS["train"], alpha=0.2, label="+-2 rolling std")
        ax.set_title(_label(panel, row), fontsize=9, loc="left")
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle("Rolling statistics", fontsize=11)
    return _save(fig, out, "rolling_statistics.png")


@dataclass
class Overview:
    """What the fleet overview draws from: every series' cleaned values averaged over blocks of
    steps (at most ~2,000 points a line). A shard writes its rows; the merge stacks them."""

    ids: pd.DataFrame  # unique_id, protocol, device, sensor, unit; row i <-> coarse[i]
    times: pd.DatetimeIndex  # naive UTC, one per block
    coarse: np.ndarray  # series x blocks


def overview_of(panel: Panel) -> Overview:
    block = max(1, panel.n_steps // 2000)
    usable = (panel.n_steps // block) * block
    times = panel.times(0, usable)[::block].tz_convert(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        coarse = np.nanmean(panel.y[:, :usable].reshape(panel.n_series, -1, block), axis=2)
    return Overview(panel.ids, times, coarse)


def protocol_overview(out: Path, overview: Overview, table: pd.DataFrame, protocol: str, model: str) -> str:
    """One protocol's fleet, per sensor: the median of all devices, the 10-90 % band, and the
    median forecast of the future."""
    ids, times = overview.ids, overview.times
    sensors = sorted(ids.loc[ids["protocol"] == protocol, "sensor"].unique())
    fig, axes = _axes(len(sensors), height=2.4)
    for ax, sensor in zip(axes, sensors):
        rows = ids.index[(ids["protocol"] == protocol) & (ids["sensor"] == sensor)].to_numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q10, q50, q90 = np.nanquantile(overview.coarse[rows], [0.1, 0.5, 0.9], axis=0)
        ax.fill_between(times, q10, q90, color=COLORS["train"], alpha=0.25, label="10-90 % of devices")
        ax.plot(times, q50, color=COLORS["train"], lw=0.9, label="median")
        future = table[(table["window"] == "future") & table["sid"].isin(rows)]
        if len(future):
            median = future.groupby("ds")[model].median()
            ax.plot(median.index, median.to_numpy(), color=COLORS["model"], lw=1.4, label=f"{model} forecast (median)")
        unit = ids.loc[rows[0], "unit"]
        ax.set_title(f"{protocol} / {sensor} [{unit}]: {len(rows)} devices", fontsize=9, loc="left")
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"Fleet overview: {protocol}", fontsize=11)
    return _save(fig, out, f"overview_{protocol}.png")


def draw_all(
    out: Path,
    panel: Panel,
    table: pd.DataFrame,
    rows: np.ndarray,
    model: str,
    baseline: str,
    level: int,
    labels: dict[int, str],
    on_plot: Callable[[int, int], None] | None = None,
    events: pd.DataFrame | None = None,
    overview: Overview | None = None,
    fleet_table: pd.DataFrame | None = None,
) -> list[dict[str, str]]:
    """Every plot of the report: [{"title", "file"}] in display order.

    `panel` and `table` need only hold the sampled `rows` when `overview` (every series) and
    `fleet_table` (every series' forecasts, `sid` = row of the overview) are given: the merge of
    shards draws that way, without the whole fleet's panel."""
    out = Path(out)
    overview = overview if overview is not None else overview_of(panel)
    fleet_table = fleet_table if fleet_table is not None else table
    protocols = sorted(overview.ids["protocol"].unique())
    jobs: list[tuple[str, Callable[[], str]]] = [
        ("Train / test split", lambda: train_test_split(out, panel, rows, labels, events)),
        ("Forecast vs actual", lambda: forecast_vs_actual(out, panel, table, rows, model, baseline, level, events)),
        ("Residuals over time", lambda: residuals_over_time(out, table, panel, rows, model, baseline, fleet_table)),
        ("Error distribution", lambda: error_distribution(out, fleet_table, model, baseline)),
        ("Rolling statistics", lambda: rolling_statistics(out, panel, rows)),
    ]
    jobs += [(f"Overview: {p}", (lambda p=p: protocol_overview(out, overview, fleet_table, p, model))) for p in protocols]
    drawn = []
    for i, (title, draw) in enumerate(jobs):
        drawn.append({"title": title, "file": draw()})
        if on_plot:
            on_plot(i + 1, len(jobs))
    return drawn
