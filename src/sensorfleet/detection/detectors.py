"""Causal anomaly detectors over one series: the score of reading t uses readings 0..t only.

Every detector is a handful of linear recursive filters (scipy.signal.lfilter, the C loop of an
IIR filter: exponential moving averages run at hundreds of millions of samples a second) and
cumulative sums, never a Python loop over readings. Each returns an *equivalent z*: how many
standard deviations of its null distribution the reading is away, so detectors of different kinds
can be compared and combined; `to_score` maps z to [0, 1] (z = 4 gives 0.5).

    residual   |x_t - EWMA_{t-1}| over a causal robust scale (EW mean absolute residual): spikes, steps
    stuck      run of exactly repeated values against the series' own repeat rate: stuck-at sensors
    shift      windowed mean of standardised residuals of a trend-following (Brown) predictor:
               level shifts and drift faults that a fast predictor adapts to
    variance   log ratio of a fast to a slow EW variance of residuals: noise bursts, oscillations
    ramp       the OLS slopes of the last RAMP_PARTS windows of RAMP_WINDOW readings, all of one sign:
               the smallest, over the series' typical slope. A drift fault walks one way for
               longer than the plant's setpoint ramps (regime_ramp_hours) and weather turn
    gap        a missing value (dropout, outage) is an anomaly by itself

`ensemble` is the maximum of the detectors' z (the shift test's weighted by SHIFT_WEIGHT: weather
and setpoint ramps make its null wider than its Gaussian calibration; the ramp test's by
RAMP_WEIGHT, which maps its null tail onto the others'), then debounced: a reading
keeps its score only when it exceeds every score of the previous DEBOUNCE readings (an alarm that
is already raised is not raised again at each reading). Both steps are causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter
from scipy.special import ndtri

Z_AT_HALF = 4.0  # the z that maps to score 0.5
SHIFT_WEIGHT = 0.6  # measured on the fleet's data: 0.5-0.7 add found level shifts without false alarms
DEBOUNCE = 30  # readings
# Measured on the fleet's data (bench/bench_detect.py, docs/detection.md): 1.6 doubles drift-fault
# recall for 0.2 of NAB standard score; 1.4 finds no more drifts, 2.0 costs 3 points.
RAMP_WEIGHT = 1.6
DETECTORS = ("residual", "stuck", "shift", "variance", "ramp", "gap")


@dataclass(frozen=True)
class DetectorSettings:
    """Time constants in readings; the defaults were picked on the fleet's data (bench/bench_detect.py)."""

    fast: float = 0.3  # EWMA weight of the one-step predictor
    scale: float = 0.01  # EW weight of the residual scale (~100 readings)
    trend: float = 0.03  # Brown double-EWMA weight of the shift detector's predictor
    shift_window: int = 10  # readings averaged by the shift test
    variance_fast: float = 0.1  # EW weight of the fast variance (~10 readings)
    variance_slow: float = 0.003  # EW weight of the slow variance (~300 readings)
    repeat: float = 0.002  # EW weight of the repeat-rate estimate
    ramp_window: int = 30  # readings of each slope window of the ramp test
    ramp_parts: int = 3  # consecutive windows that must slope the same way
    ramp_scale: float = 0.002  # EW weight of the typical squared slope (~500 readings)
    ramp_weight: float = RAMP_WEIGHT  # 0 leaves the ramp test out of the ensemble (the bench's "before")
    warmup: int = 30  # readings before a detector speaks (its estimates are not ready)


def ewma(x: np.ndarray, alpha: float, initial: float | None = None) -> np.ndarray:
    """y_t = alpha x_t + (1 - alpha) y_{t-1}, started at `initial` (default x_0)."""
    if len(x) == 0:
        return x.astype(np.float64)
    start = x[0] if initial is None else initial
    y, _ = lfilter([alpha], [1.0, alpha - 1.0], x, zi=[(1.0 - alpha) * start])
    return y


def lagged(x: np.ndarray, first: float = np.nan) -> np.ndarray:
    """x shifted one step later: element t holds x_{t-1}, so a statistic never sees its own reading."""
    out = np.empty_like(x)
    if len(x):
        out[0] = first
        out[1:] = x[:-1]
    return out


