"""Stage 1, prepare: readings (read from Parquet by load.py) -> a regular panel of cleaned series.

    read_readings(url, ...)   only the needed columns and time window, strings as categoricals (load.py)
    prepare(readings, ...)    resample every (protocol, device, sensor) series onto one time grid,
                              drop stuck-at runs and spikes, interpolate short gaps, report long ones

The panel is wide (series x time steps, numpy) because every later stage is vectorised across
series; `Panel.to_long()` gives the usual long DataFrame (unique_id, ds, y) for libraries.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from sensorfleet.forecasting.errors import ForecastInputError, NotEnoughData
from sensorfleet.forecasting.load import REQUIRED_COLUMNS

KEY_COLUMNS = ("protocol", "device", "sensor")
# Ground-truth anomaly codes on the panel (the simulator's `anomaly` column).
TRUTH_NONE, TRUTH_SPIKE, TRUTH_STUCK, TRUTH_DROPOUT = 0, 1, 2, 3
TRUTH_NAMES = {"spike": TRUTH_SPIKE, "stuck": TRUTH_STUCK, "dropout": TRUTH_DROPOUT}


_FREQ = re.compile(r"^([0-9]*)(s|min|h|D)$")


def parse_frequency(freq: str) -> pd.Timedelta:
    match = _FREQ.match(freq)
    if not match or (match.group(1) and int(match.group(1)) == 0):
        raise ForecastInputError(f"frequency: expected a pandas offset alias like 1min, 15s, 1h or 1D, got {freq!r}")
    return pd.Timedelta(int(match.group(1) or 1), unit={"s": "s", "min": "min", "h": "h", "D": "D"}[match.group(2)])


def season_length(step: pd.Timedelta) -> int:
    """Steps per day (the daily cycle); a week for daily data."""
    seconds = step.total_seconds()
    if seconds >= 86400:
        return 7
    return max(1, int(round(86400 / seconds)))


@dataclass
class Panel:
    """Series on one regular grid: row i of each matrix is series `ids.iloc[i]`, column j is step j."""

    ids: pd.DataFrame  # unique_id, protocol, device, sensor, unit
    start: pd.Timestamp  # time of step 0 (UTC); step j covers [start + j*step, start + (j+1)*step)
    step: pd.Timedelta
    freq: str
    y: np.ndarray  # cleaned values, NaN where missing (long gaps, never observed)
    raw: np.ndarray  # resampled readings as collected, NaN where none
    truth: np.ndarray  # int8 ground-truth anomaly code per cell (TRUTH_*)

    @property
    def n_series(self) -> int:
        return self.y.shape[0]

    @property
    def n_steps(self) -> int:
        return self.y.shape[1]

    @property
    def season(self) -> int:
        return season_length(self.step)

    def times(self, lo: int = 0, hi: int | None = None) -> pd.DatetimeIndex:
        hi = self.n_steps if hi is None else hi
        return pd.DatetimeIndex(self.start + self.step * np.arange(lo, hi))

    def to_long(self, values: np.ndarray | None = None, lo: int = 0, hi: int | None = None, name: str = "y", int_ids: bool = False) -> pd.DataFrame:
        """Long frame (unique_id, ds, name) of steps [lo, hi), missing cells dropped; with
        `int_ids` the unique_id is the series' row number (compact for millions of rows)."""
        values = self.y if values is None else values
        hi = self.n_steps if hi is None else hi
        block = values[:, lo:hi]
        n, t = block.shape
        keep = ~np.isnan(block).ravel()
        rows = np.repeat(np.arange(n), t)[keep]
        ids = rows if int_ids else pd.Categorical.from_codes(rows, categories=self.ids["unique_id"])
        ds = np.tile(self.times(lo, hi).tz_convert(None).values, n)[keep]
        return pd.DataFrame({"unique_id": ids, "ds": ds, name: block.ravel()[keep]})

    def subset(self, rows: np.ndarray) -> Panel:
        return Panel(self.ids.iloc[rows].reset_index(drop=True), self.start, self.step, self.freq, self.y[rows], self.raw[rows], self.truth[rows])


