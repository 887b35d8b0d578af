"""Stage 4, evaluation: hold-out and rolling-origin cross-validation scores from utilsforecast.

The forecast table (one row per series, window and step) holds every model's forecasts of the
scored windows: `cv1..cvN` (rolling origins, each fitted only on data before it) and `test` (the
hold-out: the last h steps). MAE, RMSE, sMAPE and MASE are computed per series with
`utilsforecast.evaluation.evaluate`; MASE is scaled by the in-sample seasonal-naive error of the
history before the earliest origin (one scale per series, shared by all windows, no peeking).
The headline comparison is the model's mean MASE over the baseline's (SeasonalNaive) mean MASE.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from utilsforecast.evaluation import evaluate
from utilsforecast.losses import mae, mase, rmse, smape

METRICS = ("mae", "rmse", "smape", "mase")


TrainFrames = pd.DataFrame | Callable[[np.ndarray], pd.DataFrame]
SERIES_PER_CHUNK = 200


def score_window(table: pd.DataFrame, models: list[str], train: TrainFrames, season: int) -> pd.DataFrame:
    """Per-series metrics of the given rows (series by panel row `sid`; `train` has integer
    unique_id = sid): columns unique_id, metric, one column per model."""
    rows = table.dropna(subset=["y", *models])
    if rows.empty:
        return pd.DataFrame(columns=["unique_id", "metric", *models])
    # Integer series ids (the panel row, `sid`) keep the ten-million-row training frame compact.
    df = rows[["sid", "ds", "y", *models]].rename(columns={"sid": "unique_id"})
    seasonal_scale = partial(mase, seasonality=season)
    seasonal_scale.__name__ = "mase"  # evaluate names the metric after the function
    sids = np.unique(df["unique_id"].to_numpy())
    if isinstance(train, pd.DataFrame):
        return evaluate(df, metrics=[mae, rmse, smape, seasonal_scale], models=models, train_df=train[train["unique_id"].isin(sids)])
    # Series in chunks: the MASE scale needs each series' whole history, and ten million rows of
    # it at once would cost more memory than the rest of the job.
    parts = []
    for lo in range(0, len(sids), SERIES_PER_CHUNK):
        chunk = sids[lo : lo + SERIES_PER_CHUNK]
        parts.append(evaluate(df[df["unique_id"].isin(chunk)], metrics=[mae, rmse, smape, seasonal_scale], models=models, train_df=train(chunk)))
    return pd.concat(parts, ignore_index=True)


def aggregate(per_series: pd.DataFrame, models: list[str], baseline: str) -> dict[str, dict[str, float | None]]:
    """Mean of each metric over series, per model, plus MASE relative to the baseline."""
    out: dict[str, dict[str, float | None]] = {}
    finite = per_series.replace([np.inf, -np.inf], np.nan)
    for model in models:
        stats: dict[str, float | None] = {}
        for metric in METRICS:
            values = finite.loc[finite["metric"] == metric, model]
            stats[metric] = _round(values.mean()) if values.notna().any() else None
        out[model] = stats
    base = out.get(baseline, {}).get("mase")
    mase_rows = finite[finite["metric"] == "mase"]
    for model in models:
        value = out[model]["mase"]
        out[model]["mase_vs_baseline"] = _round(value / base) if value is not None and base else None
        if baseline in mase_rows and model != baseline:
            both = mase_rows[[model, baseline]].dropna()
            out[model]["beats_baseline_share"] = _round(float((both[model] < both[baseline]).mean())) if len(both) else None
    return out


def by_group(per_series: pd.DataFrame, ids: pd.DataFrame, models: list[str], column: str) -> dict[str, dict[str, float | None]]:
    """Mean MASE and MAE per value of `column` (protocol or sensor), per model."""
    merged = per_series.assign(**{column: ids[column].to_numpy()[per_series["sid"].to_numpy()]})
    out: dict[str, dict[str, float | None]] = {}
    for key, group in merged.groupby(column, observed=True):
        out[str(key)] = {
            f"{model}_{metric}": _round(group.loc[group["metric"] == metric, model].replace([np.inf, -np.inf], np.nan).mean())
            for model in models
            for metric in ("mae", "mase")
        }
    return out


def evaluate_forecasts(table: pd.DataFrame, models: list[str], baseline: str, train: TrainFrames, season: int, ids: pd.DataFrame) -> dict[str, Any]:
    """Scores of the hold-out window and of the pooled CV windows, per series and aggregated.

    `train` is the history before the earliest origin as a long frame with integer unique_id
    (= sid), or a function returning that frame for an array of sids."""
    per_split, windows = {}, {}
    for split, rows in (("holdout", table[table["window"] == "test"]), ("cv", table[table["window"].str.startswith("cv")])):
        if rows.empty:
            continue
        per_series = score_window(rows, models, train, season).rename(columns={"unique_id": "sid"})
        per_series.insert(0, "unique_id", ids["unique_id"].to_numpy()[per_series["sid"].to_numpy()])
        per_split[split], windows[split] = per_series, int(rows["window"].nunique())
    return summarise_scores(per_split, windows, ids, models, baseline)


def summarise_scores(per_split: dict[str, pd.DataFrame], windows: dict[str, int], ids: pd.DataFrame, models: list[str], baseline: str) -> dict[str, Any]:
    """The aggregates of per-series scores (columns unique_id, sid = row of `ids`, metric, one per
    model), per split: a function of the per-series rows only, so the merge of shards gets the
    same figures as one run over every series."""
    result: dict[str, Any] = {"per_series": {}}
    rank = {m: i for i, m in enumerate(METRICS)}
    for split, per_series in per_split.items():
        # One order (series, then metric) whatever the chunking or sharding that produced the rows:
        # the means below then add the same numbers in the same order.
        per_series = per_series.assign(_rank=per_series["metric"].map(rank)).sort_values(["sid", "_rank"], kind="stable").drop(columns="_rank").reset_index(drop=True)
        result["per_series"][split] = per_series
        result[split] = {
            "windows": windows[split],
            "series": int(per_series["sid"].nunique()),
            "models": aggregate(per_series, models, baseline),
            "by_protocol": by_group(per_series, ids, models, "protocol"),
            "by_sensor": by_group(per_series, ids, models, "sensor"),
        }
    return result


def _round(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 6)
