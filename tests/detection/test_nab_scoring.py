"""NAB scoring on hand-made cases: windows, the scaled sigmoid, profile weights, normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from sensorfleet.detection import nab

N = 1000
EVENT = (600, 609)  # one labelled event; its window is 0.1 * 1000 / 1 = 100 readings, centred


def labels(*events: tuple[int, int], kind: str = "spike") -> np.ndarray:
    out = np.full(N, None, dtype=object)
    for lo, hi in events:
        out[lo : hi + 1] = kind
    return out


def detections(*at: int) -> np.ndarray:
    s = np.zeros(N)
    s[list(at)] = 1.0
    return s


def score(scores: np.ndarray, labelled: np.ndarray, profile: str = "standard") -> nab.ProfileResult:
    prepared = [nab.prepare_series(scores, labelled)]
    return nab.score_corpus(prepared, [profile], thresholds=np.array([0.5]))[profile]


def test_the_window_is_a_tenth_of_the_series_over_the_events_centred_on_the_event():
    (w,) = nab.make_windows(N, nab.label_events(labels(EVENT)))
    assert (w.left, w.right) == (554, 653) and w.right - w.left + 1 == 100
    two = nab.make_windows(N, nab.label_events(labels((300, 300), (800, 800))))
    assert [x.right - x.left + 1 for x in two] == [50, 50]
    assert two[0].left <= 300 <= two[0].right and two[1].left <= 800 <= two[1].right


def test_overlapping_windows_merge_and_keep_both_kinds():
    lab = labels((600, 601))
    lab[620:625] = "stuck"
    (w,) = nab.make_windows(N, nab.label_events(lab))
    assert w.kinds == ["spike", "stuck"]


def test_an_early_detection_scores_more_than_a_late_one():
    early = score(detections(560), labels(EVENT))
    late = score(detections(640), labels(EVENT))
    assert early.raw > late.raw > 0
    # only the first detection inside a window counts
    both = score(detections(560, 640), labels(EVENT))
    assert both.raw == early.raw and both.fp == 0


def test_a_detection_at_the_window_start_is_perfect_and_no_detection_is_null():
    assert score(detections(554), labels(EVENT)).score == pytest.approx(100.0)
    missed = score(np.zeros(N), labels(EVENT))
    assert missed.score == 0.0 and missed.raw == -1.0 and missed.fn == 1
    assert score(np.zeros(N), labels(EVENT), "reward_low_fn").raw == -2.0


@pytest.mark.parametrize(("profile", "weight"), [("standard", 0.11), ("reward_low_fp", 0.22), ("reward_low_fn", 0.11)])
def test_a_false_positive_costs_its_profile_weight(profile, weight):
    clean = score(detections(560), labels(EVENT), profile)
    with_fp = score(detections(300, 560), labels(EVENT), profile)  # before any window: the full weight
    assert clean.raw - with_fp.raw == pytest.approx(weight, abs=1e-3)
    assert with_fp.fp == 1


def test_a_false_positive_just_after_a_window_costs_less_than_one_far_after():
    near = score(detections(560, 660), labels(EVENT))
    far = score(detections(560, 990), labels(EVENT))
    assert near.raw > far.raw


def test_the_probationary_period_is_not_scored():
    assert nab.probation_length(N) == 150
    assert score(detections(10, 560), labels(EVENT)).raw == score(detections(560), labels(EVENT)).raw


def test_the_threshold_is_optimised_per_profile():
    # Two events detected early in their windows and a weaker false alarm: the best threshold
    # keeps both windows and drops the false alarm.
    lab = labels((400, 400), (800, 800))
    s = np.zeros(N)
    s[380], s[780], s[600] = 0.6, 0.6, 0.3
    result = nab.score_corpus([nab.prepare_series(s, lab)], ["standard"])["standard"]
    assert result.fp == 0 and result.tp == 2 and 0.3 < result.threshold <= 0.6
    assert 0 < result.score < 100


def test_per_kind_recall_counts_found_windows():
    lab = labels((400, 400), (800, 800))
    lab[800] = "stuck"
    s = np.zeros(N)
    s[400] = 1.0
    kinds = nab.per_kind([nab.prepare_series(s, lab)], 0.5)
    assert kinds["spike"]["recall"] == 1.0 and kinds["stuck"]["recall"] == 0.0
