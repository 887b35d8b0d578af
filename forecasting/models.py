"""Stage 3, models: fit on the first `origin` steps of every series, forecast the next `h`.

Every model answers one question, `forecast(panel, origins, h, level)`: for each forecast origin
(a step number), the mean and the prediction interval of steps [origin, origin + h) of every
series, fitted only on data before the origin. Hold-out, rolling-origin cross-validation and the
future forecast are all calls of that one function with different origins.

    harmonic       trend + Fourier daily terms, weighted least squares for all series at once (default)
    seasonalnaive  statsforecast SeasonalNaive(season), the baseline every model is scored against
    mstl           statsforecast MSTL(season) with an AutoETS trend: accurate, ~4 s per series
    autoets        statsforecast AutoETS (non-seasonal at minute resolution: ETS takes seasons <= 24)
    timegpt        Nixtla TimeGPT through the `nixtla` client (NIXTLA_API_KEY, NIXTLA_BASE_URL)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from sensorfleet.forecasting.errors import ForecastInputError
from sensorfleet.forecasting.features import design_matrix, phase_steps, weekend_terms
from sensorfleet.forecasting.prepare import Panel, interpolate_gaps

MODEL_CHOICES = ("auto", "harmonic", "mstl", "autoets", "seasonalnaive", "timegpt")
BASELINE = "SeasonalNaive"
TIMEGPT_KEY_MISSING = (
    "--model timegpt needs a Nixtla API key: export NIXTLA_API_KEY=<your key> "
    "(get one at https://dashboard.nixtla.io; NIXTLA_BASE_URL selects another endpoint), or choose --model harmonic"
)


@dataclass
class ForecastBlock:
    """Forecasts of every series of a panel from one origin: arrays of shape (n_series, h)."""

    origin: int
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


Progress = Callable[[int, int], None]


class HarmonicRegression:
    """y = a + b*t + sum_k (c_k sin(2 pi k t / season) + d_k cos(2 pi k t / season)) + noise.

    One weighted least-squares fit per series, all series solved at once: the normal equations
    X'WX and X'Wy of every series come from two matrix products over the panel (W masks the
    missing cells), then one batched solve. Prediction intervals are mean +- z * the residual
    standard deviation of the series (Gaussian noise assumed; parameter uncertainty ignored, which
    is small next to the noise with days of minute data).
    """

    name = "Harmonic"

    def __init__(self, pairs: int = 3, trend: bool = True, ridge: float = 1e-6, calendar: bool = False):
        self.pairs = pairs
        self.trend = trend
        self.ridge = ridge
        self.calendar = calendar  # weekend level and daily profile (features.weekend_terms)
        if calendar:
            self.name = "Harmonic+calendar"

    def fit_predict(self, panel: Panel, origin: int, h: int, level: int) -> tuple[ForecastBlock, np.ndarray]:
        """Forecast block from `origin` and the fitted in-sample values of steps [0, origin)."""
        season = panel.season
        steps = phase_steps(panel, 0, origin + h)
        x = design_matrix(steps, season, self.pairs, self.trend)
        if self.calendar:
            x = np.concatenate([x, weekend_terms(panel.times(0, origin + h), season, self.pairs, steps)], axis=1)
        x_fit, x_new = x[:origin], x[origin:]
        y = panel.y[:, :origin]
        mask = ~np.isnan(y)
        weights = mask.astype(np.float64)
        y0 = np.where(mask, y, 0.0)
        p = x.shape[1]
        outer = (x_fit[:, :, None] * x_fit[:, None, :]).reshape(origin, p * p)
        xtwx = (weights @ outer).reshape(-1, p, p) + self.ridge * np.eye(p)
        xtwy = y0 @ x_fit
        beta = np.linalg.solve(xtwx, xtwy[:, :, None])[:, :, 0]
        fitted = beta @ x_fit.T
        resid = np.where(mask, y - fitted, 0.0)
        dof = np.maximum(mask.sum(axis=1) - p, 1)
        sigma = np.sqrt((resid**2).sum(axis=1) / dof)
        mean = beta @ x_new.T
        z = NormalDist().inv_cdf(0.5 + level / 200.0)
        half = z * sigma[:, None]
        return ForecastBlock(origin, mean, mean - half, mean + half), fitted

    def forecast(self, panel: Panel, origins: Sequence[int], h: int, level: int, progress: Progress | None = None) -> list[ForecastBlock]:
        blocks = []
        for i, origin in enumerate(origins):
            blocks.append(self.fit_predict(panel, origin, h, level)[0])
            if progress:
                progress(i + 1, len(origins))
        return blocks


class SeasonalNaiveBaseline:
    """statsforecast's SeasonalNaive, vectorised across series: the same forecasts and intervals
    (mean = the value one season earlier; sigma from in-sample seasonal differences, widened by
    sqrt(completed seasons + 1)) computed for all series at once instead of one by one.
    `tests/forecasting` checks it against statsforecast.models.SeasonalNaive."""

    name = BASELINE

    def __init__(self, season: int):
        self.season = season

    def forecast(self, panel: Panel, origins: Sequence[int], h: int, level: int, progress: Progress | None = None) -> list[ForecastBlock]:
        s = self.season
        z = NormalDist().inv_cdf(0.5 + level / 200.0)
        widen = np.sqrt(np.floor(np.arange(h) / s) + 1.0)
        blocks = []
        for i, origin in enumerate(origins):
            y = filled_for_fitting(panel.y[:, :origin])
            last = y[:, origin - s : origin]
            mean = last[:, np.arange(h) % s]
            resid = y[:, s:] - y[:, :-s]
            n_obs = (~np.isnan(y)).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                sigma = np.sqrt(np.nansum(resid**2, axis=1) / (n_obs - s))
            sigma = np.where(n_obs > s, sigma, 0.0)
            half = z * sigma[:, None] * widen[None, :]
            blocks.append(ForecastBlock(origin, mean, mean - half, mean + half))
            if progress:
                progress(i + 1, len(origins))
        return blocks


def filled_for_fitting(y: np.ndarray) -> np.ndarray:
    """Every interior gap interpolated and trailing gaps carried forward: statsforecast models and
    TimeGPT take no missing values. Leading gaps (a series that started late) stay NaN."""
    if not np.isnan(y).any():
        return y
    out, _, _ = interpolate_gaps(y.copy(), max_gap=y.shape[1])
    valid = ~np.isnan(out)
    idx = np.where(valid, np.arange(out.shape[1]), -1)
    last = np.maximum.accumulate(idx, axis=1)
    trailing = ~valid & (last >= 0)
    out[trailing] = np.take_along_axis(out, np.maximum(last, 0), axis=1)[trailing]
    return out


def long_frame(panel: Panel, hi: int, id_as: str = "int") -> pd.DataFrame:
    """Long (unique_id, ds, y) frame of steps [0, hi) with gaps filled (see filled_for_fitting)."""
    y = filled_for_fitting(panel.y[:, :hi])
    n, t = y.shape
    keep = ~np.isnan(y).ravel()
    rows = np.repeat(np.arange(n), t)[keep]
    ids = rows if id_as == "int" else panel.ids["unique_id"].to_numpy()[rows]
    ds = np.tile(panel.times(0, hi).tz_convert(None).values, n)[keep]
    return pd.DataFrame({"unique_id": ids, "ds": ds, "y": y.ravel()[keep]})


def _blocks_from_frame(frame: pd.DataFrame, column: str, level: int, n: int, h: int, origin: int, row_of: np.ndarray | None = None) -> ForecastBlock:
    """(unique_id, ds, column, column-lo-L, column-hi-L) rows -> arrays ordered like the panel."""
    rows = frame["unique_id"].to_numpy() if row_of is None else row_of
    rank = frame.groupby("unique_id", sort=False, observed=True).cumcount().to_numpy()
    out = {}
    for key, col in (("mean", column), ("lo", f"{column}-lo-{level}"), ("hi", f"{column}-hi-{level}")):
        block = np.full((n, h), np.nan)
        block[rows.astype(np.int64), rank] = frame[col].to_numpy(dtype=np.float64)
        out[key] = block
    return ForecastBlock(origin, out["mean"], out["lo"], out["hi"])


class StatsForecastModel:
    """A statsforecast model, fitted per series in parallel (n_jobs) on the gap-filled panel."""

    def __init__(self, kind: str, season: int, n_jobs: int = 1):
        from statsforecast.models import MSTL, AutoETS, SeasonalNaive

        self.kind = kind
        if kind == "seasonalnaive":
            self.model = SeasonalNaive(season_length=season)
        elif kind == "mstl":
            self.model = MSTL(season_length=season, trend_forecaster=AutoETS(model="ZZN"))
        elif kind == "autoets":
            # ETS seasons are estimated state by state; beyond 24 it is neither feasible nor offered.
            self.model = AutoETS(season_length=season if season <= 24 else 1)
        else:
            raise ValueError(f"unknown statsforecast model {kind!r}")
        self.name = {"seasonalnaive": BASELINE, "mstl": "MSTL", "autoets": "AutoETS"}[kind]
        self.n_jobs = n_jobs
        self.series_per_chunk = 250

    def forecast(self, panel: Panel, origins: Sequence[int], h: int, level: int, progress: Progress | None = None) -> list[ForecastBlock]:
        from statsforecast import StatsForecast

        sf = StatsForecast(models=[self.model], freq=panel.freq, n_jobs=self.n_jobs)
        column = getattr(self.model, "alias", self.name)
        n = panel.n_series
        chunks = [np.arange(lo, min(n, lo + self.series_per_chunk)) for lo in range(0, n, self.series_per_chunk)]
        blocks = []
        for i, origin in enumerate(origins):
            mean, lo_, hi_ = (np.full((n, h), np.nan) for _ in range(3))
            # Series in chunks bound the long frames' memory; gaps are filled from data before the
            # origin only, so nothing of the scored window leaks into the fit.
            for rows in chunks:
                out = sf.forecast(df=long_frame(panel.subset(rows), origin), h=h, level=[level])
                part = _blocks_from_frame(out, column, level, len(rows), h, origin)
                mean[rows], lo_[rows], hi_[rows] = part.mean, part.lo, part.hi
            blocks.append(ForecastBlock(origin, mean, lo_, hi_))
            if progress:
                progress(i + 1, len(origins))
        return blocks


class TimeGPTModel:
    """Nixtla's hosted TimeGPT through the `nixtla` client: one forecast request per origin."""

    name = "TimeGPT"

    def __init__(self, api_key: str | None = None, base_url: str | None = None, max_retries: int = 2, timeout: int = 60):
        api_key = api_key or os.environ.get("NIXTLA_API_KEY")
        if not api_key:
            raise ForecastInputError(TIMEGPT_KEY_MISSING)
        from nixtla import NixtlaClient

        self.client = NixtlaClient(api_key=api_key, base_url=base_url or os.environ.get("NIXTLA_BASE_URL") or None, max_retries=max_retries, retry_interval=1, timeout=timeout)

    def forecast(self, panel: Panel, origins: Sequence[int], h: int, level: int, progress: Progress | None = None) -> list[ForecastBlock]:
        names = panel.ids["unique_id"].to_numpy()
        row_of_name = {name: i for i, name in enumerate(names)}
        blocks = []
        for i, origin in enumerate(origins):
            train = long_frame(panel, origin, id_as="name")
            out = self.client.forecast(df=train, h=h, freq=panel.freq, level=[level])
            rows = out["unique_id"].map(row_of_name).to_numpy()
            out = out.assign(unique_id=rows)
            blocks.append(_blocks_from_frame(out, "TimeGPT", level, panel.n_series, h, origin))
            if progress:
                progress(i + 1, len(origins))
        return blocks


def make_model(name: str, season: int, n_jobs: int = 1) -> HarmonicRegression | StatsForecastModel | TimeGPTModel:
    if name not in MODEL_CHOICES:
        raise ForecastInputError(f"--model: unknown model {name!r}; choose one of {', '.join(MODEL_CHOICES)}")
    if name in ("auto", "harmonic"):
        return HarmonicRegression()
    if name == "timegpt":
        return TimeGPTModel()
    return StatsForecastModel(name, season, n_jobs)
