"""The realistic parts of the signal model (spec.realism) and the windowed fault kinds: each does
what its spec field says, and the default fleet is not the daily-harmonic family any more."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

import numpy as np
import pytest

from sensorfleet.signals import (
    ANOMALY_DRIFT, ANOMALY_DROPOUT, ANOMALY_LEVEL_SHIFT, ANOMALY_NAMES, ANOMALY_NOISE_BURST, ANOMALY_OSCILLATION, SignalModel,
)
from sensorfleet.spec import SensorFleet

QUIET = {"spikeProbability": 0, "stuckProbability": 0, "dropoutProbability": 0, "driftFaultProbability": 0,
         "levelShiftProbability": 0, "noiseBurstProbability": 0, "oscillationProbability": 0}
ONLY_REALISM_OFF = {"weatherAmplitude": 0, "weeklyAmplitude": 0, "regimeAmplitude": 0, "ageingNoisePerDay": 0,
                    "calibrationGainSpread": 0, "quantization": 0, "siteOutageProbability": 0}


def model(spec: dict | None = None, interval: float = 60.0) -> SignalModel:
    fleet = SensorFleet.model_validate({"metadata": {"name": "real"}, "spec": spec or {}})
    return SignalModel(fleet.spec, fleet.name, "mqtt", interval=interval)


def series(m: SignalModel, devices: int, days: float, start: datetime = datetime(2026, 3, 2, tzinfo=timezone.utc)):
    """values of shape (devices, ticks, sensors) and the block they came from."""
    n_ticks = int(days * 86400 / m.interval)
    k0 = int((start.timestamp() - m.epoch) / m.interval)
    b = m.block(np.repeat(np.arange(devices), n_ticks), np.tile(np.arange(k0, k0 + n_ticks), devices))
    return b.values.reshape(devices, n_ticks, -1), b


def realism(**only) -> dict:
    """Every realism component off but the ones named."""
    return {"anomalies": QUIET, "realism": {**ONLY_REALISM_OFF, **only}}


def test_the_weather_is_shared_by_the_devices_of_a_site():
    m = model({**realism(weatherAmplitude=1.0), "sensors": [{"name": "t", "unit": "degC", "baseline": 20, "noise": 0.1, "dailyAmplitude": 2, "min": -50, "max": 100}]})
    values, _ = series(m, devices=20, days=14)
    # Hourly means, the daily cycle and each device's offset removed: what is left is the weather.
    hourly = values[:, :, 0].reshape(20, -1, 60).mean(axis=2)
    slow = hourly - hourly.mean(axis=1, keepdims=True)
    slow -= slow.reshape(20, -1, 24).mean(axis=1).repeat(1, axis=0)[:, None, :].repeat(14, axis=1).reshape(20, -1)
    corr = np.corrcoef(slow)
    same_site = corr[0, 1:10].mean()  # devices 0..9 are one site, 10..19 the next
    other_site = corr[0, 10:].mean()
    assert same_site > 0.95 and abs(other_site) < 0.6, (same_site, other_site)
    assert slow.std() == pytest.approx(2.0, rel=0.5)  # weatherAmplitude x dailyAmplitude


def test_weekdays_differ_from_weekends_in_office_hours():
    m = model(realism(weeklyAmplitude=1.0))
    values, b = series(m, devices=5, days=14)  # 2026-03-02 is a Monday
    t = b.times.reshape(5, -1)
    day = ((t // 86400).astype(int) + 3) % 7
    noon = ((t % 86400) // 3600 >= 10) & ((t % 86400) // 3600 < 16)
    weekday_noon = values[:, :, 0][noon & (day < 5)].mean()
    weekend_noon = values[:, :, 0][noon & (day >= 5)].mean()
    assert weekday_noon - weekend_noon == pytest.approx(4.0, rel=0.1)  # 1.0 x temperature's dailyAmplitude


def test_setpoint_steps_change_the_level_between_regimes():
    m = model({**realism(regimeAmplitude=1.0, regimeHours=12, regimeRampHours=0), "sensors": [{"name": "t", "unit": "degC", "baseline": 20, "noise": 0.05, "dailyAmplitude": 1, "min": -50, "max": 100}]})
    values, _ = series(m, devices=1, days=7)
    jumps = np.abs(np.diff(values[0, :, 0]))
    assert (jumps > 0.5).sum() >= 5  # ~14 regime boundaries, a step of ~1 unit at most of them


def test_setpoints_settle_over_the_ramp():
    m = model({**realism(regimeAmplitude=1.0, regimeHours=12, regimeRampHours=1), "sensors": [{"name": "t", "unit": "degC", "baseline": 20, "noise": 0.0, "dailyAmplitude": 1, "min": -50, "max": 100}]})
    values, _ = series(m, devices=1, days=7)
    steps = np.abs(np.diff(values[0, :, 0]))
    assert steps.max() < 0.2  # a ~1-unit change spread over 60 one-minute readings


def test_readings_are_quantized_to_the_sensor_resolution():
    values, _ = series(model(realism(quantization=0.3)), devices=3, days=1)
    for s, resolution in enumerate((0.1, 0.5, 0.1)):  # the default sensors' `resolution`
        v = values[:, :, s]
        assert np.allclose(np.round(v / resolution) * resolution, v, atol=1e-9)
    assert len(np.unique(values[:, :, 1])) < 100


def test_old_sensors_are_noisier():
    m = model(realism(ageingNoisePerDay=0.01))
    early, _ = series(m, devices=10, days=1, start=datetime(2026, 1, 2, tzinfo=timezone.utc))
    late, _ = series(m, devices=10, days=1, start=datetime(2026, 12, 2, tzinfo=timezone.utc))
    noise = lambda v: np.diff(v[:, :, 0], axis=1).std() / np.sqrt(2)
    assert noise(late) > 1.8 * noise(early)


def test_site_outages_take_every_device_of_the_site_down_together():
    m = model({**realism(siteOutageProbability=0.02, siteOutageDuration=30)})
    values, b = series(m, devices=20, days=2)
    down = np.isnan(values[:, :, 0])
    assert 0.01 < down.mean() < 0.03
    # Within a site, devices are down in the same minutes (their phases differ by < 1 interval).
    same = (down[0] == down[1]).mean()
    assert same > 0.98 and down[0].any()
    assert (b.anomaly.reshape(20, -1, 3)[down] == ANOMALY_DROPOUT).all()


@pytest.mark.parametrize(("field", "code", "check"), [
    ("driftFaultProbability", ANOMALY_DRIFT, "ramp"),
    ("levelShiftProbability", ANOMALY_LEVEL_SHIFT, "offset"),
    ("noiseBurstProbability", ANOMALY_NOISE_BURST, "noisier"),
    ("oscillationProbability", ANOMALY_OSCILLATION, "noisier"),
])
def test_windowed_faults_are_labelled_over_their_window_and_change_the_values(field, code, check):
    spec = {"anomalies": {**QUIET, field: 0.02}, "realism": {"enabled": False}}
    faulty, b = series(model(spec), devices=40, days=3)
    clean, _ = series(model({"anomalies": QUIET, "realism": {"enabled": False}}), devices=40, days=3)
    labelled = b.anomaly.reshape(40, -1, 3)[:, :, 0] == code
    assert labelled.mean() == pytest.approx(0.02, rel=0.4)
    # The label covers whole windows: runs of the configured duration (or cut by the series' ends).
    padded = np.pad(labelled.astype(int), ((0, 0), (1, 1))).ravel()
    runs = np.diff(np.flatnonzero(np.diff(padded)))[::2]
    assert np.median(runs) >= 40
    delta = (faulty - clean)[:, :, 0]
    assert (delta[~labelled] == 0).all()
    noise = 0.3  # temperature
    if check == "ramp":
        assert np.abs(delta[labelled]).max() == pytest.approx(10 * noise, rel=0.05)
        assert np.abs(delta[labelled]).min() < 0.2 * noise
    elif check == "offset":
        assert np.abs(delta[labelled]) == pytest.approx(6 * noise)
    else:
        assert delta[labelled].std() > 2.5 * noise


def test_the_default_fleet_is_not_a_daily_harmonic():
    """Residuals of the best daily-harmonic fit (the default forecaster's family) on a week of the
    default fleet are several times the sensor noise: the model has something to earn."""
    values, b = series(model({"anomalies": QUIET}), devices=10, days=7)
    t = b.times.reshape(10, -1)[0]
    angle = 2 * np.pi * (t % 86400) / 86400
    x = np.column_stack([np.ones_like(t), t - t[0]] + [f(k * angle) for k in (1, 2, 3) for f in (np.sin, np.cos)])
    y = values[:, :, 0].T
    ok = ~np.isnan(y).any(axis=1)
    beta, *_ = np.linalg.lstsq(x[ok], y[ok], rcond=None)
    residual = (y[ok] - x[ok] @ beta).std(axis=0)
    assert np.median(residual) > 3 * 0.3, residual


def test_labels_are_the_reading_schema_kinds():
    from sensorfleet.reading import ANOMALIES

    assert set(ANOMALY_NAMES[1:]) == set(ANOMALIES)


def test_the_same_reading_in_another_process():
    m = model()
    here = m.readings(m.block(np.array([3, 17]), np.array([123457, 123457])))
    code = (
        "import numpy as np; from sensorfleet.spec import SensorFleet; from sensorfleet.signals import SignalModel;"
        "f = SensorFleet.model_validate({'metadata': {'name': 'real'}});"
        "m = SignalModel(f.spec, 'real', 'mqtt', interval=60.0);"
        "print([r.value for r in m.readings(m.block(np.array([3, 17]), np.array([123457, 123457])))])"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert there.strip() == str([r.value for r in here])