def fill_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Missing values replaced by the last value seen (causal), and the mask of what was missing."""
    missing = np.isnan(x)
    if not missing.any():
        return x, missing
    idx = np.where(~missing, np.arange(len(x)), -1)
    np.maximum.accumulate(idx, out=idx)
    first = np.flatnonzero(~missing)
    filled = x[np.maximum(idx, 0)]
    if len(first):
        filled[: first[0]] = x[first[0]]
    else:
        filled[:] = 0.0
    return filled, missing


def to_score(z: np.ndarray) -> np.ndarray:
    """Equivalent z -> [0, 1]: z^2 / (z^2 + Z_AT_HALF^2), monotone, 0 at z = 0."""
    z2 = np.square(np.maximum(z, 0.0))
    return z2 / (z2 + Z_AT_HALF**2)


def _scale_floor(x: np.ndarray, warmup: int) -> float:
    """A floor for scale estimates so a perfectly flat start does not divide by zero; from the
    warm-up readings only (scores inside the warm-up are zero, so causality holds)."""
    head = x[: max(1, min(len(x), warmup))]
    spread = float(np.max(np.abs(head - np.median(head)))) if len(head) else 0.0
    return max(1e-9, 1e-6 * spread)


def one_step_residual(x: np.ndarray, s: DetectorSettings) -> np.ndarray:
    """x_t - EWMA_{t-1}(x): the residual of the fast one-step predictor."""
    return x - lagged(ewma(x, s.fast), x[0] if len(x) else 0.0)


def residual_z(x: np.ndarray, s: DetectorSettings, residual: np.ndarray | None = None) -> np.ndarray:
    """|x_t - EWMA_{t-1}(x)| / (1.2533 * EW mean |residual| up to t-1): 1.2533 turns a mean
    absolute deviation into a Gaussian sigma."""
    r = np.abs(one_step_residual(x, s) if residual is None else residual)
    scale = lagged(ewma(r, s.scale, initial=float(np.mean(r[: s.warmup])) if len(r) else 0.0), np.inf) * 1.2533
    return r / np.maximum(scale, _scale_floor(x, s.warmup))


def stuck_z(x: np.ndarray, missing: np.ndarray, s: DetectorSettings) -> np.ndarray:
    """A run of L equal readings has probability q^(L-1) when readings repeat at rate q by chance;
    q is the series' own repeat rate up to t-1 (quantized sensors repeat often, precise ones never)."""
    n = len(x)
    same = np.zeros(n, dtype=bool)
    same[1:] = (x[1:] == x[:-1]) & ~missing[1:] & ~missing[:-1]
    # length of the run of repeats ending at t: t - (index of the last non-repeat)
    idx = np.where(~same, np.arange(n), 0)
    np.maximum.accumulate(idx, out=idx)
    run = np.arange(n) - idx  # repeats so far in this run
    q = lagged(ewma(same.astype(np.float64), s.repeat, initial=0.05), 0.05)
    q = np.clip(q, 1e-3, 0.95)
    log_p = run * np.log(q)  # log P(this many repeats in a row)
    p = np.exp(np.maximum(log_p, -700.0))
    z = ndtri(1.0 - np.clip(p, 1e-300, 1.0) / 2.0)
    return np.where(run > 0, z, 0.0)


def brown_forecast(x: np.ndarray, alpha: float) -> np.ndarray:
    """One-step forecast of Brown's linear exponential smoothing, made at t-1 for t."""
    s1 = ewma(x, alpha)
    s2 = ewma(s1, alpha)
    level = 2.0 * s1 - s2
    trend = alpha / (1.0 - alpha) * (s1 - s2)
    return lagged(level + trend, x[0] if len(x) else 0.0)


def shift_z(x: np.ndarray, s: DetectorSettings) -> np.ndarray:
    """Mean of the standardised residuals e_t / sigma_{t-1} of a trend-following (Brown) predictor
    over the last `shift_window` readings, times sqrt(window): under no change it is N(0, 1); a
    level shift or a drift fault keeps e on one side while the slow predictor catches up. A
    windowed mean rather than a resetting CUSUM: the same evidence, and it vectorises (a running
    sum difference) and forgets a past change by itself."""
    e = x - brown_forecast(x, s.trend)
    scale = lagged(np.sqrt(ewma(e * e, s.scale, initial=float(np.mean(e[: s.warmup] ** 2)) if len(e) else 0.0)), np.inf)
    z = np.clip(e / np.maximum(scale, _scale_floor(x, s.warmup)), -8.0, 8.0)
    w = s.shift_window
    c = np.concatenate([[0.0], np.cumsum(z)])
    idx = np.arange(1, len(x) + 1)
    count = np.minimum(idx, w)
    window_sum = c[idx] - c[idx - count]
    return np.abs(window_sum) / np.sqrt(count)


def window_slopes(x: np.ndarray, window: int) -> np.ndarray:
    """OLS slope of the `window` readings ending at each t (0 before a full window), from running
    sums of x and j*x: O(n) whatever the window."""
    n = len(x)
    if n < window:
        return np.zeros(n)
    x0 = x - x[0]  # the sums stay small: exact enough over a week of readings
    j = np.arange(n, dtype=np.float64)
    sum_x = np.concatenate([[0.0], np.cumsum(x0)])
    sum_jx = np.concatenate([[0.0], np.cumsum(j * x0)])
    hi = np.arange(window, n + 1)  # windows [hi - window, hi)
    sx, sjx = sum_x[hi] - sum_x[hi - window], sum_jx[hi] - sum_jx[hi - window]
    centre = hi - window + (window - 1) / 2.0
    out = np.zeros(n)
    out[window - 1 :] = (sjx - centre * sx) / (window * (window * window - 1) / 12.0)
    return out


