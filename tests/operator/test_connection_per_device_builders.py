"""connectionPerDevice in the cluster: the same spec reaches the simulator pods, and the broker the
operator runs accepts (and is sized for) one connection per device."""

from __future__ import annotations

import pytest
import yaml

from sensorfleet.operator import broker_builders, builders, child_meta, pod_builders, sizing
from sensorfleet.operator.broker_builders import BrokerCredentials
from sensorfleet.operator.child_meta import BuildOptions, Owner
from sensorfleet.spec import FleetSpecError, SensorFleet, parse_fleet

OWNER = Owner("plant", "factory", "0000-uid")
CREDS = BrokerCredentials("sensorfleet", "s3cret")


def fleet(**mqtt: object) -> SensorFleet:
    return parse_fleet({"metadata": {"name": "plant", "namespace": "factory"}, "spec": {"protocols": {"mqtt": {"devices": 10_000, "replicas": 2, "collectorReplicas": 2, **mqtt}}}})


def children(f: SensorFleet) -> dict[tuple[str, str], dict]:
    return {(c["kind"], c["metadata"]["name"]): c for c in builders.build_children(f, OWNER, BuildOptions(), CREDS)}


def test_simulator_pods_get_the_setting_through_their_fleet_file() -> None:
    built = children(fleet(connectionPerDevice=True, connectRate=250, keepalive=30))
    manifest = yaml.safe_load(built[("ConfigMap", "plant-fleet")]["data"]["fleet.yaml"])
    pods_see = parse_fleet(manifest).spec.protocols.mqtt
    assert (pods_see.connection_per_device, pods_see.connect_rate, pods_see.keepalive) == (True, 250, 30)
    simulator = built[("Deployment", child_meta.simulator_name("plant", "mqtt", 0))]
    args = simulator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--fleet") + 1] == pod_builders.FLEET_FILE


def test_the_broker_accepts_a_connection_per_device_and_is_sized_for_them() -> None:
    per_device, shared = children(fleet(connectionPerDevice=True)), children(fleet())
    conf = per_device[("ConfigMap", "plant-broker-config")]["data"]["mosquitto.conf"]
    assert f"max_connections {10_000 + 2 + broker_builders.BROKER_SPARE_CONNECTIONS}\n" in conf
    assert "max_connections" not in shared[("ConfigMap", "plant-broker-config")]["data"]["mosquitto.conf"]

    def memory_limit(built: dict, kind: str, name: str) -> float:
        return sizing.parse_mebibytes(built[(kind, name)]["spec"]["template"]["spec"]["containers"][-1]["resources"]["limits"]["memory"])

    broker = [name for kind, name in per_device if kind == "Deployment" and name.endswith("broker")][0]
    assert memory_limit(per_device, "Deployment", broker) > memory_limit(shared, "Deployment", broker)
    simulator = child_meta.simulator_name("plant", "mqtt", 0)
    assert memory_limit(per_device, "Deployment", simulator) > memory_limit(shared, "Deployment", simulator)


def test_more_connections_than_a_process_can_open_ask_for_replicas() -> None:
    with pytest.raises(FleetSpecError, match=r"spec.protocols.mqtt: Value error, replicas: with connectionPerDevice one simulator process holds at most 15,000|replicas >= 2, got 1"):
        fleet(devices=20_000, replicas=1, connectionPerDevice=True)
    assert fleet(devices=20_000, replicas=2, connectionPerDevice=True).spec.protocols.mqtt.replicas == 2
    assert fleet(devices=20_000, replicas=1).spec.protocols.mqtt.connection_per_device is False
