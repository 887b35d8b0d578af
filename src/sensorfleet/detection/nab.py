"""Scoring like the Numenta Anomaly Benchmark (Ahmad, Lavin, Purdy, Agha 2017; numenta/NAB).

Per series of n readings with k labelled events (contiguous runs of one fault kind):
- a window of 0.1 n / k readings is centred on each event (widened to cover a longer event;
  overlapping windows merge, as NAB's labeller does);
- the first 15 % of the series (at most 750 readings) is NAB's probationary period: not scored;
- a detection is a reading whose score is >= the threshold. Inside a window only the first one
  counts: it earns tp_weight x sigma(p), p = -(right - i + 1) / width in [-1, 0) its position,
  sigma(p) = 2 / (1 + e^{5p}) - 1 NAB's scaled sigmoid (0.987 at the window's start, 0 at its end);
  a window without a detection costs fn_weight;
- a detection outside every window costs fp_weight x |sigma(d)|, d = (i - right of the previous
  window) / (width - 1) (just after a window it costs little, then the full weight); before any
  window it costs fp_weight;
- raw scores add up over the corpus; normalised = 100 (raw - null) / (perfect - null), null the
  detector that never fires (-fn_weight per window), perfect a detection at every window's start;
- the threshold is optimised per profile over the corpus (a grid of 300 candidate thresholds
  placed on the tail of the pooled scores: NAB's own optimiser is a local search over the same
  objective).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

PROFILES: dict[str, dict[str, float]] = {
    "standard": {"tp": 1.0, "fp": 0.11, "fn": 1.0},
    "reward_low_fp": {"tp": 1.0, "fp": 0.22, "fn": 1.0},
    "reward_low_fn": {"tp": 1.0, "fp": 0.11, "fn": 2.0},
}
PROBATION_FRACTION, PROBATION_MAX = 0.15, 750
WINDOW_FRACTION = 0.10


def scaled_sigmoid(position: np.ndarray | float) -> np.ndarray:
    """NAB's scaled sigmoid: 2 / (1 + exp(5 p)) - 1, and -1 beyond p > 3 (far past a window)."""
    p = np.asarray(position, dtype=np.float64)
    return np.where(p > 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * p)) - 1.0)


def probation_length(n: int) -> int:
    return int(min(np.floor(PROBATION_FRACTION * n), PROBATION_FRACTION * 5000))


@dataclass
class Window:
    left: int  # first reading inside, inclusive
    right: int  # last reading inside, inclusive
    kinds: list[str] = field(default_factory=list)


def label_events(labels: Sequence[str | None] | np.ndarray) -> list[tuple[int, int, str]]:
    """(start, end inclusive, kind) of each contiguous run of one non-null label."""
    arr = np.asarray(labels, dtype=object)
    n = len(arr)
    if n == 0:
        return []
    present = np.array([a is not None and a == a and a != "" for a in arr])  # None, NaN and "" are no label
    codes = np.where(present, arr, None)
    change = np.ones(n, dtype=bool)
    change[1:] = codes[1:] != codes[:-1]
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:] - 1, n - 1)
    return [(int(a), int(b), str(codes[a])) for a, b in zip(starts, ends) if codes[a] is not None]


def make_windows(n: int, events: list[tuple[int, int, str]]) -> list[Window]:
    """NAB windows: 10 % of the series over the number of events, centred on each event, merged."""
    if not events:
        return []
    width = max(1, int(WINDOW_FRACTION * n / len(events)))
    windows: list[Window] = []
    for start, end, kind in events:
        centre = (start + end) / 2.0
        left = int(np.floor(centre - width / 2.0))
        right = left + width - 1
        left, right = max(0, min(left, start)), min(n - 1, max(right, end))
        if windows and left <= windows[-1].right + 1:
            windows[-1].right = max(windows[-1].right, right)
            windows[-1].kinds.append(kind)
        else:
            windows.append(Window(left, right, [kind]))
    return windows


@dataclass
class SeriesScoring:
    """One series, prepared for any threshold: per-point weights, windows, probation."""

    scores: np.ndarray
    windows: list[Window]
    probation: int
    sweep: np.ndarray  # unweighted NAB value of a detection at each reading (inside: >= 0, outside: < 0)
    window_of: np.ndarray  # window number of each reading, -1 outside


def prepare_series(scores: np.ndarray, labels: Sequence[str | None] | np.ndarray) -> SeriesScoring:
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    windows = make_windows(n, label_events(labels))
    probation = probation_length(n)
    windows = [w for w in windows if w.right >= probation]
    window_of = np.full(n, -1, dtype=np.int64)
    sweep = np.full(n, -1.0)
    previous_right, previous_width = None, None
    cursor = 0
    for number, w in enumerate(windows):
        outside = np.arange(cursor, w.left)
        if previous_right is not None and len(outside):
            sweep[outside] = scaled_sigmoid(np.abs(previous_right - outside) / max(previous_width - 1, 1))
        width = w.right - w.left + 1
        inside = np.arange(w.left, w.right + 1)
        window_of[inside] = number
        sweep[inside] = scaled_sigmoid(-(w.right - inside + 1) / width)
        previous_right, previous_width, cursor = w.right, width, w.right + 1
    if previous_right is not None and cursor < n:
        tail = np.arange(cursor, n)
        sweep[tail] = scaled_sigmoid(np.abs(previous_right - tail) / max(previous_width - 1, 1))
    return SeriesScoring(scores, windows, probation, sweep, window_of)


