"""Third-party MQTT devices (spec.sources.mqtt): payloads SensorFleet did not write, published
with Debian's `mosquitto_pub` to the real Mosquitto, collected through the topic/JSON-pointer
mapping into the dataset with `seq` null; malformed ones counted by reason."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone

import pandas as pd
import pytest
import yaml

from sensorfleet.dataset import read_dataset
from sensorfleet.testing import component

SOURCE = {
    "name": "plant",
    "mappings": [
        # one value per message; device and sensor from the topic
        {"topic": "factory/+/{device}/{sensor}", "value": "/reading/v", "timestamp": "/reading/at", "unit": "degC"},
        # one document, two sensors; device from two named levels; Unix milliseconds
        {"topic": "site/{site}/{device}/state", "device": "{site}-{device}", "sensor": "humidity", "value": "/data/hum",
         "timestamp": "/ts", "timestampFormat": "unixMilliseconds", "unit": "%RH"},
        {"topic": "site/{site}/{device}/state", "device": "{site}-{device}", "sensor": "pressure", "value": "/data/p~1kPa",
         "timestamp": "/ts", "timestampFormat": "unixMilliseconds", "unit": "kPa"},
        # a bare number, timestamped on receipt
        {"topic": "raw/{device}", "sensor": "level", "unit": "m"},
    ],
}


def fleet_of_sources(tmp_path, sources: dict) -> str:
    doc = {"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "proto"},
           "spec": {"protocols": {p: {"enabled": False} for p in ("mqtt", "coap", "opcua")},
                    "collector": {"flushInterval": 0.3}, "sources": sources}}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def publish(broker, topic: str, payload: str, qos: int = 1) -> None:
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", str(qos), "-t", topic, "-m", payload], check=True, timeout=10)


FOREIGN = [
    ("factory/hall-1/boiler-7/temperature", '{"reading": {"v": 81.25, "at": "2026-12-02T10:00:00.250Z"}}'),
    ("factory/hall-1/boiler-7/temperature", '{"reading": {"v": "81.5", "at": "2026-12-02T11:00:01+01:00"}}'),  # numeric string, other zone
    ("factory/hall-2/pump-3/flow", '{"reading": {"v": null, "at": "2026-12-02T10:00:02Z"}}'),  # the device has no value: quality bad
    ("site/north/meter-1/state", '{"ts": 1764669600123, "data": {"hum": 40.5, "p/kPa": 101.3}}'),  # two readings
    ("raw/tank-9", "3.75"),
    # refused, each for its reason
    ("factory/hall-1/boiler-7/temperature", "not json at all"),  # not_json
    ("factory/hall-1/boiler-7/temperature", '{"reading": {"at": "2026-12-02T10:00:03Z"}}'),  # missing_field
    ("factory/hall-1/boiler-7/temperature", '{"reading": {"v": "warm", "at": "2026-12-02T10:00:03Z"}}'),  # wrong_type
    ("factory/hall-1/boiler-7/temperature", '{"reading": {"v": 1, "at": "2026-12-02T10:00:03"}}'),  # bad_ts: no zone
    ("factory/hall-1/boiler-7/temperature", '{"reading": {"v": NaN, "at": "2026-12-02T10:00:03Z"}}'),  # not JSON (NaN)
    ("site/north/meter-1/state", '{"ts": "yesterday", "data": {"hum": 41, "p/kPa": 101}}'),  # bad_ts, for both mappings
    ("raw/tank-9", '{"level": 3}'),  # wrong_type: an object where the value should be
]


def test_foreign_json_payloads_land_in_the_dataset_by_the_mapping(mosquitto, procs, h, tmp_path):
    fleet = fleet_of_sources(tmp_path, {"mqtt": [{**SOURCE, "url": mosquitto.url}]})
    data = tmp_path / "data"
    col = component("collect", "mqtt", fleet, tmp_path, "--data", str(data), "--source", "plant").start()
    procs.append(col)
    h.wait_until(lambda: "subscribed to" in col.log(), 30, message="the source collector subscribed")
    before = datetime.now(timezone.utc)
    for topic, payload in FOREIGN:
        publish(mosquitto, topic, payload)
    publish(mosquitto, "elsewhere/x", "1")  # not subscribed: never seen
    h.wait_until(lambda: col.metric("sensorfleet_readings_stored_total") >= 6, 30, message="the six readings stored")
    summary = h.stop(col)

    df = read_dataset(str(data)).sort_values(["device", "sensor", "ts"]).reset_index(drop=True)
    rows = [(r.protocol, r.device, r.sensor, None if pd.isna(r.value) else r.value, r.unit, r.quality) for r in df.itertuples()]
    assert rows == [
        ("mqtt", "boiler-7", "temperature", 81.25, "degC", "good"),
        ("mqtt", "boiler-7", "temperature", 81.5, "degC", "good"),
        ("mqtt", "north-meter-1", "humidity", 40.5, "%RH", "good"),
        ("mqtt", "north-meter-1", "pressure", 101.3, "kPa", "good"),
        ("mqtt", "pump-3", "flow", None, "degC", "bad"),
        ("mqtt", "tank-9", "level", 3.75, "m", "good"),
    ]
    assert df["seq"].isna().all(), "third-party readings have no sequence number"
    assert (df["fleet"] == "proto").all() and df["anomaly"].isna().all()
    ts = {(r.device, r.value): r.ts for r in df.itertuples() if not pd.isna(r.value)}
    assert ts[("boiler-7", 81.25)] == pd.Timestamp("2026-12-02T10:00:00.250Z")
    assert ts[("boiler-7", 81.5)] == pd.Timestamp("2026-12-02T10:00:01Z")
    assert ts[("north-meter-1", 40.5)] == ts[("north-meter-1", 101.3)] == pd.Timestamp("2025-12-02T10:00:00.123Z")
    assert ts[("tank-9", 3.75)] >= pd.Timestamp(before), "no timestamp pointer: the time of receipt"

    assert summary["source"] == "plant"
    assert (summary["received"], summary["stored"], summary["unsequenced"], summary["bad_quality"]) == (6, 6, 6, 1)
    assert (summary["lost"], summary["duplicates"]) == (0, 0), "no sequence: no loss accounting"
    assert summary["malformed_by_reason"] == {"not_json": 2, "missing_field": 1, "wrong_type": 2, "bad_ts": 3}


def test_a_source_name_the_spec_lacks_or_of_another_protocol_is_refused(mosquitto, tmp_path):
    import sys

    fleet = fleet_of_sources(tmp_path, {"mqtt": [{**SOURCE, "url": mosquitto.url}]})
    base = [sys.executable, "-m", "sensorfleet.cli", "collect"]
    missing = subprocess.run([*base, "mqtt", "--fleet", str(fleet), "--data", str(tmp_path / "d"), "--source", "nope"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "spec.sources has no source of that name (its sources: plant)" in missing.stderr
    wrong = subprocess.run([*base, "coap", "--fleet", str(fleet), "--data", str(tmp_path / "d"), "--source", "plant"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "it is in spec.sources.mqtt, not coap" in wrong.stderr


@pytest.mark.parametrize("topic, names", [("a/{x}/+/{y}", {"x": "1", "y": "3"}), ("a/#", {})])
def test_topic_patterns_capture_named_levels(topic, names):
    from sensorfleet.mapping import TopicPattern

    pattern = TopicPattern.parse(topic)
    assert pattern.match("a/1/2/3") == names
    assert pattern.match("b/1/2/3") is None
    assert TopicPattern.parse("a/{x}/+/{y}").subscription == "a/+/+/+"


def test_sensorfleet_run_collects_a_fleet_of_third_party_sources_only(mosquitto, tmp_path):
    """No simulator, no broker of ours: `sensorfleet run` starts the source's collector alone and
    reports its row (stored, refused) in the summary."""
    import json
    import sys
    import time

    fleet = fleet_of_sources(tmp_path, {"mqtt": [{**SOURCE, "url": mosquitto.url}]})
    logs, data, summary_path = tmp_path / "logs", tmp_path / "data", tmp_path / "summary.json"
    run = subprocess.Popen([sys.executable, "-m", "sensorfleet.cli", "run", str(fleet), "--duration", "12", "--no-live", "--data", str(data),
                            "--logs", str(logs), "--summary", str(summary_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        source_log = logs / "source-plant.log"
        deadline = time.monotonic() + 30
        while not (source_log.exists() and "subscribed to" in source_log.read_text()):
            assert run.poll() is None and time.monotonic() < deadline, f"the source collector did not subscribe:\n{run.stdout.read() if run.poll() is not None else ''}"
            time.sleep(0.2)
        for i in range(5):
            publish(mosquitto, f"raw/tank-{i}", f"{i}.5")
        publish(mosquitto, "raw/tank-0", "[]")
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.terminate()
            run.wait(30)
    assert run.returncode == 0, output
    assert not any(p.name.startswith(("mqtt-", "broker")) for p in logs.iterdir()), "no simulator, collector of ours or broker started"
    document = json.loads(summary_path.read_text())
    row = document["protocols"]["source plant"]
    assert (row["stored"], row["lost"], row["malformed_by_reason"]) == (5, 0, {"wrong_type": 1})
    assert document["dataset_rows"] == {"mqtt": 5}
    df = read_dataset(str(data))
    assert sorted(df["value"]) == [0.5, 1.5, 2.5, 3.5, 4.5] and df["seq"].isna().all()
