"""Fleet manifests: the example is valid, invalid ones are refused with the field path named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sensorfleet.spec import FleetSpecError, load_fleet, parse_fleet

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "fleet.yaml"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_fleet_is_a_valid_sensorfleet_manifest():
    fleet = load_fleet(EXAMPLE)
    assert fleet.kind == "SensorFleet" and fleet.api_version == "sensorfleet.io/v1alpha1"
    assert fleet.name == "demo"
    assert fleet.spec.enabled_protocols() == ["mqtt", "coap", "opcua"]
    assert [s.name for s in fleet.spec.sensors] == ["temperature", "humidity", "pressure"]


def test_defaults_fill_every_section():
    fleet = parse_fleet({"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "tiny"}})
    assert fleet.spec.protocols.mqtt.enabled and fleet.spec.protocols.mqtt.qos == 1
    assert fleet.spec.collector.batch_size > 0 and fleet.spec.forecasting.horizon == 60
    assert len(fleet.spec.sensors) == 3


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["spec"]["protocols"]["mqtt"].update(devices=0), "spec.protocols.mqtt.devices: Input should be greater than or equal to 1, got 0"),
        (lambda d: d["spec"]["protocols"]["mqtt"].update(qos=2), "spec.protocols.mqtt.qos"),
        (lambda d: d["spec"]["protocols"]["mqtt"].update(interval="fast"), "spec.protocols.mqtt.interval"),
        (lambda d: d["spec"]["protocols"]["mqtt"].update(devcies=3), "spec.protocols.mqtt.devcies: unknown field"),
        (lambda d: d["spec"]["sensors"][0].update(min=200), "spec.sensors.0: min (200.0) must be below max (125.0)"),
        (lambda d: d["spec"]["sensors"][1].update(baseline=140), "spec.sensors.1: baseline (140.0) must lie within"),
        (lambda d: d["spec"]["sensors"][0].pop("unit"), "spec.sensors.0.unit: required field is missing"),
        (lambda d: d["spec"]["sensors"].append(dict(d["spec"]["sensors"][0])), "sensor names must be unique; repeated: temperature"),
        (lambda d: d["spec"]["anomalies"].update(spikeProbability=1.5), "spec.anomalies.spikeProbability"),
        (lambda d: d["spec"]["forecasting"].update(schedule="every hour"), "spec.forecasting.schedule: schedule 'every hour' is not a five-field cron"),
        (lambda d: [d["spec"]["protocols"][p].update(enabled=False) for p in ("mqtt", "coap", "opcua")], "spec: protocols: at least one of mqtt, coap, opcua must be enabled, or spec.sources must list a third-party source"),
        # spec.sources (third-party devices): the field and the fix named
        (lambda d: d["spec"].update(sources={"mqtt": [{"name": "plant", "url": "mqtt://h:1883", "mappings": [{"topic": "a/{device}/x#", "value": "/v"}]}]}),
         "spec.sources.mqtt.0.mappings.0.topic: level 3 ('x#'): '+', '#' and '{name}' must fill a whole level"),
        (lambda d: d["spec"].update(sources={"mqtt": [{"name": "plant", "url": "mqtt://h:1883", "mappings": [{"topic": "a/{device}", "value": "/v"}]}]}),
         "spec.sources.mqtt.0.mappings.0: sensor: {sensor} is not a named level of topic 'a/{device}' (its names: {device})"),
        (lambda d: d["spec"].update(sources={"mqtt": [{"name": "plant", "url": "mqtt://h:1883", "mappings": [{"topic": "a/{device}/{sensor}", "value": "v"}]}]}),
         "spec.sources.mqtt.0.mappings.0.value: a JSON pointer is empty (the whole document) or starts with '/'"),
        (lambda d: d["spec"].update(sources={"opcua": [{"name": "plc", "endpoint": "opc.tcp://h:4840", "nodes": [{"device": "d", "sensor": "s"}]}]}),
         "spec.sources.opcua.0.nodes.0: set exactly one of nodeId and browsePath"),
        (lambda d: d["spec"].update(sources={"opcua": [{"name": "plc", "endpoint": "opc.tcp://h:4840", "nodes": [{"nodeId": "Temperature", "device": "d", "sensor": "s"}]}]}),
         "spec.sources.opcua.0.nodes.0.nodeId: String should match pattern"),
        (lambda d: d["spec"].update(sources={"coap": [{"name": "lab", "resources": [{"uri": "coap://h/t", "device": "d", "sensor": "s", "value": "/v"}]}]}),
         "spec.sources.coap.0.resources.0: value and timestamp (JSON pointers) need format: json"),
        (lambda d: d["spec"].update(sources={"coap": [{"name": "lab", "resources": [{"uri": "coap://h/t", "device": "d", "sensor": "s"}]}],
                                             "opcua": [{"name": "lab", "endpoint": "opc.tcp://h:4840", "nodes": [{"nodeId": "i=1", "device": "d", "sensor": "s"}]}]}),
         "spec.sources: source names must be unique across mqtt, opcua and coap; repeated: lab"),
        (lambda d: d["spec"]["broker"].update(mode="external"), "spec.broker: mode 'external' needs url"),
        (lambda d: d["spec"].update(storage={"url": "s3://bucket/x", "size": "5Gi"}), "spec.storage: set either url or size, not both"),
        (lambda d: d["spec"]["protocols"]["mqtt"].update(mqttVersion="3.1.1", topicAliases=True, messageExpiry=60),
         'spec.protocols.mqtt: mqttVersion: messageExpiry, topicAliases need MQTT 5; use mqttVersion "5"'),
        (lambda d: d["spec"]["protocols"]["mqtt"].update(mqttVersion=5), "spec.protocols.mqtt.mqttVersion: Input should be '5' or '3.1.1'"),
        (lambda d: d["spec"]["protocols"]["mqtt"].update(messageMode="gateway", userProperties=True),
         "spec.protocols.mqtt: userProperties: a gateway message holds many readings"),
        (lambda d: d["spec"].update(storage={"url": "s3://bucket/x"}, forecasting={"parallelism": 3}),
         "spec: forecasting.parallelism 3 needs a claim (storage.size), not storage.url"),
        (lambda d: d["metadata"].update(name="Bad_Name"), "metadata.name"),
        (lambda d: d.update(kind="Deployment"), "kind"),
    ],
)
def test_invalid_fleet_names_the_field(mutate, expected):
    doc = example()
    mutate(doc)
    with pytest.raises(FleetSpecError) as caught:
        parse_fleet(doc, "fleet.yaml")
    assert any(expected in line for line in caught.value.errors), caught.value.errors


def test_validate_command_exits_0_for_the_example():
    result = subprocess.run([sys.executable, "-m", "sensorfleet.cli", "validate", str(EXAMPLE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "fleet demo" in result.stdout


def test_validate_command_exits_2_with_one_line_per_error(tmp_path):
    doc = example()
    doc["spec"]["protocols"]["mqtt"]["devices"] = -5
    doc["spec"]["collector"]["batchSize"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = subprocess.run([sys.executable, "-m", "sensorfleet.cli", "validate", str(bad)], capture_output=True, text=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 2, result.stderr
    assert any("spec.protocols.mqtt.devices" in line and "-5" in line for line in lines)
    assert any("spec.collector.batchSize" in line for line in lines)
    assert "Traceback" not in result.stderr


def test_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("apiVersion: sensorfleet.io/v1alpha1\nkind: SensorFleet\nmetadata: {name: x\n")
    with pytest.raises(FleetSpecError) as caught:
        load_fleet(bad)
    assert "(yaml): line" in caught.value.errors[0]


def test_bare_operator_import_is_the_standard_library():
    """The operator/ folder must never shadow `import operator`, even from the repo root."""
    result = subprocess.run([sys.executable, "-c", "import operator, sensorfleet.operator; print(operator.__file__); operator.or_"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert str(REPO / "operator") not in result.stdout


def test_validate_command_summarises_a_fleet_of_third_party_sources():
    example = Path(__file__).parents[2] / "examples" / "third-party.yaml"
    result = subprocess.run([sys.executable, "-m", "sensorfleet.cli", "validate", str(example)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "3 third-party source(s): mqtt hall-1, opcua plc, coap lab" in result.stdout
    assert " devices, " not in result.stdout, "no simulated devices"
