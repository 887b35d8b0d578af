"""Streaming detection: causal scores, every fault kind found, `sensorfleet detect` on a dataset
and on a user's CSV, clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sensorfleet.detection import detectors
from sensorfleet.detection.run import DEFAULT_THRESHOLD, detect
from sensorfleet.signals import ANOMALY_NAMES, SignalModel
from sensorfleet.spec import SensorFleet

QUIET = {"spikeProbability": 0, "stuckProbability": 0, "dropoutProbability": 0, "driftFaultProbability": 0,
         "levelShiftProbability": 0, "noiseBurstProbability": 0, "oscillationProbability": 0}


def fleet_series(anomalies: dict | None = None, devices: int = 3, days: float = 3.0) -> pd.DataFrame:
    """Readings of the default fleet (realism on) straight from the signal model, with labels."""
    fleet = SensorFleet.model_validate({"metadata": {"name": "det"}, "spec": {"anomalies": anomalies or {}}})
    m = SignalModel(fleet.spec, fleet.name, "mqtt", interval=60.0)
    n = int(days * 1440)
    k0 = int((datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp() - m.epoch) / 60)
    b = m.block(np.repeat(np.arange(devices), n), np.tile(np.arange(k0, k0 + n), devices))
    names = np.array(ANOMALY_NAMES, dtype=object)
    frames = []
    for s, sensor in enumerate(m.sensors):
        frames.append(pd.DataFrame({
            "protocol": "mqtt", "device": [f"mqtt-{d:05d}" for d in b.devices], "sensor": sensor.name,
            "ts": pd.to_datetime(b.times, unit="s", utc=True), "value": b.values[:, s], "anomaly": names[b.anomaly[:, s]],
        }))
    return pd.concat(frames, ignore_index=True)


def test_scores_do_not_change_when_future_readings_are_appended():
    readings = fleet_series(devices=2, days=2)
    cut = readings["ts"].min() + pd.Timedelta(hours=30)
    past = readings[readings["ts"] <= cut]
    whole = detect(readings, None, evaluate=False).scores
    prefix = detect(past, None, evaluate=False).scores
    merged = prefix.merge(whole, on=["protocol", "device", "sensor", "ts"], suffixes=("_past", "_whole"))
    assert len(merged) == len(past)
    assert merged["anomaly_score_past"].to_numpy() == pytest.approx(merged["anomaly_score_whole"].to_numpy(), abs=0.0)
    # and appending an outrageous future changes nothing either
    wild = readings[readings["ts"] > cut].assign(value=1e9)
    again = detect(pd.concat([past, wild]), None, evaluate=False).scores
    assert np.array_equal(again.merge(prefix, on=["protocol", "device", "sensor", "ts"])["anomaly_score_x"].to_numpy(), prefix["anomaly_score"].to_numpy())


def test_every_series_detector_is_causal_element_by_element():
    x = np.cumsum(np.random.default_rng(3).normal(size=3000)) + np.random.default_rng(4).normal(size=3000)
    x[1500:1510] = x[1499]
    full = detectors.detect_series(x)
    for t in (200, 1505, 2999):
        part = detectors.detect_series(x[: t + 1])
        for name in full:
            assert part[name][t] == full[name][t], (name, t)


@pytest.mark.parametrize("kind", ["spike", "stuck", "dropout", "drift", "level_shift", "noise_burst", "oscillation"])
def test_each_fault_kind_is_flagged_inside_its_window(kind):
    field = {"spike": "spikeProbability", "stuck": "stuckProbability", "dropout": "dropoutProbability", "drift": "driftFaultProbability",
             "level_shift": "levelShiftProbability", "noise_burst": "noiseBurstProbability", "oscillation": "oscillationProbability"}[kind]
    rate = 0.004 if kind == "spike" else 0.015
    readings = fleet_series({**QUIET, field: rate}, devices=6, days=3)
    result = detect(readings, None)
    per_kind = result.report["nab"]["per_kind_at_default_threshold"]
    assert per_kind[kind]["events"] >= 3
    assert per_kind[kind]["recall"] >= 0.6, per_kind


def test_the_ensemble_beats_the_nab_reference_detectors_on_the_fleet(tmp_path):
    readings = fleet_series(devices=4, days=4)
    report = detect(readings, tmp_path).report["nab"]["detectors"]
    standard = {name: report[name]["standard"]["score"] for name in report}
    assert standard["null"] == 0.0
    assert standard["ensemble"] > 60
    assert standard["ensemble"] > standard["random"] + 30 and standard["ensemble"] > standard["windowed_gaussian"] + 30


def sensorfleet(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sensorfleet.cli", *args], capture_output=True, text=True, timeout=timeout, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_detect_on_a_generated_dataset_writes_scores_and_nab_figures(tmp_path):
    fleet = Path(__file__).parents[2] / "examples" / "fleet.yaml"
    data, out = tmp_path / "data", tmp_path / "out"
    gen = sensorfleet("generate", str(fleet), "--days", "2", "--data", str(data), "--interval", "60", "--devices", "3", "-p", "mqtt", "-q")
    assert gen.returncode == 0, gen.stderr
    run = sensorfleet("detect", "--data", str(data), "--out", str(out))
    assert run.returncode == 0, run.stderr
    scores = pd.read_parquet(out / "scores.parquet")
    assert {"device", "sensor", "ts", "anomaly_score", "flag"} <= set(scores.columns)
    assert len(scores) == 2 * 1440 * 3 * 3
    assert scores["anomaly_score"].between(0, 1).all()
    assert scores["flag"].equals(scores["anomaly_score"] >= DEFAULT_THRESHOLD)
    report = json.loads((out / "detect.json").read_text())
    assert set(report["nab"]["detectors"]) >= {"ensemble", "null", "random", "windowed_gaussian"}
    assert "NAB scores" in run.stdout and "ensemble" in run.stdout


def test_detect_on_a_users_csv(tmp_path):
    rng = np.random.default_rng(0)
    n = 4000
    value = 10 + np.sin(np.arange(n) / 100) + 0.1 * rng.normal(size=n)
    label = np.zeros(n, dtype=int)
    for at in (1500, 2500, 3500):
        value[at] += 3
        label[at] = 1
    path = tmp_path / "pump.csv"
    pd.DataFrame({"timestamp": pd.date_range("2026-01-01", periods=n, freq="10s"), "value": value, "label": label}).to_csv(path, index=False)
    run = sensorfleet("detect", "--csv", str(path), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    scores = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert len(scores) == n and scores["flag"].iloc[[1500, 2500, 3500]].all()
    report = json.loads((tmp_path / "out" / "detect.json").read_text())
    assert report["nab"]["detectors"]["ensemble"]["standard"]["score"] > 80


def test_a_csv_with_a_bad_row_names_the_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("timestamp,value\n2026-01-01T00:00:00,1.0\n2026-01-01T00:00:10,abc\n")
    run = sensorfleet("detect", "--csv", str(path))
    assert run.returncode == 2 and "row 3" in run.stderr and "'abc'" in run.stderr
    path.write_text("time,reading\n1,2\n")
    run = sensorfleet("detect", "--csv", str(path))
    assert run.returncode == 2 and "expected columns timestamp,value" in run.stderr
    run = sensorfleet("detect")
    assert run.returncode == 2 and "exactly one of --data" in run.stderr


def test_the_ramp_test_answers_a_long_walk_not_a_step():
    """A drift fault (10 sigma over 120 readings) against the same noise with a 10 sigma step."""
    noise = np.random.default_rng(5).normal(size=4000)
    ramp, step = noise.copy(), noise.copy()
    ramp[2000:2120] += np.linspace(0.0, 10.0, 120)
    step[2000:] += 10.0
    settings = detectors.DetectorSettings()
    walked = detectors.ramp_z(ramp, settings)[2000:2120].max()
    assert walked > 1.5 * detectors.ramp_z(ramp, settings)[:1990].max()  # quiet before the fault
    assert walked > 1.5 * detectors.ramp_z(step, settings)[1990:2300].max()  # a step is not a walk
    assert walked * detectors.RAMP_WEIGHT > detectors.Z_AT_HALF * 0.8  # loud enough for the ensemble
