"""Stage 5, anomaly flags: readings outside the model's prediction interval, scored against the
simulator's ground truth.

A reading is judged against the forecast made before it was taken (the scored windows: CV
origins and the hold-out), so a flag means "the model did not expect this", not "the model
fitted this badly". The reading is the resampled value as collected (`y_raw`, before cleaning).
Dropouts carry no value, so no interval can flag them; they are counted apart (the prepare
stage reports them as gaps).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

SCORED_KINDS = ("spike", "stuck")


def flag(table: pd.DataFrame, model: str, level: int) -> pd.Series:
    """True where the reading lies outside [lo, hi] of `model` at `level`."""
    lo, hi = table[f"{model}-lo-{level}"], table[f"{model}-hi-{level}"]
    y = table["y_raw"]
    return (y.notna() & ((y < lo) | (y > hi))).rename("anomaly_flag")


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def score_flags(table: pd.DataFrame, flags: pd.Series) -> dict[str, Any]:
    """Precision and recall of the flags against injected spikes and stuck-at readings."""
    has_value = table["y_raw"].notna().to_numpy()
    truth = table["truth"].astype(object).to_numpy()
    flagged = flags.to_numpy() & has_value
    injected = np.isin(truth, SCORED_KINDS) & has_value
    tp = int((flagged & injected).sum())
    out: dict[str, Any] = {
        "readings": int(has_value.sum()),
        "flagged": int(flagged.sum()),
        "injected": int(injected.sum()),
        "true_positives": tp,
        "precision": _ratio(tp, int(flagged.sum())),
        "recall": _ratio(tp, int(injected.sum())),
        "dropouts_unscorable": int((truth == "dropout").sum()),
        "by_kind": {},
    }
    for kind in SCORED_KINDS:
        mask = (truth == kind) & has_value
        out["by_kind"][kind] = {"injected": int(mask.sum()), "flagged": int((flagged & mask).sum()), "recall": _ratio(int((flagged & mask).sum()), int(mask.sum()))}
    return out


def detect(table: pd.DataFrame, model: str, level: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Flags on every scored row (not the future) and their scores, overall and for the hold-out."""
    scored = table["window"] != "future"
    flags = flag(table, model, level) & scored
    table = table.assign(anomaly_flag=flags)
    return table, summarise_flags(table, model, level)


def summarise_flags(table: pd.DataFrame, model: str, level: int) -> dict[str, Any]:
    """The scores of a table's `anomaly_flag` column (counts over rows: a merge of shards'
    tables scores the same as one run)."""
    scored = table["window"] != "future"
    test = table["window"] == "test"
    flags = table["anomaly_flag"]
    return {
        "model": model,
        "level": level,
        "scored_windows": score_flags(table[scored], flags[scored]),
        "holdout": score_flags(table[test], flags[test]),
    }
