"""Sparkplug B payloads: generated from the specification's schema, read by Eclipse Tahu's codec,
and read back into the Reading schema by the host state machine."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sensorfleet.reading import MalformedReading, reading_from_wire
from sensorfleet.sparkplug import payload as sp
from sensorfleet.sparkplug.device import DeviceMessages, SensorValue
from sensorfleet.sparkplug.host import HostState

PACKAGE = Path(sp.__file__).parent
SENSORS = [("temperature", "degC"), ("humidity", "%")]


def test_generated_code_is_what_the_schema_gives(tmp_path):
    """sparkplug_b_pb2.py(.pyi) are protoc's output for sparkplug_b.proto, not edited by hand."""
    (tmp_path / "sparkplug_b.proto").write_bytes((PACKAGE / "sparkplug_b.proto").read_bytes())
    done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "--proto_path=.", "--python_out=.", "--pyi_out=.", "sparkplug_b.proto"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("sparkplug_b_pb2.py", "sparkplug_b_pb2.pyi"):
        assert (tmp_path / name).read_text() == (PACKAGE / name).read_text(), f"{name} differs from what sparkplug_b.proto generates: regenerate it (see the .proto's header)"


def test_schema_field_numbers_are_the_specifications():
    """A few anchors of the Sparkplug 3.0 schema, so an edit of the .proto cannot pass unnoticed."""
    fields = {f.name: (f.number, f.type) for f in sp.Payload.Metric.DESCRIPTOR.fields}
    assert fields["name"][0] == 1 and fields["alias"][0] == 2 and fields["timestamp"][0] == 3 and fields["datatype"][0] == 4
    assert fields["is_null"][0] == 7 and fields["properties"][0] == 9 and fields["double_value"][0] == 13 and fields["long_value"][0] == 11
    assert {f.name: f.number for f in sp.Payload.DESCRIPTOR.fields} == {"timestamp": 1, "metrics": 2, "seq": 3, "uuid": 4, "body": 5}
    assert sp.DOUBLE == 10 and sp.UINT64 == 8 and sp.BOOLEAN == 11 and sp.STRING == 12 and sp.INT32 == 3


