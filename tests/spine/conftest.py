"""Fixtures for the local-fleet tests: small fleet manifests and real brokers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sensorfleet.testing import embedded_broker, mosquitto_broker

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml"


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def write_fleet(tmp_path):
    """Write a fleet manifest: the example, MQTT only, with `spec` overrides merged in."""

    def write(spec: dict | None = None, name: str = "demo") -> Path:
        doc = yaml.safe_load(EXAMPLE.read_text())
        doc["metadata"]["name"] = name
        doc["spec"]["protocols"]["coap"]["enabled"] = False
        doc["spec"]["protocols"]["opcua"]["enabled"] = False
        doc["spec"] = _merge(doc["spec"], spec or {})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return write


@pytest.fixture
def mosquitto(tmp_path):
    with mosquitto_broker(tmp_path / "mosquitto") as server:
        yield server


@pytest.fixture(params=["mosquitto", "amqtt"])
def any_broker(request, tmp_path):
    """Each test runs against real Mosquitto and against the embedded amqtt broker."""
    (tmp_path / request.param).mkdir()
    factory = mosquitto_broker if request.param == "mosquitto" else embedded_broker
    with factory(tmp_path / request.param) as server:
        yield server
