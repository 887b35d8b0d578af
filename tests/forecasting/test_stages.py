"""The stages alone, on small hand-made inputs whose right answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sensorfleet.forecasting.errors import ForecastInputError
from sensorfleet.forecasting.features import design_matrix, feature_frame
from sensorfleet.forecasting.models import HarmonicRegression, SeasonalNaiveBaseline, StatsForecastModel
from sensorfleet.forecasting.pipeline import choose_plot_rows, origins_for
from sensorfleet.forecasting.prepare import Panel, interpolate_gaps, prepare, resample, spike_cells, stuck_cells


def readings(values: dict[tuple[str, str], list[float | None]], start: str = "2026-11-01", step: str = "1min") -> pd.DataFrame:
    rows = []
    for (device, sensor), series in values.items():
        for i, v in enumerate(series):
            rows.append({"protocol": "mqtt", "device": device, "sensor": sensor, "unit": "u", "value": v,
                         "ts": pd.Timestamp(start, tz="UTC") + i * pd.Timedelta(step) + pd.Timedelta("7s"), "anomaly": None})
    return pd.DataFrame(rows)


def panel_of(y: np.ndarray, step: str = "1min") -> Panel:
    n, t = y.shape
    ids = pd.DataFrame({"unique_id": [f"mqtt/d{i}/s" for i in range(n)], "protocol": "mqtt", "device": [f"d{i}" for i in range(n)], "sensor": "s", "unit": "u"})
    return Panel(ids, pd.Timestamp("2026-11-01", tz="UTC"), pd.Timedelta(step), step, y.copy(), y.copy(), np.zeros((n, t), np.int8))


def test_resample_averages_per_step_on_one_grid() -> None:
    frame = readings({("a", "t"): [1.0, 2.0, None, 4.0], ("b", "t"): [10.0, 20.0]})
    # A second reading of a in the first minute: the step holds the mean.
    frame = pd.concat([frame, readings({("a", "t"): [3.0]}, start="2026-11-01 00:00:30")], ignore_index=True)
    panel = resample(frame, "1min")
    assert list(panel.ids["unique_id"]) == ["mqtt/a/t", "mqtt/b/t"]
    assert panel.start == pd.Timestamp("2026-11-01", tz="UTC")
    np.testing.assert_array_equal(panel.raw[0], [2.0, 2.0, np.nan, 4.0])
    np.testing.assert_array_equal(panel.raw[1], [10.0, 20.0, np.nan, np.nan])


def test_short_gaps_interpolated_long_ones_reported() -> None:
    y = np.array([[0.0, np.nan, 2.0, np.nan, np.nan, np.nan, np.nan, 7.0, np.nan]])
    filled, mask, gaps = interpolate_gaps(y.copy(), max_gap=2)
    np.testing.assert_allclose(filled[0, :3], [0.0, 1.0, 2.0])
    assert np.isnan(filled[0, 3:7]).all() and np.isnan(filled[0, 8])  # long gap and trailing end stay missing
    assert mask.sum() == 1 and gaps == [(0, 3, 4)]


def test_stuck_runs_and_spikes_are_found() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(0, 1, (2, 400))
    y[0, 100:130] = y[0, 100]
    y[1, 200] += 12.0
    stuck = stuck_cells(y, 5)
    assert stuck[0, 100:130].all() and stuck.sum() == 30
    spikes = spike_cells(y, 5.0)
    assert spikes[1, 200] and spikes.sum() == 1


def test_harmonic_regression_recovers_a_daily_cycle() -> None:
    t = np.arange(3 * 1440)
    truth = 20 + 0.5 * t / 1440 + 3 * np.cos(2 * np.pi * (t - 900) / 1440)
    y = truth + np.random.default_rng(1).normal(0, 0.2, t.size)
    y[500:520] = np.nan
    panel = panel_of(np.vstack([y, y + 5]))
    block = HarmonicRegression().forecast(panel, [len(t) - 60], 60, 95)[0]
    np.testing.assert_allclose(block.mean[0], truth[-60:], atol=0.1)
    np.testing.assert_allclose(block.mean[1] - block.mean[0], 5, atol=1e-6)
    half = (block.hi - block.lo)[0, 0] / 2
    assert half == pytest.approx(1.96 * 0.2, rel=0.1)


def test_vectorised_seasonal_naive_equals_statsforecast() -> None:
    rng = np.random.default_rng(2)
    y = rng.normal(size=(4, 300))
    y[1, :40] = np.nan  # a series that started late
    y[2, 100:103] = np.nan  # a gap, filled before fitting
    panel = panel_of(y)
    ours = SeasonalNaiveBaseline(24).forecast(panel, [250, 280], 30, 90)
    theirs = StatsForecastModel("seasonalnaive", 24).forecast(panel, [250, 280], 30, 90)
    for a, b in zip(ours, theirs):
        for attr in ("mean", "lo", "hi"):
            np.testing.assert_allclose(getattr(a, attr), getattr(b, attr), atol=1e-9)


def test_features_and_design() -> None:
    x = design_matrix(np.arange(1440), 1440, 3)
    assert x.shape == (1440, 8)
    assert np.linalg.matrix_rank(x) == 8
    panel = panel_of(np.tile(np.arange(200.0), (2, 1)))
    frame = feature_frame(panel, np.array([1]), window=10)
    assert {"hour", "dayofweek", "rolling_mean_10", "rolling_std_10", "lag_1", "lag_1440"} <= set(frame.columns)
    assert frame["lag_1"].iloc[5] == 4.0 and frame["rolling_mean_10"].iloc[19] == pytest.approx(14.5)


def test_origins_and_seeded_plot_sample() -> None:
    assert origins_for(1000, 60, 2) == {820: "cv1", 880: "cv2", 940: "test", 1000: "future"}
    panel = panel_of(np.zeros((30, 5)))
    assert (choose_plot_rows(panel.ids, 4, seed=1) == choose_plot_rows(panel.ids, 4, seed=1)).all()


def test_too_short_series_are_refused_or_dropped() -> None:
    t = 1440 + 60 * 4 + 10
    frame = readings({("a", "t"): list(np.sin(np.arange(t))), ("b", "t"): [1.0]})
    with pytest.raises(ForecastInputError, match="series mqtt/b/t has 1 value"):
        prepare(frame, "1min", 60, 3)
    prepared = prepare(frame, "1min", 60, 3, drop_short=True)
    assert list(prepared.panel.ids["unique_id"]) == ["mqtt/a/t"] and prepared.report.dropped_series == ["mqtt/b/t"]


def test_a_young_panel_is_not_enough_data_with_what_it_has_and_needs() -> None:
    from sensorfleet.forecasting.errors import NotEnoughData

    frame = readings({("a", "t"): [float(i) for i in range(12)], ("b", "t"): [float(i) for i in range(12)]})
    with pytest.raises(NotEnoughData) as young:
        prepare(frame, "1min", 60, 3)
    assert (young.value.have, young.value.need, young.value.freq) == (12, 1681, "1min")
    assert str(young.value).startswith("waiting for data: have 12 steps of 1min, need 1681 (")
    assert "about 27.8 h more" in str(young.value)
    # Long enough as a whole, but every series started too recently: waiting too, with --drop-short.
    t = 1440 + 60 * 4 + 10
    late = readings({("a", "t"): [None] * 100 + list(np.sin(np.arange(t - 100)))})
    with pytest.raises(NotEnoughData, match="every series started too recently") as started_late:
        prepare(late, "1min", 60, 3, drop_short=True)
    assert started_late.value.have == t - 100
    # A series with too few values among long ones stays the user's choice (--drop-short), not waiting.
    with pytest.raises(ForecastInputError) as mixed:
        prepare(readings({("a", "t"): list(np.sin(np.arange(t))), ("b", "t"): [1.0]}), "1min", 60, 3)
    assert not isinstance(mixed.value, NotEnoughData)


def test_a_window_that_can_never_hold_the_horizon_is_an_error_not_waiting() -> None:
    from sensorfleet.forecasting.errors import NotEnoughData
    from sensorfleet.forecasting.pipeline import ForecastOptions

    options = ForecastOptions(data="d", out="o", horizon=4000, window_days=7)  # needs 17441 > 10080 steps
    with pytest.raises(ForecastInputError, match="--window-days 7: the window holds at most 10080 steps of 1min") as never:
        options.check()
    assert not isinstance(never.value, NotEnoughData)
    ForecastOptions(data="d", out="o", horizon=2000, window_days=7).check()  # 9441 steps fit: may wait, never fails here
