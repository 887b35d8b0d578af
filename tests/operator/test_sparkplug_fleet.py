"""A Sparkplug B fleet in the cluster: the operator's pure builders carry payloadFormat and the
primary host to every MQTT pod through the fleet ConfigMap, one simulator Deployment per edge
node and one collector (the Sparkplug host). No API server."""

from __future__ import annotations

import yaml

from sensorfleet.operator import builders
from sensorfleet.operator.broker_builders import BrokerCredentials
from sensorfleet.operator.child_meta import BuildOptions, Owner
from sensorfleet.spec import SensorFleet

OWNER = Owner("plant", "factory", "0000-uid")


def test_sparkplug_fleet_reaches_every_mqtt_pod() -> None:
    fleet = SensorFleet.model_validate({"metadata": {"name": "plant", "namespace": "factory"}, "spec": {
        "protocols": {"mqtt": {"replicas": 3, "payloadFormat": "sparkplugB", "sparkplug": {"primaryHostId": "scada"}}}}})
    children = {(c["kind"], c["metadata"]["name"]): c for c in builders.build_children(fleet, OWNER, BuildOptions(), BrokerCredentials("u", "p"))}
    spec = SensorFleet.model_validate(yaml.safe_load(children[("ConfigMap", "plant-fleet")]["data"]["fleet.yaml"])).spec
    assert spec.protocols.mqtt.payload_format == "sparkplugB" and spec.protocols.mqtt.sparkplug.primary_host_id == "scada"
    deployments = [name for kind, name in children if kind == "Deployment"]
    simulators = sorted(n for n in deployments if "mqtt" in n and "sim" in n)
    collectors = sorted(n for n in deployments if "mqtt" in n and "collector" in n)
    assert len(simulators) == 3 and len(collectors) == 1, deployments
    for name in simulators + collectors:
        pod = children[("Deployment", name)]["spec"]["template"]["spec"]
        assert any(v.get("configMap", {}).get("name") == "plant-fleet" for v in pod.get("volumes", [])), name