def candidate_thresholds(all_scores: np.ndarray, count: int = 300) -> np.ndarray:
    """Thresholds on the tail of the pooled scores (where the best one always lies), plus +inf
    (never fire: the null detector's score)."""
    finite = all_scores[np.isfinite(all_scores)]
    if len(finite) == 0:
        return np.array([np.inf])
    tail = 1.0 - np.logspace(-7, 0, count)
    q = np.unique(np.quantile(finite, np.clip(tail, 0.0, 1.0)))
    q = q[q > 0] if (q > 0).any() else q
    return np.append(q, np.inf)


def raw_scores(series: list[SeriesScoring], thresholds: np.ndarray, profile: dict[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Raw NAB score of every threshold over the corpus, and its TP / FP / FN counts."""
    total = np.zeros(len(thresholds))
    tp = np.zeros(len(thresholds), dtype=np.int64)
    fp = np.zeros(len(thresholds), dtype=np.int64)
    fn = np.zeros(len(thresholds), dtype=np.int64)
    for s in series:
        scored = np.arange(len(s.scores)) >= s.probation
        # False positives: every detection outside the windows (after probation).
        out = scored & (s.window_of < 0)
        out_scores, out_sweep = s.scores[out], s.sweep[out]
        order = np.argsort(-out_scores, kind="stable")
        sorted_scores = out_scores[order]
        cum = np.concatenate([[0.0], np.cumsum(out_sweep[order])])
        # number of outside readings with score >= threshold
        count = np.searchsorted(-sorted_scores, -thresholds, side="right")
        total += profile["fp"] * cum[count]
        fp += count
        for w in s.windows:
            lo = max(w.left, s.probation)
            seg = s.scores[lo : w.right + 1]
            peak = np.maximum.accumulate(seg)
            first = np.searchsorted(peak, thresholds, side="left")  # first index whose running max >= threshold
            hit = first < len(seg)
            value = np.where(hit, s.sweep[lo + np.minimum(first, len(seg) - 1)], 0.0)
            total += np.where(hit, profile["tp"] * value, -profile["fn"])
            tp += hit
            fn += ~hit
    return total, {"tp": tp, "fp": fp, "fn": fn}


@dataclass
class ProfileResult:
    profile: str
    score: float  # normalised: null 0, perfect 100
    raw: float
    threshold: float
    tp: int
    fp: int
    fn: int


def score_corpus(series: list[SeriesScoring], profiles: Sequence[str] = tuple(PROFILES), thresholds: np.ndarray | None = None) -> dict[str, ProfileResult]:
    """NAB scores of one detector over a corpus of series, the threshold optimised per profile."""
    if thresholds is None:
        thresholds = candidate_thresholds(np.concatenate([s.scores for s in series]) if series else np.zeros(0))
    n_windows = sum(len(s.windows) for s in series)
    results = {}
    for name in profiles:
        profile = PROFILES[name]
        raw, counts = raw_scores(series, thresholds, profile)
        null = -profile["fn"] * n_windows
        perfect = profile["tp"] * float(scaled_sigmoid(-1.0)) * n_windows
        best = int(np.argmax(raw))
        normalised = 100.0 * (raw[best] - null) / (perfect - null) if perfect != null else 0.0
        results[name] = ProfileResult(name, round(float(normalised), 2), round(float(raw[best]), 3), float(thresholds[best]),
                                      int(counts["tp"][best]), int(counts["fp"][best]), int(counts["fn"][best]))
    return results


def per_kind(series: list[SeriesScoring], threshold: float) -> dict[str, dict[str, float | int | None]]:
    """Event recall per fault kind and detection precision at one threshold.

    A window counts as found when any of its readings (after probation) reaches the threshold; a
    window holding events of several kinds counts for each. Precision is per kind: detections
    (first reading of each run of readings >= threshold) that fall into a window of that kind,
    over those plus every detection outside all windows, shared out by the kind's share of the
    windows (a false alarm has no kind)."""
    found: dict[str, int] = {}
    events: dict[str, int] = {}
    hits_in: dict[str, int] = {}
    false_alarms = 0
    for s in series:
        fired = s.scores >= threshold
        onset = fired & ~np.concatenate([[False], fired[:-1]])
        onset[: s.probation] = False
        false_alarms += int((onset & (s.window_of < 0)).sum())
        for number, w in enumerate(s.windows):
            got = bool(fired[max(w.left, s.probation) : w.right + 1].any())
            onsets = int(onset[w.left : w.right + 1].sum())
            for kind in set(w.kinds):
                events[kind] = events.get(kind, 0) + 1
                found[kind] = found.get(kind, 0) + int(got)
                hits_in[kind] = hits_in.get(kind, 0) + onsets
    total_windows = max(1, sum(events.values()))
    out: dict[str, dict[str, float | int | None]] = {}
    for kind in sorted(events):
        share = false_alarms * events[kind] / total_windows
        den = hits_in[kind] + share
        out[kind] = {
            "events": events[kind],
            "found": found[kind],
            "recall": round(found[kind] / events[kind], 4),
            "precision": round(hits_in[kind] / den, 4) if den else None,
        }
    out["_false_alarms"] = {"count": false_alarms}
    return out
