"""Hostile payloads of third-party devices: 20,000 seeded random messages through the real MQTT
source collector's steps (paho's callback, the writer's handle, Parquet) and 5,000 CoAP
representations: nothing raises, every message is stored or counted under a known reason, and
what is stored is a finite number (or null with quality bad)."""

from __future__ import annotations

import json
import random

import paho.mqtt.client as mqtt
import pandas as pd
import yaml

from sensorfleet.collectors.foreign import coap_reading
from sensorfleet.collectors.foreign_mqtt import ForeignMqttCollector
from sensorfleet.dataset import read_dataset
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import MALFORMED_REASONS, MalformedReading, Reading
from sensorfleet.runtime import BrokerAddress, CollectorOptions
from sensorfleet.sources import CoapResource
from sensorfleet.spec import load_fleet

HOSTILE = [None, True, 0, -1, 2**63, 2**64, 10**400, 1e308, 5e-324, 1.5, "", "21.5", " 7 ", "NaN", "inf", "x" * 5000, [], [1.0], {}, {"a": 1},
           "2026-12-02T10:00:00Z", "2026-12-02T10:00:00", "2026-13-45T99:99:99Z", "yesterday", 1764669600, 1764669600123, -5, 1e20, "\u0000"]
LITERALS = [b"NaN", b"Infinity", b"-1e400", b"9" * 400, b"null", b"[]", b"{}", b'"\\ud800"', b"\xff\xfe", b"[" * 5000, b"", b"{" + b'"a":1,' * 3 + b"}"]


def payload(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if kind == 1:
        return rng.choice(LITERALS)
    if kind == 2:
        return b"[" * rng.randrange(1, 3000) + b"1" + b"]" * rng.randrange(3000)
    if kind == 3:
        return b'{"v": "' + b"x" * (1 << 20) + b'"}'
    document = {"reading": {"v": rng.choice(HOSTILE), "at": rng.choice(HOSTILE)}, "data": {"hum": rng.choice(HOSTILE)}, "ts": rng.choice(HOSTILE)}
    if kind == 4:
        del document[rng.choice(list(document))]
    return json.dumps(document).encode()


def test_hostile_mqtt_messages_are_stored_or_counted_never_raise(tmp_path):
    fleet_path = tmp_path / "fleet.yaml"
    fleet_path.write_text(yaml.safe_dump({"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "proto"}, "spec": {
        "protocols": {"mqtt": {"enabled": False}}, "collector": {"batchSize": 2000},
        "sources": {"mqtt": [{"name": "plant", "url": "mqtt://127.0.0.1:1", "qos": 0, "mappings": [
            {"topic": "factory/+/{device}/{sensor}", "value": "/reading/v", "timestamp": "/reading/at"},
            {"topic": "site/{device}/#", "sensor": "humidity", "value": "/data/hum", "timestamp": "/ts", "timestampFormat": "unixMilliseconds"},
            {"topic": "site/{device}/#", "sensor": "raw", "value": ""},
        ]}]}}}))
    fleet = load_fleet(fleet_path)
    source = fleet.spec.sources.mqtt[0]
    data = tmp_path / "data"
    collector = ForeignMqttCollector(CollectorOptions(fleet, str(data), source="plant"), source, BrokerAddress("127.0.0.1", 1), FleetMetrics("proto", "mqtt", "collector"))
    rng = random.Random(13)
    topics = ["factory/h/boiler-1/temperature", "site/meter-2/state", "site/meter-3/a/b", "factory/h/" + "d" * 200 + "/t", "factory/h//t", "elsewhere/x"]
    sent = 20_000
    for mid in range(sent):
        message = mqtt.MQTTMessage(mid, rng.choice(topics).encode())
        message.payload = payload(rng)
        collector._on_message(None, None, message)
        collector.handle(collector.intake.popleft())
    collector.sink.flush()
    t, reasons = collector.sink.totals, collector.sink.malformed_by_reason
    assert set(reasons) <= set(MALFORMED_REASONS) and sum(reasons.values()) == t["malformed"]
    assert t["received"] + t["malformed"] >= sent, "every message is stored or counted, at least once"
    assert t["received"] + t["malformed"] <= 2 * sent, "at most once per matching mapping"
    assert set(reasons) >= {"not_json", "invalid_utf8", "too_deep", "too_large", "missing_field", "wrong_type", "bad_ts", "bad_topic", "out_of_range"}, reasons
    df = read_dataset(str(data))
    assert len(df) == t["stored"] == t["received"] > 0 and df["seq"].isna().all()
    values = df["value"]
    assert (values.dropna().abs() < float("inf")).all() and (df.loc[values.isna(), "quality"] == "bad").all()
    assert (df["ts"] >= pd.Timestamp("1970-01-01", tz="UTC")).all()


def test_hostile_coap_representations_become_a_reading_or_a_known_reason():
    rng = random.Random(7)
    resources = [CoapResource(uri="coap://h/n", device="d", sensor="s"),
                 CoapResource(uri="coap://h/j", device="d", sensor="s", format="json", value="/reading/v", timestamp="/ts", timestampFormat="unixSeconds")]
    now = pd.Timestamp.now(tz="UTC").to_pydatetime()
    outcomes = [coap_reading("proto", rng.choice(resources), payload(rng) if rng.random() < 0.8 else str(rng.choice(HOSTILE)).encode(), now) for _ in range(5_000)]
    assert all(isinstance(o, Reading) or (isinstance(o, MalformedReading) and o.kind in MALFORMED_REASONS) for o in outcomes)
    readings = [o for o in outcomes if isinstance(o, Reading)]
    assert readings and all(r.seq is None and (r.value is None) == (r.quality == "bad") for r in readings)
