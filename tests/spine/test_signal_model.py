"""The signal model: deterministic, and its statistics match the spec."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pytest

from sensorfleet.reading import reading_from_wire
from sensorfleet.signals import (
    ANOMALY_DRIFT, ANOMALY_DROPOUT, ANOMALY_LEVEL_SHIFT, ANOMALY_NOISE_BURST, ANOMALY_OSCILLATION, ANOMALY_SPIKE, ANOMALY_STUCK,
)
from sensorfleet.signals import QUALITY_BAD, QUALITY_UNCERTAIN, SignalModel, shard_devices
from sensorfleet.spec import SensorFleet


def model(spec: dict | None = None, protocol: str = "mqtt", interval: float = 60.0) -> SignalModel:
    fleet = SensorFleet.model_validate({"metadata": {"name": "stats"}, "spec": spec or {}})
    return SignalModel(fleet.spec, fleet.name, protocol, interval=interval)


def week(m: SignalModel, devices: int = 20, days: int = 7):
    """Every device's readings over `days` days, one per interval."""
    n_ticks = int(days * 86400 / m.interval)
    start = int((datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp() - m.epoch) / m.interval)
    d = np.repeat(np.arange(devices), n_ticks)
    k = np.tile(np.arange(start, start + n_ticks), devices)
    return m.block(d, k)


NO_FAULTS = {"spikeProbability": 0, "stuckProbability": 0, "dropoutProbability": 0, "driftFaultProbability": 0,
             "levelShiftProbability": 0, "noiseBurstProbability": 0, "oscillationProbability": 0}
# The plain model (no weather, weekly pattern, steps, ageing, quantization, outages) and no faults:
# its statistics are exactly the sensor spec's.
NO_ANOMALIES = {"anomalies": NO_FAULTS, "realism": {"enabled": False}}


def test_same_seed_and_time_give_the_same_reading():
    when = datetime(2026, 6, 1, 12, 30, tzinfo=timezone.utc)
    a = model().reading_at(7, "temperature", when)
    b = model().reading_at(7, "temperature", when)
    assert a == b
    assert model({"seed": 43}).reading_at(7, "temperature", when).value != a.value


def test_readings_are_independent_of_how_the_fleet_is_sharded():
    m = model()
    ticks = np.full(100, 1000)
    whole = m.block(np.arange(100), ticks).values
    halves = np.vstack([m.block(np.array(list(shard_devices(100, 2, i))), ticks[:50]).values for i in range(2)])
    np.testing.assert_array_equal(whole, halves)


def test_daily_cycle_amplitude_and_peak_hour_match_the_spec():
    m = model(NO_ANOMALIES)
    b = week(m)
    hours = ((b.times % 86400) // 3600).astype(int)
    for s, sensor in enumerate(m.sensors):
        by_hour = np.array([b.values[hours == h, s].mean() for h in range(24)])
        amplitude = (by_hour.max() - by_hour.min()) / 2
        assert amplitude == pytest.approx(sensor.daily_amplitude, rel=0.1, abs=0.1), sensor.name
        peak = int(np.argmax(by_hour))
        assert min(abs(peak - sensor.peak_hour), 24 - abs(peak - sensor.peak_hour)) <= 1, sensor.name


def test_noise_level_matches_the_spec():
    m = model(NO_ANOMALIES)
    b = week(m, devices=5)
    temperature = b.values[:, 0]
    # Successive differences remove the slow components; their std is sqrt(2) * noise.
    diffs = np.diff(temperature.reshape(5, -1), axis=1)
    assert diffs.std() / np.sqrt(2) == pytest.approx(m.sensors[0].noise, rel=0.1)


def test_temperature_and_humidity_are_anti_correlated():
    b = week(model(NO_ANOMALIES), devices=10)
    correlation = np.corrcoef(b.values[:, 0], b.values[:, 1])[0, 1]
    assert correlation < -0.5


@pytest.mark.parametrize(("field", "code"), [
    ("spikeProbability", ANOMALY_SPIKE), ("stuckProbability", ANOMALY_STUCK), ("dropoutProbability", ANOMALY_DROPOUT),
    ("driftFaultProbability", ANOMALY_DRIFT), ("levelShiftProbability", ANOMALY_LEVEL_SHIFT),
    ("noiseBurstProbability", ANOMALY_NOISE_BURST), ("oscillationProbability", ANOMALY_OSCILLATION),
])
def test_anomaly_rates_match_the_spec(field, code):
    rate = 0.02
    spec = {"anomalies": {**NO_FAULTS, field: rate}, "realism": {"siteOutageProbability": 0}}
    b = week(model(spec), devices=20, days=7)
    observed = (b.anomaly == code).mean()
    assert observed == pytest.approx(rate, rel=0.15)


def test_stuck_runs_freeze_the_value_and_dropouts_have_no_value():
    spec = {"anomalies": {**NO_FAULTS, "stuckProbability": 0.05, "stuckDuration": 10, "dropoutProbability": 0.02}}
    b = week(model(spec), devices=3, days=2)
    temperature_stuck = (b.anomaly[:, 0] == ANOMALY_STUCK) & (b.anomaly[:, 0] != ANOMALY_DROPOUT)
    assert (b.quality[temperature_stuck, 0] == QUALITY_UNCERTAIN).all()
    # inside a run consecutive readings of one device repeat exactly
    runs = np.flatnonzero(temperature_stuck[:-1] & temperature_stuck[1:] & (b.devices[:-1] == b.devices[1:]))
    same = b.values[runs, 0] == b.values[runs + 1, 0]
    assert same.mean() > 0.8  # a run boundary between two adjacent runs is the only exception
    dropped = b.anomaly == ANOMALY_DROPOUT
    assert np.isnan(b.values[dropped]).all() and (b.quality[dropped] == QUALITY_BAD).all()


def test_values_stay_within_physical_bounds():
    spec = {"sensors": [{"name": "level", "unit": "%", "baseline": 98, "dailyAmplitude": 5, "noise": 2, "min": 0, "max": 100}], "anomalies": {"spikeProbability": 0.1, "dropoutProbability": 0}}
    b = week(model(spec), devices=5, days=1)
    assert np.nanmax(b.values) <= 100 and np.nanmin(b.values) >= 0


def test_readings_cross_the_wire_unchanged():
    m = model()
    readings = m.readings(m.block(np.arange(5), np.full(5, 123456)))
    for r in readings:
        assert reading_from_wire(json.loads(r.to_json())) == r