@dataclass
class CleaningReport:
    """What `prepare` changed, in numbers a user can check."""

    series: int = 0
    steps: int = 0
    readings: int = 0
    missing_cells: int = 0
    interpolated_cells: int = 0
    stuck_cells: int = 0
    spike_cells: int = 0
    long_gaps: int = 0
    long_gap_cells: int = 0
    max_gap_steps: int = 0
    long_gap_examples: list[dict[str, Any]] = field(default_factory=list)
    dropped_series: list[str] = field(default_factory=list)
    # How the stuck/spike detectors compare with the simulator's ground truth.
    detector_scores: dict[str, dict[str, float | int | None]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Prepared:
    panel: Panel
    report: CleaningReport


def resample(readings: pd.DataFrame, freq: str, span: tuple[pd.Timestamp, pd.Timestamp] | None = None) -> Panel:
    """Mean of each series' readings per `freq` step on one grid common to all series; the grid
    covers `span` ((first, last) ts, e.g. of the whole dataset a shard was cut from) when given."""
    missing = [c for c in REQUIRED_COLUMNS if c not in readings.columns]
    if missing:
        raise ForecastInputError(f"readings: missing column(s) {', '.join(missing)}; the dataset needs {', '.join(REQUIRED_COLUMNS)}")
    if readings.empty:
        raise ForecastInputError("readings: the dataset is empty; collect data first or run `sensorfleet generate`")
    step = parse_frequency(freq)
    ts = readings["ts"]
    if not isinstance(ts.dtype, pd.DatetimeTZDtype):
        ts = pd.to_datetime(ts, utc=True)
    # Integer time in the column's own unit (no copy of ten million timestamps).
    ticks = ts.array.asi8
    per_ns = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}[ts.dtype.unit]
    step_units = max(1, step.value // per_ns)
    lo, hi = int(ticks.min()), int(ticks.max())
    if span is not None:  # the span's ends in the column's unit
        lo, hi = min(lo, pd.Timestamp(span[0]).value // per_ns), max(hi, pd.Timestamp(span[1]).value // per_ns)
    t0 = (lo // step_units) * step_units
    bins = ticks - t0
    bins //= step_units
    n_steps = (hi - t0) // step_units + 1
    # One integer key per series from the categorical codes; a lookup table when the key space is
    # small (the usual case) avoids sorting ten million keys.
    cats, key = [], np.zeros(len(readings), dtype=np.int64)
    for c in KEY_COLUMNS:
        cat = readings[c].astype("category").cat
        cats.append(np.asarray(cat.categories, dtype=object))
        key *= len(cat.categories) + 1
        key += cat.codes.to_numpy()
    space = int(np.prod([len(c) + 1 for c in cats]))
    if space <= 50_000_000:
        unique_keys = np.flatnonzero(np.bincount(key, minlength=space))
    else:
        unique_keys = np.unique(key)
    parts, rest = [], unique_keys.copy()
    for c in reversed(cats):
        rest, code = np.divmod(rest, len(c) + 1)
        parts.append(c[code])
    ids = pd.DataFrame(dict(zip(KEY_COLUMNS, reversed(parts))))
    ids["unique_id"] = ids["protocol"].astype(str) + "/" + ids["device"].astype(str) + "/" + ids["sensor"].astype(str)
    order = np.argsort(ids["unique_id"].to_numpy(), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    n = len(ids)
    # flat cell index = series row * n_steps + step, built in place over the key array.
    if space <= 50_000_000:
        lut = np.full(space, -1, dtype=np.int64)
        lut[unique_keys] = rank
        flat = lut[key]
        del lut
    else:
        flat = rank[np.searchsorted(unique_keys, key)]
    del key
    flat *= n_steps
    flat += bins
    del bins
    ids["unit"] = ""
    if "unit" in readings.columns:
        # The unit of a series' first reading; units do not change within a series.
        unit = readings["unit"].astype("category").cat
        series_row = flat // n_steps
        first = np.full(n, -1, dtype=np.int64)
        first[series_row[::-1]] = np.arange(len(series_row) - 1, -1, -1)
        del series_row
        codes = unit.codes.to_numpy()[first]
        ids.loc[order, "unit"] = np.where(codes >= 0, np.asarray(unit.categories, dtype=object)[codes], "")
    ids = ids.iloc[order].reset_index(drop=True)[["unique_id", "protocol", "device", "sensor", "unit"]]
    value = readings["value"].to_numpy(dtype=np.float64, na_value=np.nan)
    has = ~np.isnan(value)
    cells = n * n_steps
    counted = np.where(has, flat, cells)  # readings without a value go to a spare bin
    counts = np.bincount(counted, minlength=cells + 1)[:cells]
    raw = np.bincount(counted, weights=np.where(has, value, 0.0), minlength=cells + 1)[:cells]
    del counted, value
    empty = counts == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        raw /= counts
    del counts
    raw = raw.reshape(n, n_steps)
    truth = np.zeros(cells, dtype=np.int8)
    if "anomaly" in readings.columns:
        # A step holding a spike or a stuck reading is that anomaly; it is a dropout only when no
        # reading of the step carried a value.
        anomaly = readings["anomaly"].astype("category").cat
        ranks = np.zeros(len(anomaly.categories) + 1, dtype=np.int8)  # code -1 (null) -> last entry, 0
        for name, prio in (("dropout", 1), ("stuck", 2), ("spike", 3)):
            if name in anomaly.categories:
                ranks[anomaly.categories.get_loc(name)] = prio
        priority = ranks[anomaly.codes.to_numpy()]
        rows = np.flatnonzero(priority)
        cell = np.zeros(cells, dtype=np.int8)
        np.maximum.at(cell, flat[rows], priority[rows])
        truth[cell == 3] = TRUTH_SPIKE
        truth[cell == 2] = TRUTH_STUCK
        truth[(cell == 1) & empty] = TRUTH_DROPOUT
    return Panel(ids, pd.Timestamp(t0 * per_ns, unit="ns", tz="UTC"), step, freq, raw.copy(), raw, truth.reshape(n, n_steps))


def stuck_cells(values: np.ndarray, min_run: int) -> np.ndarray:
    """Cells in runs of at least `min_run` exactly equal consecutive values (a frozen sensor).

    Series that never change at all are left alone: a constant signal is not a fault here."""
    n, t = values.shape
    boundary = np.ones((n, t), dtype=bool)
    np.not_equal(values[:, 1:], values[:, :-1], out=boundary[:, 1:])
    starts = np.flatnonzero(boundary)
    del boundary
    lengths = np.diff(np.append(starts, n * t))
    long_runs = np.flatnonzero(lengths >= min_run)
    stuck = np.zeros(n * t, dtype=bool)
    for s, length in zip(starts[long_runs].tolist(), lengths[long_runs].tolist()):
        stuck[s : s + length] = True
    stuck = stuck.reshape(n, t) & ~np.isnan(values)
    with _quiet_nan():
        constant = np.nanmax(values, axis=1) == np.nanmin(values, axis=1)
    stuck[constant] = False
    return stuck


def spike_cells(values: np.ndarray, threshold: float) -> np.ndarray:
    """Single readings that jump away from both neighbours, in the same direction, by more than
    `threshold` noise standard deviations (noise estimated robustly from first differences)."""
    left = np.full(values.shape, np.nan)
    right = np.full(values.shape, np.nan)
    np.subtract(values[:, 1:], values[:, :-1], out=left[:, 1:])
    right[:, :-1] = -left[:, 1:]
    with _quiet_nan():
        sigma = 1.4826 * np.nanmedian(np.abs(left), axis=1, keepdims=True) / np.sqrt(2.0)
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, np.inf)
    with np.errstate(invalid="ignore"):
        same_side = np.sign(left) == np.sign(right)
        jump = np.minimum(np.abs(left), np.abs(right))
        return same_side & (jump > threshold * sigma)


class _quiet_nan:
    """All-NaN rows are expected (long gaps); their RuntimeWarnings are not news."""

    def __enter__(self) -> None:
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def interpolate_gaps(values: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Linear interpolation of interior NaN runs of at most `max_gap` steps, in place.

    Returns the values, the mask of filled cells and the long gaps (row, first step, length)."""
    n, t = values.shape
    flat = values.reshape(-1)
    missing = np.flatnonzero(np.isnan(flat))
    filled = np.zeros((n, t), dtype=bool)
    if len(missing) == 0:
        return values, filled, []
    valid = np.flatnonzero(~np.isnan(flat))
    pos = np.searchsorted(valid, missing)
    prev = np.where(pos > 0, valid[np.maximum(pos - 1, 0)], -1) if len(valid) else np.full(len(missing), -1)
    nxt = np.where(pos < len(valid), valid[np.minimum(pos, len(valid) - 1)], -1) if len(valid) else np.full(len(missing), -1)
    row = missing // t
    interior = (prev >= 0) & (nxt >= 0) & (prev // t == row) & (nxt // t == row)
    gap = nxt - prev - 1
    fill = interior & (gap <= max_gap)
    m, p, q = missing[fill], prev[fill], nxt[fill]
    flat[m] = flat[p] + (flat[q] - flat[p]) * (m - p) / (q - p)
    filled.reshape(-1)[m] = True
    first_of_long = interior & (gap > max_gap) & (missing == prev + 1)
    gaps = [(int(c // t), int(c % t), int(g)) for c, g in zip(missing[first_of_long], gap[first_of_long])]
    return values, filled, gaps


def _score(flags: np.ndarray, truth: np.ndarray) -> dict[str, float | int | None]:
    tp = int((flags & truth).sum())
    fp, fn = int((flags & ~truth).sum()), int((~flags & truth).sum())
    return {
        "flagged": int(flags.sum()),
        "true": int(truth.sum()),
        "true_positives": tp,
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
    }


def clean(panel: Panel, max_gap: int, stuck_min_run: int = 5, spike_threshold: float = 5.0) -> CleaningReport:
    """Drop stuck-at runs and spikes from `panel.y` and interpolate short gaps, in place."""
    raw = panel.raw
    report = CleaningReport(series=panel.n_series, steps=panel.n_steps, max_gap_steps=max_gap)
    report.missing_cells = int(np.isnan(raw).sum())
    y = raw.copy()
    stuck = np.zeros(raw.shape, dtype=bool)
    spikes = np.zeros(raw.shape, dtype=bool)
    # Rows in chunks bound the detectors' temporaries to a few tens of MB.
    for lo in range(0, panel.n_series, 256):
        rows = slice(lo, lo + 256)
        stuck[rows] = stuck_cells(raw[rows], stuck_min_run)
        y[rows][stuck[rows]] = np.nan
        spikes[rows] = spike_cells(y[rows], spike_threshold)
        y[rows][spikes[rows]] = np.nan
    report.stuck_cells, report.spike_cells = int(stuck.sum()), int(spikes.sum())
    report.detector_scores = {
        "stuck": _score(stuck, panel.truth == TRUTH_STUCK),
        "spike": _score(spikes, panel.truth == TRUTH_SPIKE),
    }
    y, filled, gaps = interpolate_gaps(y, max_gap)
    report.interpolated_cells = int(filled.sum())
    report.long_gaps = len(gaps)
    report.long_gap_cells = int(sum(g[2] for g in gaps))
    times = panel.times()
    report.long_gap_examples = [
        {"unique_id": str(panel.ids["unique_id"].iat[r]), "start": times[c].isoformat(), "steps": length}
        for r, c, length in sorted(gaps, key=lambda g: -g[2])[:20]
    ]
    panel.y = y
    return report


def min_steps(season: int, horizon: int, cv_windows: int) -> int:
    """Steps of history a series needs: one season before the earliest CV origin, then the windows."""
    return season + horizon * (cv_windows + 1) + 1


def need_detail(season: int, horizon: int, cv_windows: int, missing: int, step: pd.Timedelta) -> str:
    """Why `min_steps` steps are needed, and how long the rest takes to collect."""
    hours = missing * step.total_seconds() / 3600
    eta = f"about {hours:.1f} h more" if hours >= 1 else f"about {max(1, round(hours * 60))} min more"
    return f"a daily season of {season} steps + horizon {horizon} x ({cv_windows} CV windows + 1) + 1; {eta}"


def check_lengths(panel: Panel, horizon: int, cv_windows: int, drop_short: bool, report: CleaningReport) -> Panel:
    """Refuse (or with `drop_short`, drop) series too short for the horizon and CV windows.

    A panel shorter than that as a whole (or, with `drop_short`, one whose every series is) is a
    young dataset: `NotEnoughData`, which the CLI reports as waiting, not as a failure."""
    if horizon < 1:
        raise ForecastInputError(f"--horizon: must be >= 1 step, got {horizon}")
    if cv_windows < 0:
        raise ForecastInputError(f"--cv-windows: must be >= 0, got {cv_windows}")
    need = min_steps(panel.season, horizon, cv_windows)
    if panel.n_steps < need:
        detail = need_detail(panel.season, horizon, cv_windows, need - panel.n_steps, panel.step)
        raise NotEnoughData(panel.n_steps, need, panel.freq, detail)
    valid = ~np.isnan(panel.y)
    counts = valid.sum(axis=1)
    first = np.where(counts > 0, valid.argmax(axis=1), panel.n_steps)
    # A series must start early enough, and keep most of its values, in the window it is scored on.
    short = (counts < 2) | (panel.n_steps - first < need) | (counts < need // 2)
    if short.any():
        names = panel.ids["unique_id"].to_numpy()[short]
        if not drop_short:
            worst = int(np.argmin(np.where(short, counts, np.iinfo(np.int64).max)))
            raise ForecastInputError(
                f"series {panel.ids['unique_id'].iat[worst]} has {int(counts[worst])} value(s) (and {int(short.sum())} series are too short); "
                f"each needs {need} steps of {panel.freq} history for horizon {horizon}; pass --drop-short to skip such series"
            )
        report.dropped_series = [str(x) for x in names]
        keep = np.nonzero(~short)[0]
        if len(keep) == 0:
            longest = int((panel.n_steps - first).max())
            if longest < need:  # young: every series started too recently
                detail = need_detail(panel.season, horizon, cv_windows, need - longest, panel.step)
                raise NotEnoughData(longest, need, panel.freq, f"every series started too recently; {detail}")
            raise ForecastInputError(f"every series is too short or too sparse: each needs {need} steps of {panel.freq}, at least half of them with a value")
        panel = panel.subset(keep)
        report.series = panel.n_series
    return panel


def prepare(
    readings: pd.DataFrame,
    freq: str = "1min",
    horizon: int = 60,
    cv_windows: int = 3,
    max_gap: timedelta | None = None,
    drop_short: bool = False,
) -> Prepared:
    """Readings (long, as stored) -> cleaned regular panel and a cleaning report."""
    panel = resample(readings, freq)
    return finish_prepare(panel, len(readings), horizon, cv_windows, max_gap, drop_short)


def finish_prepare(panel: Panel, readings: int, horizon: int = 60, cv_windows: int = 3, max_gap: timedelta | None = None, drop_short: bool = False) -> Prepared:
    """Clean and length-check a resampled panel (the part of `prepare` after `resample`, for
    callers that free the readings first)."""
    gap_steps = max(1, math.floor((max_gap or timedelta(hours=1)) / panel.step.to_pytimedelta()))
    report = clean(panel, gap_steps)
    report.readings = int(readings)
    panel = check_lengths(panel, horizon, cv_windows, drop_short, report)
    return Prepared(panel, report)