def _tahu_decode(peer, payloads: list[bytes]) -> list[dict]:
    argv, env = peer
    done = subprocess.run([*argv, "decode"], input="\n".join(base64.b64encode(p).decode() for p in payloads), capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_tahu_reads_births_and_data(sparkplug_peer):
    device = DeviceMessages(3, SENSORS)
    birth = device.birth(1, 42, 1_700_000_000_000, [SensorValue(21.5), SensorValue(None, "bad", "dropout")])
    data = device.data(2, 43, 1_700_000_001_000, [SensorValue(21.75), SensorValue(40.0, "uncertain", "stuck")])
    nbirth, ndeath = sp.node_birth(5, 1_700_000_000_000), sp.node_death(5)
    got_nbirth, got_birth, got_data, got_ndeath = _tahu_decode(sparkplug_peer, [nbirth, birth, data, ndeath])

    assert got_nbirth["tahu"]["seq"] == 0
    assert {m["name"]: (m["type"], m["value"]) for m in got_nbirth["tahu"]["metrics"]} == {"bdSeq": ("UInt64", 5), "Node Control/Rebirth": ("Boolean", False)}
    assert got_ndeath["tahu"]["metrics"] == [{"name": "bdSeq", "type": "UInt64", "value": 5}]

    metrics = {m["name"]: m for m in got_birth["tahu"]["metrics"]}
    assert got_birth["tahu"]["seq"] == 1 and got_birth["tahu"]["timestamp"] == 1_700_000_000_000
    assert metrics["sensorfleet/seq"] == {"name": "sensorfleet/seq", "alias": (3 + 1) << 8, "type": "UInt64", "value": 42, "timestamp": 1_700_000_000_000}
    temperature, humidity = metrics["temperature"], metrics["humidity"]
    assert (temperature["type"], temperature["value"], temperature["alias"]) == ("Double", 21.5, (4 << 8) | 1)
    assert temperature["properties"] == {"engUnit": {"type": "String", "value": "degC"}, "Quality": {"type": "Int32", "value": 192}}
    assert humidity["value"] is None and humidity["properties"]["Quality"]["value"] == 0 and humidity["properties"]["anomaly"]["value"] == "dropout"

    # Data by alias only: no name, no datatype (Tahu's own decoding then has no type; the raw fields carry all).
    raw = {m["alias"]: m for m in got_data["raw"]["metrics"]}
    assert all("name" not in m and "datatype" not in m for m in raw.values())
    assert raw[4 << 8]["longValue"] == 43 and raw[(4 << 8) | 1]["doubleValue"] == 21.75 and raw[(4 << 8) | 2]["doubleValue"] == 40.0
    assert raw[(4 << 8) | 2]["properties"] == {"keys": ["Quality", "anomaly"], "values": [{"type": 3, "intValue": 64}, {"type": 12, "stringValue": "stuck"}]}


def _host_documents(host: HostState, topic: str, payload: bytes, now: float = 0.0):
    out = host.handle(topic, payload, now)
    return out, [reading_from_wire(doc) for doc in out.documents]


def test_host_turns_births_data_and_deaths_into_readings():
    host, device, base = HostState("demo"), DeviceMessages(0, SENSORS), "spBv1.0/demo"
    out, _ = _host_documents(host, f"{base}/NBIRTH/sim-0", sp.node_birth(1, 1000))
    assert out.events == ["nbirth"] and out.rebirth is None
    _, birth = _host_documents(host, f"{base}/DBIRTH/sim-0/mqtt-00000", device.birth(1, 10, 1_700_000_000_123, [SensorValue(20.0), SensorValue(50.0, "uncertain", "stuck")]))
    assert [(r.sensor, r.value, r.unit, r.seq, r.quality, r.anomaly) for r in birth] == [("temperature", 20.0, "degC", 10, "good", None), ("humidity", 50.0, "%", 10, "uncertain", "stuck")]
    assert birth[0].ts.isoformat() == "2023-11-14T22:13:20.123000+00:00"
    _, data = _host_documents(host, f"{base}/DDATA/sim-0/mqtt-00000", device.data(2, 11, 1_700_000_001_000, [SensorValue(20.5), SensorValue(None, "bad", "dropout")]))
    assert [(r.value, r.quality, r.seq) for r in data] == [(20.5, "good", 11), (None, "bad", 11)]
    # The device goes silent (DDEATH at tick 12) and comes back at tick 20: the silent ticks are not losses.
    out, dead = _host_documents(host, f"{base}/DDEATH/sim-0/mqtt-00000", device.death(3, 12, 1_700_000_002_000, [SensorValue(None, "bad", "dropout")] * 2))
    assert "ddeath" in out.events and [(r.value, r.quality, r.seq, r.anomaly) for r in dead] == [(None, "bad", 12, "dropout")] * 2
    out, back = _host_documents(host, f"{base}/DBIRTH/sim-0/mqtt-00000", device.birth(4, 20, 1_700_000_010_000, [SensorValue(21.0), SensorValue(51.0)]))
    assert out.resumed == [("mqtt-00000", "temperature", 19), ("mqtt-00000", "humidity", 19)] and [r.seq for r in back] == [20, 20]
    assert out.rebirth is None and "seq_gap" not in out.events


def test_host_asks_for_a_rebirth_on_a_seq_gap_or_an_unknown_device():
    host, device, base = HostState("demo"), DeviceMessages(0, SENSORS), "spBv1.0/demo"
    host.handle(f"{base}/NBIRTH/sim-0", sp.node_birth(1, 1000), 0.0)
    host.handle(f"{base}/DBIRTH/sim-0/mqtt-00000", device.birth(1, 10, 1000, [SensorValue(1.0)] * 2), 0.0)
    out = host.handle(f"{base}/DDATA/sim-0/mqtt-00000", device.data(5, 11, 2000, [SensorValue(1.0)] * 2), 1.0)  # seq 2..4 missing
    assert out.events == ["seq_gap"] and out.rebirth == "sim-0" and len(out.documents) == 2
    assert host.handle(f"{base}/DDATA/sim-0/mqtt-00000", device.data(9, 12, 3000, [SensorValue(1.0)] * 2), 2.0).rebirth is None  # held off
    with pytest.raises(MalformedReading, match="no DBIRTH seen for device 'mqtt-00009'"):
        host.handle(f"{base}/DDATA/sim-0/mqtt-00009", device.data(10, 12, 3000, [SensorValue(1.0)] * 2), 100.0)
    assert host.nodes["sim-0"].rebirth_asked == 100.0


def test_host_ignores_a_stale_last_will_and_names_bad_input():
    host, base = HostState("demo"), "spBv1.0/demo"
    host.handle(f"{base}/NBIRTH/sim-0", sp.node_birth(2, 1000), 0.0)
    assert host.handle(f"{base}/NDEATH/sim-0", sp.node_death(1), 0.0).events == ["stale_ndeath"]
    assert host.nodes["sim-0"].online
    assert host.handle(f"{base}/NDEATH/sim-0", sp.node_death(2), 0.0).events == ["ndeath"] and not host.nodes["sim-0"].online
    with pytest.raises(MalformedReading, match="not a Sparkplug B protobuf"):
        host.handle(f"{base}/DDATA/sim-0/d", b"\xff\xff\xff", 0.0)
    with pytest.raises(MalformedReading, match="group 'other' is not fleet 'demo'"):
        host.handle("spBv1.0/other/NBIRTH/sim-0", sp.node_birth(1, 1), 0.0)
    with pytest.raises(MalformedReading, match="DDATA needs a device level"):
        host.handle(f"{base}/DDATA/sim-0", sp.node_birth(1, 1), 0.0)


def test_every_refusal_reason_is_a_bounded_metric_label():
    """sensorfleet_payloads_malformed_total{reason} stays a fixed set: every kind the Sparkplug code
    refuses with (MalformedReading("kind", ...), UnknownDevice) is one of MALFORMED_REASONS."""
    import re

    from sensorfleet.reading import MALFORMED_REASONS

    sources = [PACKAGE / "payload.py", PACKAGE / "host.py", Path(__file__).parents[2] / "collectors" / "sparkplug.py"]
    kinds = {k for path in sources for k in re.findall(r'(?:MalformedReading\(|reject\()"([a-z_]+)"', path.read_text())}
    assert kinds >= {"bad_topic", "not_sparkplug", "unknown_device", "missing_field"}, kinds
    assert kinds <= set(MALFORMED_REASONS), kinds - set(MALFORMED_REASONS)
