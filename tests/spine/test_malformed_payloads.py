"""Malformed payloads never crash a collector; every one is counted, valid ones still stored."""

from __future__ import annotations

import json
import string

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensorfleet.collectors.base import CollectorSink
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import MalformedReading, decode_json_payload
from sensorfleet.testing import component, wait_until

VALID = {"fleet": "demo", "protocol": "mqtt", "device": "mqtt-00001", "sensor": "temperature", "value": 21.5, "unit": "degC", "ts": "2026-11-25T12:00:00.000000Z", "seq": 1, "quality": "good", "anomaly": None}

json_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# Valid documents with one field broken, or whole payloads of garbage.
broken_documents = st.builds(lambda key, value: {**VALID, key: value}, st.sampled_from(sorted(VALID)), json_values)
payloads = st.one_of(
    st.binary(max_size=200),
    st.text(alphabet=string.printable, max_size=200).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    broken_documents.map(lambda d: json.dumps(d).encode()),
)


def feed(sink: CollectorSink, payload: bytes) -> None:
    """What the MQTT collector does with one message (collectors/mqtt.py `_on_message`)."""
    try:
        documents = decode_json_payload(payload)
    except MalformedReading as exc:
        sink.reject(exc.kind, str(exc))
        documents = []
    sink.accept_documents(documents)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(payload=payloads)
def test_any_payload_is_stored_or_counted_never_raises(tmp_path, payload):
    sink = CollectorSink("demo", "mqtt", str(tmp_path / "data"), FleetMetrics("demo", "mqtt", "collector"))
    feed(sink, payload)
    t = sink.totals
    try:
        docs = json.loads(payload.decode("utf-8"))
        expected = len(docs) if isinstance(docs, list) else 1
    except (ValueError, UnicodeDecodeError):
        expected = 1  # one undecodable payload
    # every document ends up exactly once: received (valid) or counted malformed
    assert t["received"] + t["malformed"] == expected
    sink.flush()


def test_malformed_kinds_are_named():
    cases = {b"\xff\xfe": "not_utf8", b"{nope": "not_json"}
    for payload, kind in cases.items():
        with pytest.raises(MalformedReading) as caught:
            decode_json_payload(payload)
        assert caught.value.kind == kind
    from sensorfleet.reading import reading_from_wire

    for broken, kind, field in [({**VALID, "value": "hot"}, "bad_value", "'value'"), ({**VALID, "seq": -1}, "bad_seq", "'seq'"), ({**VALID, "ts": "yesterday"}, "bad_ts", "'ts'"), ({k: v for k, v in VALID.items() if k != "device"}, "missing_field", "device")]:
        with pytest.raises(MalformedReading) as caught:
            reading_from_wire(broken)
        assert caught.value.kind == kind and field in str(caught.value)


def test_live_collector_survives_a_flood_of_garbage(write_fleet, tmp_path, mosquitto):
    fleet = write_fleet()
    collector = component("collect", "mqtt", fleet, tmp_path, "--data", str(tmp_path / "data"), "--broker", mosquitto.url).start()
    wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 15, message="collector connected")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    garbage = [b"", b"\x00\x01\x02", b"{", b"[1,2,3]", b'{"fleet": "demo"}', json.dumps({**VALID, "value": "NaN"}).encode(), json.dumps({**VALID, "fleet": "other"}).encode()] * 30
    for payload in garbage:
        client.publish("sensorfleet/demo/mqtt-00001", payload, qos=1).wait_for_publish(5)
    valid = [json.dumps({**VALID, "seq": i}).encode() for i in range(1, 11)]
    for payload in valid:
        client.publish("sensorfleet/demo/mqtt-00001", payload, qos=1).wait_for_publish(5)
    client.loop_stop()
    wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") == 10, 20, message="valid readings stored")
    # [1,2,3] holds three bad documents; the empty payload is not JSON; every other one is one bad payload
    assert collector.metric("sensorfleet_payloads_malformed_total") == 30 * 9
    assert collector.process.poll() is None, "collector crashed"
    log = collector.log()
    assert log.count("skipping malformed mqtt payload (not_json)") == 1, "each kind is logged once"
    assert collector.stop() == 0
