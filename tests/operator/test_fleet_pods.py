"""What the fleet's pods get from the builders: restarts on the edits that change what a pod
produces or expects, resources that grow with the devices a pod serves, a NetworkPolicy, bounded
volumes and broker sessions. Pure builders; no API server."""

from __future__ import annotations

from typing import Any

import pytest

from sensorfleet.operator import broker_builders, builders, child_meta, sizing
from sensorfleet.operator.broker_builders import BrokerCredentials
from sensorfleet.operator.child_meta import BuildOptions, Owner
from sensorfleet.spec import SensorFleet

OWNER = Owner("plant", "factory", "0000-uid")
CREDS = BrokerCredentials("sensorfleet", "s3cret")


def fleet(**spec: Any) -> SensorFleet:
    base: dict[str, Any] = {"protocols": {"mqtt": {"replicas": 2, "collectorReplicas": 2},
                                          "coap": {"enabled": True, "replicas": 2},
                                          "opcua": {"enabled": True}}}
    for key, value in spec.items():
        if key == "protocols":
            for protocol, fields in value.items():
                base["protocols"][protocol] = {**base["protocols"].get(protocol, {}), **fields}
        else:
            base[key] = value
    return SensorFleet.model_validate({"metadata": {"name": "plant", "namespace": "factory"}, "spec": base})


def children(f: SensorFleet, options: BuildOptions | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in builders.build_children(f, OWNER, options or BuildOptions(), CREDS)}


def template_hashes(f: SensorFleet) -> dict[str, str]:
    return {name: c["spec"]["template"]["metadata"]["annotations"][child_meta.HASH_ANNOTATION]
            for (kind, name), c in children(f).items() if kind == "Deployment"}


def restarted(before: SensorFleet, after: SensorFleet) -> set[str]:
    old, new = template_hashes(before), template_hashes(after)
    return {name for name in old if name in new and old[name] != new[name]}


APP_PODS = {f"plant-{p}-{role}-{i}" for p, n in (("mqtt", 2), ("coap", 2), ("opcua", 1))
            for role in ("simulator", "collector") for i in range(n if role == "simulator" or p == "mqtt" else 1)}


@pytest.mark.parametrize("edit", [{"seed": 7}, {"epoch": "2026-06-01T00:00:00Z"}])
def test_seed_or_epoch_edit_restarts_every_simulator_and_collector(edit: dict[str, Any]) -> None:
    # The collectors' sequence state and (OPC UA) expected values come from seed and epoch: a
    # collector left running would misread the new readings as duplicates or bad values.
    assert restarted(fleet(), fleet(**edit)) == APP_PODS


def test_scaling_the_collectors_restarts_no_simulator() -> None:
    # A simulator restart is a gap in every series it serves; the simulators never read collectorReplicas.
    assert not {name for name in restarted(fleet(), fleet(protocols={"mqtt": {"collectorReplicas": 3}})) if "simulator" in name}


@pytest.mark.parametrize("field", ["interval", "devices"])
def test_interval_or_devices_edit_restarts_that_protocols_simulators_and_collectors(field: str) -> None:
    value = {"interval": 2.5, "devices": 77}[field]
    assert restarted(fleet(), fleet(protocols={"coap": {field: value}})) == {
        "plant-coap-simulator-0", "plant-coap-simulator-1", "plant-coap-collector-0"}


def test_resources_grow_with_the_devices_a_pod_serves() -> None:
    def resources(f: SensorFleet, name: str) -> dict[str, dict[str, str]]:
        return children(f)[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]["resources"]

    def millis(q: str) -> float:
        return float(q[:-1]) if q.endswith("m") else float(q) * 1000

    def mebibytes(q: str) -> float:
        return float(q[:-2]) * (1024 if q.endswith("Gi") else 1)

    small = fleet()
    assert resources(small, "plant-mqtt-simulator-0") == sizing.RESOURCES["simulator"]  # the floor
    big = fleet(protocols={"mqtt": {"devices": 40_000, "interval": 1.0}})
    for name, role in (("plant-mqtt-simulator-0", "simulator"), ("plant-mqtt-collector-1", "collector")):
        grown, floor = resources(big, name), sizing.RESOURCES[role]
        assert millis(grown["requests"]["cpu"]) > millis(floor["requests"]["cpu"]), name
        assert mebibytes(grown["requests"]["memory"]) > mebibytes(floor["requests"]["memory"]), name
        assert millis(grown["limits"]["cpu"]) >= millis(grown["requests"]["cpu"])
        assert mebibytes(grown["limits"]["memory"]) >= mebibytes(grown["requests"]["memory"])
    # The same devices over four times the replicas: each pod needs less.
    spread = fleet(protocols={"mqtt": {"devices": 40_000, "replicas": 8, "collectorReplicas": 8}})
    assert millis(resources(spread, "plant-mqtt-simulator-0")["requests"]["cpu"]) < \
        millis(resources(big, "plant-mqtt-simulator-0")["requests"]["cpu"])
    assert mebibytes(resources(spread, "plant-mqtt-collector-0")["requests"]["memory"]) < \
        mebibytes(resources(big, "plant-mqtt-collector-0")["requests"]["memory"])


