"""`sensorfleet detect`: score every reading of a dataset (or a CSV) causally, write the scores,
and, where the data carries labels, score the detector the NAB way beside NAB's reference detectors.

    OUT/scores.parquet   protocol, device, sensor, ts, value, anomaly_score in [0, 1], flag
    OUT/detect.json      readings, throughput, and with labels: NAB scores of every detector and
                         profile, event recall / precision per fault kind
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sensorfleet.detection import detectors, nab

# The ensemble's threshold optimised on the fleet's default data under NAB's standard profile
# (bench/bench_detect.py prints the current optimum); a reading at or above it is flagged.
DEFAULT_THRESHOLD = 0.4
REFERENCES = ("null", "random", "windowed_gaussian")


class DetectInputError(ValueError):
    """Input the detector cannot use; the message names the file, column or row."""


@dataclass
class SeriesFrame:
    """Readings of many series, sorted by series then time; `bounds[i]:bounds[i+1]` is series i."""

    keys: pd.DataFrame  # one row per series: protocol, device, sensor
    ts: np.ndarray  # datetime64[ns, UTC] values
    values: np.ndarray  # float64, NaN = no value
    labels: np.ndarray | None  # object: fault kind or None
    bounds: np.ndarray


@dataclass
class DetectResult:
    scores: pd.DataFrame
    report: dict[str, Any] = field(default_factory=dict)


def series_from_readings(readings: pd.DataFrame) -> SeriesFrame:
    """Group a readings frame (protocol?, device, sensor, ts, value, anomaly?) into sorted series."""
    for column in ("device", "sensor", "ts", "value"):
        if column not in readings.columns:
            raise DetectInputError(f"readings: missing column {column!r}")
    frame = readings
    if "protocol" not in frame.columns:
        frame = frame.assign(protocol="csv")
    key = frame[["protocol", "device", "sensor"]].astype(str)
    codes = key.groupby(["protocol", "device", "sensor"], sort=True, observed=True).ngroup().to_numpy()
    ts = pd.to_datetime(frame["ts"], utc=True).to_numpy(dtype="datetime64[ns]")
    order = np.lexsort((ts, codes))
    codes = codes[order]
    starts = np.flatnonzero(np.diff(np.concatenate([[-1], codes])))
    bounds = np.append(starts, len(codes))
    keys = key.iloc[order[starts]].reset_index(drop=True)
    values = pd.to_numeric(frame["value"], errors="coerce").to_numpy(dtype=np.float64)[order]
    labels = None
    if "anomaly" in frame.columns:
        labels = frame["anomaly"].astype(object).to_numpy()[order]
        labels = np.where(pd.isna(labels), None, labels)
    return SeriesFrame(keys, ts[order], values, labels, bounds)


def read_csv(path: str | Path) -> pd.DataFrame:
    """A user's recording: `timestamp,value[,label]` (label 1/0, true/false, or a fault kind)."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise DetectInputError(f"--csv {path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DetectInputError(f"--csv {path}: not a CSV file ({exc})") from None
    columns = [c.strip().lower() for c in frame.columns]
    frame.columns = columns
    if "timestamp" not in columns or "value" not in columns:
        raise DetectInputError(f"--csv {path}: expected columns timestamp,value[,label], got {','.join(columns)}")
    ts = pd.to_datetime(frame["timestamp"], utc=True, errors="coerce")
    bad = np.flatnonzero(ts.isna().to_numpy())
    if len(bad):
        raise DetectInputError(f"--csv {path}: row {bad[0] + 2}: timestamp {frame['timestamp'].iloc[bad[0]]!r} is not a date-time")
    values = pd.to_numeric(frame["value"], errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy() & frame["value"].notna().to_numpy())
    if len(bad):
        raise DetectInputError(f"--csv {path}: row {bad[0] + 2}: value {frame['value'].iloc[bad[0]]!r} is not a number")
    out = pd.DataFrame({"device": Path(path).stem, "sensor": "value", "ts": ts, "value": values})
    if "label" in columns:
        raw = frame["label"]
        text = raw.astype(str).str.strip().str.lower()
        off = raw.isna() | text.isin(["0", "false", "", "nan", "none", "0.0"])
        on = text.isin(["1", "true", "1.0"])
        out["anomaly"] = np.where(off, None, np.where(on, "anomaly", raw.astype(str)))
    return out


