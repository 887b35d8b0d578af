"""Third-party sources in the cluster: the operator's pure builders give each source its own
collector Deployment running `sensorfleet collect <protocol> --source <name>`; no API server."""

from __future__ import annotations

from sensorfleet.operator import builders, child_meta
from sensorfleet.operator.broker_builders import BrokerCredentials
from sensorfleet.operator.child_meta import BuildOptions, Owner
from sensorfleet.spec import SensorFleet

OWNER = Owner("plant", "factory", "0000-uid")
SOURCES = {
    "mqtt": [{"name": "hall-1", "url": "mqtt://broker.plant:1883", "credentials": {"username": {"name": "plant-mqtt", "key": "user"}, "password": {"name": "plant-mqtt", "key": "pass"}},
              "mappings": [{"topic": "hall1/{device}/{sensor}", "value": "/v"}]}],
    "opcua": [{"name": "plc", "endpoint": "opc.tcp://plc.plant:4840", "nodes": [{"nodeId": "ns=1;s=T1", "device": "boiler", "sensor": "temperature"}]}],
    "coap": [{"name": "lab", "resources": [{"uri": "coap://lab.plant/t", "device": "lab-1", "sensor": "temperature"}]}],
}


def fleet(protocols: dict | None = None, sources: dict | None = None) -> SensorFleet:
    spec = {"protocols": protocols or {"mqtt": {"enabled": False}}, "sources": SOURCES if sources is None else sources}
    return SensorFleet.model_validate({"metadata": {"name": "plant", "namespace": "factory"}, "spec": spec})


def deployments(f: SensorFleet) -> dict[str, dict]:
    return {c["metadata"]["name"]: c for c in builders.build_children(f, OWNER, BuildOptions(), BrokerCredentials("u", "p")) if c["kind"] == "Deployment"}


def test_a_fleet_of_sources_alone_runs_one_collector_per_source_and_nothing_else():
    pods = deployments(fleet())
    assert sorted(pods) == ["plant-src-hall-1", "plant-src-lab", "plant-src-plc"], "no simulator, no broker of ours"
    args = {name: d["spec"]["template"]["spec"]["containers"][0]["args"] for name, d in pods.items()}
    assert args["plant-src-plc"][:2] == ["collect", "opcua"] and args["plant-src-plc"][-2:] == ["--source", "plc"]
    assert args["plant-src-hall-1"][:2] == ["collect", "mqtt"] and args["plant-src-lab"][:2] == ["collect", "coap"]
    assert pods["plant-src-plc"]["metadata"]["labels"]["sensorfleet.io/source"] == "plc"
    # The dataset claim is mounted like any collector's.
    volumes = {v["name"] for v in pods["plant-src-lab"]["spec"]["template"]["spec"]["volumes"]}
    assert "data" in volumes


def test_source_credentials_come_from_secret_keys_never_literals():
    env = {e["name"]: e for e in deployments(fleet())["plant-src-hall-1"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SENSORFLEET_MQTT_USERNAME"]["valueFrom"] == {"secretKeyRef": {"name": "plant-mqtt", "key": "user"}}
    assert env["SENSORFLEET_MQTT_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "plant-mqtt", "key": "pass"}}


def test_editing_one_source_restarts_only_its_collector():
    def hashes(f: SensorFleet) -> dict[str, str]:
        return {n: d["spec"]["template"]["metadata"]["annotations"][child_meta.HASH_ANNOTATION] for n, d in deployments(f).items()}

    before = hashes(fleet({"mqtt": {"devices": 5}}))
    edited = {**SOURCES, "opcua": [{**SOURCES["opcua"][0], "publishingInterval": 2.0}]}
    after = hashes(fleet({"mqtt": {"devices": 5}}, edited))
    changed = sorted(n for n in before if before[n] != after[n])
    assert changed == ["plant-src-plc"]
    more_devices = hashes(fleet({"mqtt": {"devices": 50}}))
    assert all(more_devices[n] == before[n] for n in before if "-src-" in n), "simulator edits leave source collectors alone"


def test_builds_are_deterministic():
    f = fleet()
    assert builders.build_children(f, OWNER, BuildOptions(), None) == builders.build_children(f, OWNER, BuildOptions(), None)


def _deployment(name: str, ready: bool, rolled_out: bool = True) -> dict:
    conditions = [{"type": "Progressing", "reason": "NewReplicaSetAvailable", "status": "True"}] if rolled_out else []
    return {"metadata": {"name": name, "generation": 1}, "spec": {"replicas": 1},
            "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "conditions": conditions,
                       "readyReplicas": 1 if ready else 0, "availableReplicas": 1 if ready else 0}}


def test_status_counts_source_collectors_and_their_store():
    from sensorfleet.operator import status

    f = fleet()
    names = ["plant-src-hall-1", "plant-src-plc", "plant-src-lab"]
    waiting = status.compute_status(f, 1, [_deployment(n, n != "plant-src-lab", rolled_out=False) for n in names], [], [], None, "T1")
    conditions = {c["type"]: c for c in waiting["conditions"]}
    assert waiting["ready"] == "2/3" and conditions["Ready"]["status"] == "False" and "plant-src-lab" in conditions["Ready"]["message"]
    ready = status.compute_status(f, 1, [_deployment(n, True) for n in names], [], [], waiting, "T2")
    assert ready["ready"] == "3/3" and {c["type"]: c["status"] for c in ready["conditions"]}["StorageDegraded"] == "False"
    # A rolled-out source collector that lost readiness cannot write the store (its /readyz).
    unwritable = status.compute_status(f, 1, [_deployment(n, n != "plant-src-plc") for n in names], [], [], ready, "T3")
    storage = {c["type"]: c for c in unwritable["conditions"]}["StorageDegraded"]
    assert storage["status"] == "True" and "plant-src-plc (0/1 ready)" in storage["message"]
