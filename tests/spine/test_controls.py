"""The signal model given what clients did (sensorfleet.controls): setpoints with a first-order
lag, injected faults, resets -- still a pure function of (seed, device, time, log)."""

from __future__ import annotations

import numpy as np
import pytest

from sensorfleet.controls import ControlAction, ControlLog
from sensorfleet.signals import ANOMALY_NAMES, SignalModel
from sensorfleet.spec import FleetSpec

QUIET = {"spikeProbability": 0, "stuckProbability": 0, "dropoutProbability": 0, "driftFaultProbability": 0,
         "levelShiftProbability": 0, "noiseBurstProbability": 0, "oscillationProbability": 0}


def model(**anomalies) -> SignalModel:
    spec = FleetSpec.model_validate({"protocols": {"opcua": {"enabled": True, "devices": 4, "interval": 1.0}}, "anomalies": {**QUIET, **anomalies}})
    return SignalModel(spec, "ctl", "opcua")


def series(m: SignalModel, device: int, ticks: np.ndarray, log: ControlLog | None):
    return m.block(np.full(len(ticks), device), ticks, log)


def test_without_actions_the_model_is_unchanged():
    m = model()
    ticks = np.arange(1000, 1100)
    plain = series(m, 2, ticks, None)
    empty = series(m, 2, ticks, ControlLog(lag=30))
    other_device = ControlLog(lag=30)
    other_device.record(ControlAction(m.epoch + 1050, 3, "setpoint", sensor="temperature", value=50.0))
    assert np.array_equal(plain.values, empty.values, equal_nan=True)
    assert np.array_equal(plain.values, series(m, 2, ticks, other_device).values, equal_nan=True)


def test_a_setpoint_moves_the_value_with_a_first_order_lag():
    m = model()
    ticks = np.arange(1000, 1400)
    plain = series(m, 1, ticks, None)
    nominal = float(m.nominal(np.array([1]), 0)[0])
    at = float(plain.times[100]) + 0.1  # just after tick 1100
    log = ControlLog(lag=60)
    log.record(ControlAction(at, 1, "setpoint", sensor="temperature", value=nominal + 10.0))
    moved = series(m, 1, ticks, log)
    delta = moved.values[:, 0] - plain.values[:, 0]
    assert np.all(delta[:101] == 0)  # nothing before (or at) the write
    expected = 10.0 * (1 - np.exp(-(plain.times[101:] - at) / 60))
    assert delta[101:] == pytest.approx(expected, abs=0.1001)  # resolution 0.1: both rounded
    assert delta[101 + 60] == pytest.approx(10 * (1 - np.exp(-1)), abs=0.12)
    assert np.array_equal(moved.values[:, 1:], plain.values[:, 1:])  # other sensors untouched
    assert log.setpoint(1, "temperature", nominal, at + 1) == nominal + 10.0
    # Deterministic given the log: evaluated in another order, the same values.
    again = m.block(np.full(len(ticks), 1)[::-1], ticks[::-1], log)
    assert np.array_equal(again.values[::-1], moved.values)


def test_reset_returns_to_nominal_and_ends_injected_faults():
    m = model()
    ticks = np.arange(2000, 2600)
    plain = series(m, 0, ticks, None)
    t = plain.times
    nominal = float(m.nominal(np.array([0]), 1)[0])
    log = ControlLog(lag=10)
    log.record(ControlAction(float(t[10]) + 0.5, 0, "setpoint", sensor="humidity", value=nominal - 20))
    log.record(ControlAction(float(t[20]) + 0.5, 0, "fault", fault="level_shift", duration=1000.0))
    log.record(ControlAction(float(t[300]) + 0.5, 0, "reset"))
    out = series(m, 0, ticks, log)
    labels = np.array([ANOMALY_NAMES[c] for c in out.anomaly[:, 0]])
    assert set(labels[21:301]) == {"level_shift"} and set(labels[301:]) == {None} and set(labels[:21]) == {None}
    # 290 s after the reset with lag 10 s the humidity is back where the model alone puts it.
    assert out.values[-1, 1] == pytest.approx(plain.values[-1, 1], abs=0.5)
    # Before the reset: 20 %RH below, give or take the level shift (6 x noise 1.0) and rounding.
    assert abs(out.values[290, 1] - plain.values[290, 1] + 20) <= 6.0 + 0.5


@pytest.mark.parametrize("kind", ["spike", "stuck", "dropout", "drift", "level_shift", "noise_burst", "oscillation"])
def test_every_fault_kind_can_be_injected_and_is_labelled_on_every_sensor(kind):
    m = model()
    ticks = np.arange(5000, 5100)
    plain = series(m, 3, ticks, None)
    log = ControlLog(lag=10)
    log.record(ControlAction(float(plain.times[39]) + 0.5, 3, "fault", fault=kind, duration=20.0))
    out = series(m, 3, ticks, log)
    labelled = np.array([[ANOMALY_NAMES[c] for c in row] for row in out.anomaly])
    assert (labelled[40:60] == kind).all() and (labelled[:40] == None).all() and (labelled[60:] == None).all()  # noqa: E711
    if kind == "dropout":
        assert np.isnan(out.values[40:60]).all()
    elif kind == "stuck":
        assert (out.values[40:60] == out.values[40]).all() and (out.quality[40:60] == 1).all()
    else:
        assert not np.array_equal(out.values[40:60], plain.values[40:60])


def test_invalid_actions_are_refused_with_the_field():
    with pytest.raises(ValueError, match="kind: expected one of spike"):
        ControlAction(0.0, 1, "fault", fault="meltdown", duration=5)
    with pytest.raises(ValueError, match="durationSeconds"):
        ControlAction(0.0, 1, "fault", fault="spike", duration=0)
    log = ControlLog(lag=1)
    log.record(ControlAction(10.0, 1, "reset"))
    with pytest.raises(ValueError, match="older than the last one"):
        log.record(ControlAction(5.0, 1, "reset"))
