"""Stage 2, features: calendar terms, Fourier terms of the daily cycle, rolling statistics, lags.

The harmonic model regresses on `design_matrix` (trend + Fourier terms); the plots and anyone who
wants exogenous features for another model use `feature_frame` (one row per series and step).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sensorfleet.forecasting.prepare import Panel


def fourier_terms(steps: np.ndarray, season: int, pairs: int) -> np.ndarray:
    """sin/cos of the first `pairs` harmonics of a cycle `season` steps long: shape (len(steps), 2*pairs)."""
    if season <= 1 or pairs <= 0:
        return np.empty((len(steps), 0))
    angle = 2.0 * np.pi * np.asarray(steps, dtype=np.float64)[:, None] / season
    k = np.arange(1, pairs + 1, dtype=np.float64)[None, :]
    return np.concatenate([np.sin(angle * k), np.cos(angle * k)], axis=1)


def design_matrix(steps: np.ndarray, season: int, pairs: int, trend: bool = True) -> np.ndarray:
    """Intercept, linear trend (in seasons, so coefficients stay well scaled) and Fourier terms."""
    steps = np.asarray(steps, dtype=np.float64)
    columns = [np.ones((len(steps), 1))]
    if trend:
        columns.append((steps / max(season, 1))[:, None])
    columns.append(fourier_terms(steps, season, pairs))
    return np.concatenate(columns, axis=1)


def phase_steps(panel: Panel, lo: int, hi: int) -> np.ndarray:
    """Step numbers counted from midnight UTC of the panel's first day, so that Fourier terms of a
    daily season line up with the clock whatever time the window starts."""
    offset = (panel.start - panel.start.normalize()) // panel.step
    return np.arange(lo, hi) + int(offset)


def weekend_terms(times: pd.DatetimeIndex, season: int, pairs: int, steps: np.ndarray) -> np.ndarray:
    """Calendar columns of the harmonic design: a weekend indicator (Saturday and Sunday, UTC) and
    the daily Fourier terms times it, so weekends get their own level and daily profile (plants
    run weekday shifts). All zero, and so fitted as 0 by the ridge, when no weekend is seen."""
    weekend = np.asarray(times.dayofweek >= 5, dtype=np.float64)[:, None]
    return np.concatenate([weekend, weekend * fourier_terms(steps, season, pairs)], axis=1)


def calendar_features(ds: pd.DatetimeIndex) -> pd.DataFrame:
    return pd.DataFrame({"hour": ds.hour + ds.minute / 60.0, "dayofweek": ds.dayofweek}, index=ds)


def rolling_stats(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Trailing rolling mean and standard deviation per row (NaN-aware, at least half a window)."""
    frame = pd.DataFrame(values.T)
    roll = frame.rolling(window, min_periods=max(1, window // 2))
    return roll.mean().to_numpy().T, roll.std().to_numpy().T


def lags(values: np.ndarray, lag: int) -> np.ndarray:
    out = np.full(values.shape, np.nan)
    if 0 < lag < values.shape[1]:
        out[:, lag:] = values[:, :-lag]
    return out


def feature_frame(panel: Panel, rows: np.ndarray, window: int | None = None, lo: int = 0, hi: int | None = None) -> pd.DataFrame:
    """Long frame for the given series rows: y, hour, dayofweek, rolling mean/std, lag 1 and lag one season."""
    hi = panel.n_steps if hi is None else hi
    window = window or max(2, panel.season // 24)  # an hour of 1-minute data
    y = panel.y[rows]
    mean, std = rolling_stats(y, window)
    lag1, lag_season = lags(y, 1), lags(y, panel.season)
    ds = panel.times(lo, hi)
    cal = calendar_features(ds)
    frames = []
    for i, row in enumerate(np.asarray(rows).tolist()):
        frames.append(
            pd.DataFrame(
                {
                    "unique_id": panel.ids["unique_id"].iat[row],
                    "ds": ds,
                    "y": y[i, lo:hi],
                    "hour": cal["hour"].to_numpy(),
                    "dayofweek": cal["dayofweek"].to_numpy(),
                    f"rolling_mean_{window}": mean[i, lo:hi],
                    f"rolling_std_{window}": std[i, lo:hi],
                    "lag_1": lag1[i, lo:hi],
                    f"lag_{panel.season}": lag_season[i, lo:hi],
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
