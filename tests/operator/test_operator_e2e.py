"""The operator on a real control plane: `helm install` + `kubectl apply -f examples/fleet.yaml`.

The operator runs as a local process with the chart's ServiceAccount token (see conftest), so
every call it makes goes through the chart's RBAC. kwok plays the kubelets; nothing else is faked.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import devcluster
from devcluster import deploy
from sensorfleet.operator import broker_builders, builders, child_meta, pod_builders

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
NS = "sf-e2e"
FLEET = "demo"


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 60.0, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


def kjson(cluster: devcluster.Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def children_of(cluster: devcluster.Cluster, fleet: str = FLEET, namespace: str = NS) -> dict[tuple[str, str], dict[str, Any]]:
    kinds = "deployments,services,configmaps,secrets,persistentvolumeclaims,cronjobs,networkpolicies"
    items = kjson(cluster, "get", kinds, "-n", namespace, "-l", f"sensorfleet.io/fleet={fleet}")["items"]
    return {(i["kind"], i["metadata"]["name"]): i for i in items}


def fleet_body(cluster: devcluster.Cluster, name: str = FLEET) -> dict[str, Any]:
    return kjson(cluster, "get", "sensorfleet", name, "-n", NS)


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def wait_ready(cluster: devcluster.Cluster, name: str = FLEET, timeout: float = 90) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        body = fleet_body(cluster, name)
        ok = condition(body, "Ready")
        if ok.get("status") == "True" and ok.get("observedGeneration") == body["metadata"]["generation"]:
            return body
        return None
    return wait_for(f"fleet {name} Ready", ready, timeout)


def patch_fleet(cluster: devcluster.Cluster, patch: dict[str, Any], name: str = FLEET) -> None:
    cluster.kubectl("patch", "sensorfleet", name, "-n", NS, "--type=merge", "-p", json.dumps(patch))


def versions(children: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], str]:
    return {k: v["metadata"]["resourceVersion"] for k, v in children.items()}


@pytest.fixture(scope="module")
def env(deployed: dict[str, Any]) -> dict[str, Any]:
    cluster: devcluster.Cluster = deployed["cluster"]
    cluster.kubectl("create", "namespace", NS, check=False)
    # A static volume for the example's 5Gi claim: its pods land on kwok's nodes, where the
    # default StorageClass's provisioner (the real node's) cannot make one. Same class as the
    # claim gets by default, else the two never bind.
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "sf-e2e-demo-data"},
          "spec": {"capacity": {"storage": "5Gi"}, "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/tmp/sf-e2e"},
                   "storageClassName": devcluster.STORAGE_CLASS,
                   "claimRef": {"namespace": NS, "name": child_meta.data_claim_name(FLEET)}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pv))
    return deployed


def test_example_fleet_becomes_ready_with_every_child(env: dict[str, Any]) -> None:
    cluster = env["cluster"]
    cluster.kubectl("apply", "-n", NS, "-f", str(REPO / "examples" / "fleet.yaml"))
    body = wait_ready(cluster)
    live = children_of(cluster)
    secret = live[("Secret", child_meta.broker_secret_name(FLEET))]
    creds = broker_builders.BrokerCredentials(*(base64.b64decode(secret["data"][k]).decode() for k in ("username", "password")))
    assert len(creds.password) >= 24
    expected = builders.build_children(builders.fleet_from_body(body), builders.owner_from_body(body),
                                       child_meta.BuildOptions(), creds)
    assert set(live) == {(c["kind"], c["metadata"]["name"]) for c in expected}
    for manifest in expected:
        child = live[(manifest["kind"], manifest["metadata"]["name"])]
        if manifest["kind"] == "PersistentVolumeClaim":  # outlives the fleet by default (test_data_claim.py)
            assert "ownerReferences" not in child["metadata"]
            continue
        assert child["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
        if manifest["kind"] == "Deployment":
            want, got = manifest["spec"]["template"]["spec"], child["spec"]["template"]["spec"]
            for w, g in zip(want.get("initContainers", []) + want["containers"], got.get("initContainers", []) + got["containers"]):
                assert (g.get("command"), g.get("args"), g["image"]) == (w.get("command"), w.get("args"), w["image"])
        if manifest["kind"] == "ConfigMap":
            assert child["data"] == manifest["data"]
    # pods Running on kwok nodes
    nodes = {n["metadata"]["name"] for n in kjson(cluster, "get", "nodes")["items"]}
    pods = wait_for("every fleet pod Running", lambda: (lambda ps: ps if ps and all(
        p["status"].get("phase") == "Running" for p in ps) else None)(
        kjson(cluster, "get", "pods", "-n", NS, "-l", f"sensorfleet.io/fleet={FLEET}")["items"]))
    # broker + (simulator + collector) x 3 protocols; a forecast or compaction Job's pod may join on the hour
    pods = [p for p in pods if p["metadata"].get("ownerReferences", [{}])[0].get("kind") == "ReplicaSet"]
    assert len(pods) == 7
    assert {p["spec"]["nodeName"] for p in pods} <= nodes
    status = body["status"]
    assert status["enabledProtocols"] == "mqtt,coap,opcua" and status["devices"] == 90
    assert status["protocols"]["mqtt"]["simulatorsReady"] == 1
    assert status["brokerEndpoint"] == f"mqtt://demo-broker.{NS}.svc:1883"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Ready": "True", "Progressing": "False", "Degraded": "False", "StorageDegraded": "False"}
    table = cluster.kubectl("get", "sf", "-n", NS).stdout.splitlines()
    assert table[0].split() == ["NAME", "PROTOCOLS", "DEVICES", "READY", "LAST", "FORECAST", "AGE"]
    assert table[1].split()[:4] == ["demo", "mqtt,coap,opcua", "90", "True"]
    events = kjson(cluster, "get", "events", "-n", NS, "--field-selector", f"involvedObject.name={FLEET},reason=Ready")["items"]
    assert events and events[0]["type"] == "Normal"


def test_a_fleet_of_third_party_sources_runs_a_collector_per_source(env: dict[str, Any]) -> None:
    """examples/third-party.yaml (no simulator, no broker): the API server takes its
    spec.sources, the operator runs one `<fleet>-src-<name>` collector per source, Ready 3/3."""
    cluster = env["cluster"]
    doc = yaml.safe_load((REPO / "examples" / "third-party.yaml").read_text())
    doc["spec"]["storage"] = {"url": "s3://sf-e2e/plant"}  # no claim: nothing to bind on kwok's nodes
    cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(doc))
    try:
        body = wait_ready(cluster, "plant")
        live = children_of(cluster, "plant")
        expected = builders.build_children(builders.fleet_from_body(body), builders.owner_from_body(body), child_meta.BuildOptions(), None)
        assert set(live) == {(c["kind"], c["metadata"]["name"]) for c in expected}
        assert sorted(name for kind, name in live if kind == "Deployment") == ["plant-src-hall-1", "plant-src-lab", "plant-src-plc"]
        args = live[("Deployment", "plant-src-plc")]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["collect", "opcua"] and args[-2:] == ["--source", "plc"]
        assert body["status"]["ready"] == "3/3" and body["status"]["enabledProtocols"] == ""
        assert body["spec"]["sources"]["opcua"][0]["nodes"][1] == {"browsePath": "1:Boiler/1:Pressure", "device": "boiler-1", "sensor": "pressure", "unit": "kPa"}
        refused = cluster.kubectl("apply", "-n", NS, "-f", "-", check=False, input=json.dumps(
            {**doc, "spec": {**doc["spec"], "sources": {"coap": [{"name": "Bad_Name", "resources": []}]}}}))
        assert refused.returncode != 0 and "spec.sources.coap[0].name" in refused.stderr
    finally:
        cluster.kubectl("delete", "sensorfleet", "plant", "-n", NS, "--wait=true", check=False)


def test_kubectl_explain_reads_well(env: dict[str, Any]) -> None:
    out = env["cluster"].kubectl("explain", "sensorfleet.spec.protocols.mqtt").stdout
    assert "MQTT devices publishing through the broker." in out
    assert "devices\t<integer>" in out and "Number of simulated devices" in out


def test_a_spec_edit_changes_only_the_affected_children(env: dict[str, Any]) -> None:
    cluster = env["cluster"]
    before = versions(children_of(cluster))
    time.sleep(1)
    patch_fleet(cluster, {"spec": {"protocols": {"mqtt": {"devices": 60}}}})
    body = wait_ready(cluster)
    assert body["status"]["devices"] == 100
    after_children = children_of(cluster)
    after = versions(after_children)
    assert set(after) == set(before)
    changed = sorted(name for key, name in ((k, k[1]) for k in before) if before[key] != after[key])
    assert changed == ["demo-fleet", "demo-mqtt-collector-0", "demo-mqtt-simulator-0"]
    fleet_yaml = yaml.safe_load(after_children[("ConfigMap", "demo-fleet")]["data"]["fleet.yaml"])
    assert fleet_yaml["spec"]["protocols"]["mqtt"]["devices"] == 60


def test_more_replicas_add_children_and_fewer_prune_them(env: dict[str, Any]) -> None:
    cluster = env["cluster"]
    patch_fleet(cluster, {"spec": {"protocols": {"coap": {"replicas": 2, "collectorReplicas": 2}}}})
    wait_ready(cluster)
    names = {k[1] for k in children_of(cluster)}
    assert {"demo-coap-simulator-1", "demo-coap-collector-1"} <= names
    patch_fleet(cluster, {"spec": {"protocols": {"coap": {"replicas": 1, "collectorReplicas": 1}}}})
    wait_ready(cluster)
    wait_for("coap replica 1 pruned", lambda: not any("coap-simulator-1" in k[1] or "coap-collector-1" in k[1]
                                                      for k in children_of(cluster)))


def test_deleted_or_edited_children_are_restored(env: dict[str, Any]) -> None:
    cluster = env["cluster"]
    old = children_of(cluster)
    cluster.kubectl("delete", "deployment", "demo-coap-collector-0", "-n", NS, "--wait=false")
    cluster.kubectl("delete", "configmap", "demo-fleet", "-n", NS, "--wait=false")
    cluster.kubectl("delete", "service", "demo-broker", "-n", NS, "--wait=false")

    def restored() -> bool:
        now = children_of(cluster)
        return all(k in now and now[k]["metadata"]["uid"] != old[k]["metadata"]["uid"] for k in (
            ("Deployment", "demo-coap-collector-0"), ("ConfigMap", "demo-fleet"), ("Service", "demo-broker")))
    wait_for("deleted children recreated", restored, 30)
    # a hand edit of a field the operator owns is reverted
    cluster.kubectl("patch", "deployment", "demo-mqtt-simulator-0", "-n", NS, "--type=json", "-p", json.dumps(
        [{"op": "replace", "path": "/spec/template/spec/containers/0/args/3", "value": "/elsewhere.yaml"}]))
    wait_for("hand edit reverted", lambda: kjson(cluster, "get", "deployment", "demo-mqtt-simulator-0", "-n", NS)[
        "spec"]["template"]["spec"]["containers"][0]["args"][3] == pod_builders.FLEET_FILE, 30)
    cluster.kubectl("patch", "configmap", "demo-fleet", "-n", NS, "--type=merge", "-p", '{"data": {"fleet.yaml": "x: 1"}}')
    wait_for("config map edit reverted", lambda: "kind: SensorFleet" in kjson(
        cluster, "get", "configmap", "demo-fleet", "-n", NS)["data"]["fleet.yaml"], 30)
    wait_ready(cluster)


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("no protocol", {"protocols": {"mqtt": {"enabled": False}}}, "at least one of mqtt, coap, opcua"),
    ("zero devices", {"protocols": {"mqtt": {"devices": 0}}}, "spec.protocols.mqtt.devices"),
    ("too many replicas", {"protocols": {"coap": {"enabled": True, "replicas": 65}}}, "spec.protocols.coap.replicas"),
    ("qos 2", {"protocols": {"mqtt": {"qos": 2}}}, "spec.protocols.mqtt.qos"),
    ("bad message mode", {"protocols": {"mqtt": {"messageMode": "batch"}}}, "spec.protocols.mqtt.messageMode"),
    ("negative interval", {"protocols": {"mqtt": {"interval": -1}}}, "spec.protocols.mqtt.interval"),
    ("wildcard topic", {"protocols": {"mqtt": {"topicPrefix": "a/#"}}}, "spec.protocols.mqtt.topicPrefix"),
    ("opcua port", {"protocols": {"opcua": {"enabled": True, "port": 70000}}}, "spec.protocols.opcua.port"),
    ("opcua security", {"protocols": {"opcua": {"security": "Basic128"}}}, "spec.protocols.opcua.security"),
    ("external without url", {"broker": {"mode": "external"}}, "spec.broker"),
    ("broker url scheme", {"broker": {"mode": "external", "url": "http://x"}}, "spec.broker.url"),
    ("url and size", {"storage": {"url": "s3://b/f", "size": "1Gi"}}, "set either url or size"),
    ("bad size", {"storage": {"size": "lots"}}, "spec.storage.size"),
    ("schedule four fields", {"forecasting": {"schedule": "0 * * *"}}, "spec.forecasting.schedule"),
    ("schedule words", {"forecasting": {"schedule": "every hour"}}, "spec.forecasting.schedule"),
    ("horizon zero", {"forecasting": {"horizon": 0}}, "spec.forecasting.horizon"),
    ("unknown model", {"forecasting": {"model": "prophet"}}, "spec.forecasting.model"),
    ("level 100", {"forecasting": {"level": 100}}, "spec.forecasting.level"),
    ("metrics port", {"monitoring": {"port": 80}}, "spec.monitoring.port"),
    ("spike probability", {"anomalies": {"spikeProbability": 0.9}}, "spec.anomalies.spikeProbability"),
    ("sensor min above max", {"sensors": [{"name": "t", "unit": "C", "baseline": 5, "min": 10, "max": 0}]}, "min must be below max"),
    ("baseline outside", {"sensors": [{"name": "t", "unit": "C", "baseline": 50, "min": 0, "max": 10}]}, "baseline must lie within"),
    ("duplicate sensors", {"sensors": [{"name": "t", "unit": "C", "baseline": 1, "min": 0, "max": 10},
                                       {"name": "t", "unit": "C", "baseline": 1, "min": 0, "max": 10}]}, "spec.sensors[1]"),
    ("sensor name", {"sensors": [{"name": "Temp!", "unit": "C", "baseline": 1, "min": 0, "max": 10}]}, "spec.sensors[0].name"),
    ("no sensors", {"sensors": []}, "spec.sensors"),
    ("unknown field", {"protocols": {"mqtt": {"devicez": 3}}}, "devicez"),
    ("seed negative", {"seed": -1}, "spec.seed"),
    # TLS on the operator's broker is not built: refused, never silently ignored.
    ("broker TLS in the cluster", {"broker": {"tls": {"enabled": True}}}, "spec.broker.tls.enabled"),
    ("broker TLS Secret in the cluster", {"broker": {"tls": {"secret": "certs"}}}, "spec.broker.tls.secret"),
    ("shards on object storage", {"storage": {"url": "s3://bucket/x"}, "forecasting": {"parallelism": 2}}, "spec.forecasting.parallelism"),
]


def test_invalid_fleets_are_refused_by_the_api_server_naming_the_field(env: dict[str, Any]) -> None:
    cluster = env["cluster"]
    assert len(INVALID) >= 20
    for case, spec, field in INVALID:
        manifest = {"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet",
                    "metadata": {"name": "bad", "namespace": NS}, "spec": spec}
        result = cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=False)
        assert result.returncode != 0, f"{case}: accepted by the API server"
        assert field in result.stderr, f"{case}: {field!r} not named in: {result.stderr}"
    long_name = {"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet",
                 "metadata": {"name": "a" * 41, "namespace": NS}, "spec": {}}
    result = cluster.kubectl("apply", "-f", "-", input=json.dumps(long_name), check=False)
    assert result.returncode != 0 and "metadata.name" in result.stderr
    assert cluster.kubectl("get", "sensorfleet", "bad", "-n", NS, check=False).returncode != 0


def test_a_failing_child_sets_degraded_and_emits_a_warning(env: dict[str, Any]) -> None:
    cluster = env["cluster"]
    manifest = {"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet",
                "metadata": {"name": "watched", "namespace": NS},
                # a PodMonitor needs the Prometheus Operator's CRD, which this cluster lacks
                "spec": {"monitoring": {"podMonitor": True}, "storage": {"url": "memory://watched"},
                         "forecasting": {"enabled": False}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def degraded() -> dict[str, Any] | None:
        c = condition(fleet_body(cluster, "watched"), "Degraded")
        return c if c.get("status") == "True" else None
    c = wait_for("Degraded", degraded, 30)
    assert c["reason"] == "ApplyFailed" and "PodMonitor" in c["message"]
    assert condition(fleet_body(cluster, "watched"), "Ready")["status"] == "False"
    events = wait_for("warning event", lambda: kjson(cluster, "get", "events", "-n", NS, "--field-selector",
                                                     "involvedObject.name=watched,type=Warning")["items"], 20)
    assert events[0]["reason"] == "ApplyFailed"
    # the rest of the fleet is still applied
    assert ("Deployment", "watched-mqtt-simulator-0") in children_of(cluster, "watched")
    patch_fleet(cluster, {"spec": {"monitoring": {"podMonitor": False}}}, name="watched")
    wait_ready(cluster, "watched")
    cluster.kubectl("delete", "sensorfleet", "watched", "-n", NS)


def test_operator_restart_makes_no_duplicates_and_no_churn(env: dict[str, Any]) -> None:
    cluster = env["cluster"]
    wait_ready(cluster)
    before = children_of(cluster)
    fleet_rv = fleet_body(cluster)["metadata"]["resourceVersion"]
    assert env["operator"].stop() == 0
    env["operator"] = deploy.start_operator(cluster, env["state"])
    env["operator"].wait_leading()
    wait_for("the restarted operator reconciled the fleet", lambda: 'kind="full",result="success"' in env["operator"].get("/metrics")[1], 30)
    time.sleep(3)
    after = children_of(cluster)
    assert {k: v["metadata"]["uid"] for k, v in after.items()} == {k: v["metadata"]["uid"] for k, v in before.items()}
    assert versions(after) == versions(before)
    assert fleet_body(cluster)["metadata"]["resourceVersion"] == fleet_rv  # not even a status write
    deployments = kjson(cluster, "get", "deployments", "-n", NS, "-l", f"sensorfleet.io/fleet={FLEET}")["items"]
    assert len(deployments) == len({d["metadata"]["name"] for d in deployments}) == 7


def test_a_second_replica_stands_by(env: dict[str, Any]) -> None:
    cluster = env["cluster"]
    standby = deploy.start_operator(cluster, env["state"])
    try:
        def answering() -> bool:
            try:
                return standby.get("/metrics")[0] == 200
            except OSError:
                return False
        wait_for("standby serving metrics", answering, 30)
        time.sleep(2)
        text = standby.get("/metrics")[1]
        assert "sensorfleet_operator_leader 0.0" in text
        assert 'sensorfleet_operator_reconciles_total{' not in text
        assert standby.get("/healthz")[0] == 200 and standby.get("/readyz")[0] == 200
        lease = kjson(cluster, "get", "lease", "sensorfleet-operator", "-n", deploy.NAMESPACE)
        assert lease["spec"]["holderIdentity"].endswith(str(env["operator"].pid))
    finally:
        standby.stop()


def test_operator_serves_metrics_and_liveness(env: dict[str, Any]) -> None:
    operator = env["operator"]
    assert operator.get("/healthz") == (200, "ok\n")
    text = operator.get("/metrics")[1]
    for needle in ('sensorfleet_operator_reconciles_total{kind="full",result="success"}',
                   "sensorfleet_operator_reconcile_duration_seconds_bucket",
                   "sensorfleet_operator_reconcile_errors_total",
                   'sensorfleet_operator_fleets{condition="Ready",status="True"} 1.0',
                   "sensorfleet_operator_leader 1.0"):
        assert needle in text, needle


def test_a_finished_forecast_job_shows_as_the_last_forecast(env: dict[str, Any]) -> None:
    # The status follows the Jobs the operator watches (no listing per pass): a Job started from the
    # fleet's CronJob completes on kwok and becomes `.status.lastForecast`.
    cluster = env["cluster"]
    cluster.kubectl("create", "job", "forecast-by-hand", "-n", NS, f"--from=cronjob/{child_meta.forecast_name(FLEET)}")
    try:
        forecast = wait_for("lastForecast of the finished Job", lambda: fleet_body(cluster).get("status", {}).get(
            "lastForecast", {}).get("job") == "forecast-by-hand" and fleet_body(cluster)["status"]["lastForecast"], 60)
        assert forecast["result"] == "Succeeded" and forecast["time"]
    finally:
        cluster.kubectl("delete", "job", "forecast-by-hand", "-n", NS, "--wait=false", check=False)


def test_deleting_the_fleet_removes_everything(env: dict[str, Any]) -> None:
    cluster = env["cluster"]
    assert children_of(cluster)
    cluster.kubectl("delete", "sensorfleet", FLEET, "-n", NS, "--wait=true")
    # By default the data claim outlives its fleet (claimRetention.whenDeleted: Retain, like a
    # StatefulSet's claims): everything else is garbage-collected, the claim stays and says why.
    retained = {("PersistentVolumeClaim", f"{FLEET}-data")}
    wait_for("every child but the data claim garbage-collected", lambda: set(children_of(cluster)) == retained, 60)
    claim = children_of(cluster)[("PersistentVolumeClaim", f"{FLEET}-data")]
    assert claim["metadata"]["labels"]["sensorfleet.io/on-fleet-delete"] == "Retain"
    assert not claim["metadata"].get("ownerReferences")
    cluster.kubectl("delete", "pvc", f"{FLEET}-data", "-n", NS, "--wait=false")
    wait_for("every pod gone", lambda: not kjson(cluster, "get", "pods", "-n", NS, "-l", f"sensorfleet.io/fleet={FLEET}")["items"], 60)