def ramp_z(x: np.ndarray, s: DetectorSettings) -> np.ndarray:
    """The smallest |slope| of the last `ramp_parts` windows when all slope one way (else 0), over
    the EW RMS slope up to t-1: large only when the series has walked one way for
    ramp_parts x ramp_window readings."""
    w, k = s.ramp_window, s.ramp_parts
    b = window_slopes(x, w)
    n = len(x)
    if n < w * k:
        return np.zeros(n)
    parts = np.stack([lagged_by(b, i * w) for i in range(k)])
    one_way = np.all(np.sign(parts) == np.sign(parts[0]), axis=0) & (parts[0] != 0)
    smallest = np.where(one_way, np.min(np.abs(parts), axis=0), 0.0)
    ready = w * k + s.warmup
    scale = lagged(np.sqrt(ewma(b * b, s.ramp_scale, initial=float(np.mean(b[w * k : ready] ** 2)) if n > w * k else 0.0)), np.inf)
    z = smallest / np.maximum(scale, _scale_floor(x, s.warmup) / w)
    z[: min(n, ready)] = 0.0
    return z


def lagged_by(x: np.ndarray, steps: int) -> np.ndarray:
    """x shifted `steps` later (zeros before)."""
    if steps == 0:
        return x
    out = np.zeros_like(x)
    out[steps:] = x[:-steps]
    return out


def variance_z(x: np.ndarray, s: DetectorSettings, residual: np.ndarray | None = None) -> np.ndarray:
    """log(fast EW variance / slow EW variance up to t-1) over its null spread sqrt(2 / dof),
    dof = 2 / alpha_fast - 1, on residuals of the one-step predictor."""
    r2 = np.square(one_step_residual(x, s) if residual is None else residual)
    start = float(np.mean(r2[: s.warmup])) if len(r2) else 0.0
    fast = ewma(r2, s.variance_fast, initial=start)
    slow = lagged(ewma(r2, s.variance_slow, initial=start), np.inf)
    floor = _scale_floor(x, s.warmup) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(np.maximum(fast, floor) / np.maximum(slow, floor))
    dof = 2.0 / s.variance_fast - 1.0
    return ratio / np.sqrt(2.0 / dof)


def detect_series(values: np.ndarray, settings: DetectorSettings | None = None) -> dict[str, np.ndarray]:
    """Every detector's equivalent z for one series (float64, NaN = missing), plus `ensemble`."""
    s = settings or DetectorSettings()
    x, missing = fill_forward(np.asarray(values, dtype=np.float64))
    residual = one_step_residual(x, s)
    out = {
        "residual": residual_z(x, s, residual),
        "stuck": stuck_z(x, missing, s),
        "shift": shift_z(x, s),
        "variance": variance_z(x, s, residual),
        "ramp": ramp_z(x, s),
        "gap": np.where(missing, 10.0, 0.0),
    }
    warm = np.arange(len(x)) < s.warmup
    for name in ("residual", "stuck", "shift", "variance", "ramp"):
        z = out[name]
        z[missing | warm | ~np.isfinite(z)] = 0.0
    weights = {"shift": SHIFT_WEIGHT, "ramp": s.ramp_weight}
    combined = np.max(np.stack([out[k] * weights.get(k, 1.0) for k in DETECTORS]), axis=0)
    out["ensemble"] = debounce(combined, DEBOUNCE)
    return out


def debounce(z: np.ndarray, window: int) -> np.ndarray:
    """z_t where it exceeds max(z_{t-window} .. z_{t-1}), else 0: only a rising alarm speaks."""
    if len(z) == 0 or window < 1:
        return z
    from scipy.ndimage import maximum_filter1d

    # running max of z_{t-window+1} .. z_t (origin puts the window behind t), then one step later
    trailing = maximum_filter1d(z, size=window, origin=(window - 1) // 2, mode="constant", cval=0.0)
    previous = lagged(trailing, 0.0)
    return np.where(z > previous, z, 0.0)


# --- the published NAB reference detectors ---------------------------------------------------------

def null_scores(values: np.ndarray) -> np.ndarray:
    """NAB's null detector: never anomalous."""
    return np.zeros(len(values))


def random_scores(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """NAB's random detector: a uniform random score per reading (seeded)."""
    return np.random.default_rng(seed).random(len(values))


def windowed_gaussian_scores(values: np.ndarray, window: int = 6400) -> np.ndarray:
    """NAB's windowed Gaussian: the Gaussian tail probability of the reading under the mean and
    standard deviation of the previous `window` readings (causal), as 1 - two-sided p."""
    import pandas as pd
    from scipy.special import ndtr

    x, missing = fill_forward(np.asarray(values, dtype=np.float64))
    series = pd.Series(x)
    mean = series.rolling(window, min_periods=2).mean().shift(1).to_numpy()
    std = series.rolling(window, min_periods=2).std().shift(1).to_numpy()
    z = np.abs(x - mean) / np.where(std > 0, std, np.inf)
    score = 1.0 - 2.0 * ndtr(-z)
    score[~np.isfinite(score) | missing] = 0.0
    return score
