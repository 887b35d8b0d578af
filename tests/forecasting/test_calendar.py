"""Calendar features of the harmonic model: a weekend level and daily profile, learned from the
weekends in the training window (off by default: on the realistic signal they did not lower MASE,
docs/forecasting.md)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sensorfleet.forecasting.models import HarmonicRegression
from sensorfleet.forecasting.prepare import Panel


def hourly_panel(days: int, weekend_offset: float) -> Panel:
    times = pd.date_range("2026-11-02", periods=days * 24, freq="1h", tz="UTC")  # a Monday
    hour = times.hour.to_numpy()
    weekend = times.dayofweek.to_numpy() >= 5
    noise = np.random.default_rng(1).normal(scale=0.2, size=(3, len(times)))
    y = 10 + np.sin(2 * np.pi * hour / 24) + weekend_offset * weekend + noise
    ids = pd.DataFrame({"unique_id": [f"mqtt/d{i}/s" for i in range(3)], "protocol": "mqtt", "device": [f"d{i}" for i in range(3)], "sensor": "s", "unit": "u"})
    return Panel(ids, times[0], pd.Timedelta("1h"), "1h", y.copy(), y.copy(), np.zeros(y.shape, np.int8))


def test_calendar_terms_learn_the_weekend_from_the_weekends_seen() -> None:
    panel = hourly_panel(days=20, weekend_offset=3.0)  # ends on a Saturday: the hold-out is a weekend day
    origin = panel.n_steps - 24
    actual = panel.y[:, origin:]
    plain, _ = HarmonicRegression().fit_predict(panel, origin, 24, 95)
    calendar, _ = HarmonicRegression(calendar=True).fit_predict(panel, origin, 24, 95)
    assert np.abs(calendar.mean - actual).mean() < 0.3 < np.abs(plain.mean - actual).mean()
    assert HarmonicRegression(calendar=True).name == "Harmonic+calendar" and HarmonicRegression().name == "Harmonic"


def test_without_a_weekend_in_the_window_the_calendar_terms_stay_zero() -> None:
    panel = hourly_panel(days=5, weekend_offset=3.0)  # Monday to Friday
    origin = panel.n_steps - 24
    plain, _ = HarmonicRegression().fit_predict(panel, origin, 24, 95)
    calendar, _ = HarmonicRegression(calendar=True).fit_predict(panel, origin, 24, 95)
    assert np.allclose(plain.mean, calendar.mean, atol=1e-6)