def score_series(frame: SeriesFrame, settings: detectors.DetectorSettings | None = None, with_parts: bool = False) -> tuple[dict[str, np.ndarray], float, float]:
    """Every detector's score of every reading (in the frame's order), and the wall and CPU seconds
    taken by the detectors alone (the throughput figures; CPU time is what one core spent, which
    a shared machine's load does not inflate)."""
    n = len(frame.values)
    parts = {name: np.zeros(n) for name in (*detectors.DETECTORS, "ensemble")} if with_parts else {"ensemble": np.zeros(n)}
    elapsed = cpu = 0.0
    for i in range(len(frame.bounds) - 1):
        lo, hi = frame.bounds[i], frame.bounds[i + 1]
        started, started_cpu = time.perf_counter(), time.process_time()
        z = detectors.detect_series(frame.values[lo:hi], settings)
        elapsed += time.perf_counter() - started
        cpu += time.process_time() - started_cpu
        for name in parts:
            parts[name][lo:hi] = detectors.to_score(z[name])
    return parts, elapsed, cpu


def reference_scores(frame: SeriesFrame, seed: int) -> dict[str, np.ndarray]:
    out = {name: np.zeros(len(frame.values)) for name in REFERENCES}
    for i in range(len(frame.bounds) - 1):
        lo, hi = frame.bounds[i], frame.bounds[i + 1]
        x = frame.values[lo:hi]
        out["null"][lo:hi] = detectors.null_scores(x)
        out["random"][lo:hi] = detectors.random_scores(x, seed + i)
        out["windowed_gaussian"][lo:hi] = detectors.windowed_gaussian_scores(x)
    return out


def nab_report(frame: SeriesFrame, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """NAB scores of each detector (threshold optimised per profile) and, for the ensemble,
    recall / precision per fault kind at its standard-profile threshold."""
    assert frame.labels is not None
    out: dict[str, Any] = {"detectors": {}}
    prepared: dict[str, list[nab.SeriesScoring]] = {}
    for name, values in scores.items():
        prepared[name] = [nab.prepare_series(values[lo:hi], frame.labels[lo:hi]) for lo, hi in zip(frame.bounds[:-1], frame.bounds[1:])]
        results = nab.score_corpus(prepared[name])
        out["detectors"][name] = {p: vars(r) for p, r in results.items()}
    first = next(iter(prepared.values()))
    out["windows"] = sum(len(s.windows) for s in first)
    out["series"] = len(first)
    if "ensemble" in prepared:
        threshold = out["detectors"]["ensemble"]["standard"]["threshold"]
        out["per_kind"] = nab.per_kind(prepared["ensemble"], threshold)
        out["per_kind_at_default_threshold"] = nab.per_kind(prepared["ensemble"], DEFAULT_THRESHOLD)
    return out


def detect(readings: pd.DataFrame, out: Path | None, threshold: float = DEFAULT_THRESHOLD, evaluate: bool = True, seed: int = 0) -> DetectResult:
    """Score `readings`, write OUT/scores.parquet and OUT/detect.json (when `out` is given)."""
    frame = series_from_readings(readings)
    has_labels = evaluate and frame.labels is not None and any(x is not None for x in frame.labels)
    parts, elapsed, cpu = score_series(frame, with_parts=has_labels)
    score = parts["ensemble"]
    table = frame.keys.iloc[np.repeat(np.arange(len(frame.keys)), np.diff(frame.bounds))].reset_index(drop=True)
    table["ts"] = pd.to_datetime(frame.ts, utc=True)
    table["value"] = frame.values
    table["anomaly_score"] = score
    table["flag"] = score >= threshold
    report: dict[str, Any] = {
        "readings": int(len(score)),
        "series": int(len(frame.keys)),
        "flagged": int(table["flag"].sum()),
        "threshold": threshold,
        "detector_seconds": round(elapsed, 4),
        "detector_cpu_seconds": round(cpu, 4),
        "readings_per_second": round(len(score) / elapsed) if elapsed > 0 else None,
        "readings_per_cpu_second": round(len(score) / cpu) if cpu > 0 else None,
    }
    if has_labels:
        scored = dict(parts, **reference_scores(frame, seed))
        report["nab"] = nab_report(frame, scored)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_parquet(out / "scores.parquet", index=False)
        (out / "detect.json").write_text(json.dumps(report, indent=2, default=float))
    return DetectResult(table, report)