def test_every_empty_dir_is_bounded_and_the_broker_expires_abandoned_sessions() -> None:
    c = children(fleet())
    for (kind, name), child in c.items():
        if kind not in ("Deployment", "CronJob"):
            continue
        spec = child["spec"]
        pod = spec["jobTemplate"]["spec"]["template"]["spec"] if kind == "CronJob" else spec["template"]["spec"]
        for volume in pod["volumes"]:
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), (name, volume["name"])
    conf = c[("ConfigMap", "plant-broker-config")]["data"]["mosquitto.conf"].splitlines()
    assert f"persistent_client_expiration {broker_builders.BROKER_SESSION_EXPIRY}" in conf
    queued = next(int(line.split()[1]) for line in conf if line.startswith("max_queued_bytes "))
    assert 0 < queued
    # The broker's memory and data volume hold every collector session's full queue.
    broker = c[("Deployment", "plant-broker")]["spec"]["template"]["spec"]
    data = next(v for v in broker["volumes"] if v["name"] == "data")["emptyDir"]["sizeLimit"]
    memory = broker["containers"][0]["resources"]["limits"]["memory"]
    sessions = sizing.collector_count(fleet(), "mqtt")
    assert float(data[:-2]) * (1 << 20) >= sessions * queued
    assert float(memory[:-2]) * (1 << 20) >= sessions * queued


def test_network_policy_admits_only_the_fleets_pods_and_metrics_from_the_configured_namespace() -> None:
    f = fleet()
    policy = children(f, BuildOptions(metrics_namespace="monitoring"))[("NetworkPolicy", "plant-network")]
    fleet_pods = {"matchLabels": {"app.kubernetes.io/name": "sensorfleet", "app.kubernetes.io/instance": "plant"}}
    assert policy["spec"]["podSelector"] == fleet_pods
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    same_fleet, metrics = policy["spec"]["ingress"]
    assert same_fleet == {"from": [{"podSelector": fleet_pods}]}
    assert metrics == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                       "ports": [{"protocol": "TCP", "port": f.spec.monitoring.port}]}
    # Every pod of the fleet (broker, simulators, collectors, forecast) is selected by the policy.
    for (kind, name), child in children(f).items():
        if kind == "Deployment":
            pod_labels = child["spec"]["template"]["metadata"]["labels"]
            assert fleet_pods["matchLabels"].items() <= pod_labels.items(), name
    # Any namespace may scrape when none is configured; no policy when switched off.
    open_metrics = children(f)[("NetworkPolicy", "plant-network")]["spec"]["ingress"][1]
    assert open_metrics["from"] == [{"namespaceSelector": {}}]
    assert ("NetworkPolicy", "plant-network") not in children(f, BuildOptions(network_policy=False))
    unmonitored = fleet(monitoring={"enabled": False})
    assert len(children(unmonitored)[("NetworkPolicy", "plant-network")]["spec"]["ingress"]) == 1


def test_a_device_count_edit_never_restarts_the_broker() -> None:
    # The broker's queues and memory depend on its sessions (collectors), not on the traffic:
    # growing the fleet must not drop every connection.
    before, after = children(fleet()), children(fleet(protocols={"mqtt": {"devices": 50_000, "interval": 0.1}}))
    for key in (("Deployment", "plant-broker"), ("ConfigMap", "plant-broker-config")):
        assert before[key] == after[key], key
