"""The data claim on a real control plane (kwok nodes, the real scheduler): every pod that mounts
a ReadWriteOnce claim lands on one node; deleting the fleet keeps the claim (and says so); a fleet
of the same name uses it again; switching to storage.url deletes nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import devcluster
from sensorfleet.operator import child_meta

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
NS = "sf-claims"
FLEET = "vault"


LAST_STATUS: dict[str, Any] = {}  # the fleet's last status seen, for a failure message


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if last := check():
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}; fleet status: {LAST_STATUS.get('status')}")


def kjson(cluster: devcluster.Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def static_volume(name: str, mode: str, fleet: str = FLEET) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
                       "spec": {"capacity": {"storage": "1Gi"}, "accessModes": [mode], "hostPath": {"path": f"/tmp/{name}"},
                                "persistentVolumeReclaimPolicy": "Retain",
                                "claimRef": {"namespace": NS, "name": child_meta.data_claim_name(fleet)}}})


def fleet_manifest(name: str = FLEET, **storage: Any) -> str:
    doc = yaml.safe_load((REPO / "examples" / "fleet.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NS}
    doc["spec"]["protocols"]["opcua"]["enabled"] = False  # mqtt + coap: two collectors
    doc["spec"]["protocols"]["mqtt"]["devices"] = 5
    doc["spec"]["protocols"]["coap"]["devices"] = 5
    doc["spec"]["storage"] = {"size": "1Gi", **storage}
    return yaml.safe_dump(doc)


def claim(cluster: devcluster.Cluster, name: str = FLEET) -> dict[str, Any] | None:
    got = cluster.kubectl("get", "pvc", child_meta.data_claim_name(name), "-n", NS, "-o", "json", check=False)
    return json.loads(got.stdout) if got.returncode == 0 else None


def ready(cluster: devcluster.Cluster, name: str = FLEET) -> dict[str, Any] | None:
    got = cluster.kubectl("get", "sensorfleet", name, "-n", NS, "-o", "json", check=False)
    if got.returncode:
        return None
    body = json.loads(got.stdout)
    LAST_STATUS["status"] = body.get("status")
    ok = condition(body, "Ready")
    return body if ok.get("status") == "True" and ok.get("observedGeneration") == body["metadata"]["generation"] else None


@pytest.fixture(scope="module")
def cluster(deployed: dict[str, Any]) -> devcluster.Cluster:
    cluster = deployed["cluster"]
    cluster.kubectl("create", "namespace", NS, check=False)
    # A static hostPath volume with no node affinity: nothing but the pods' affinity keeps them together.
    cluster.kubectl("apply", "-f", "-", input=static_volume("sf-claims-rwo", "ReadWriteOnce"))
    return cluster


def test_readwriteonce_claim_users_share_one_node_and_the_claim_outlives_the_fleet(cluster: devcluster.Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=fleet_manifest())
    body = wait_for("fleet Ready", lambda: ready(cluster), timeout=120)
    assert body["status"]["dataClaim"] == {"name": child_meta.data_claim_name(FLEET), "onFleetDelete": "Retain"}
    # The forecast job's pod mounts the claim too: run one now rather than waiting for its schedule.
    cluster.kubectl("create", "job", "vault-forecast-now", "--from", f"cronjob/{child_meta.forecast_name(FLEET)}", "-n", NS)
    cluster.kubectl("create", "job", "vault-compact-now", "--from", f"cronjob/{child_meta.compaction_name(FLEET)}", "-n", NS)
    selector = f"{child_meta.DATA_CLAIM_LABEL}={child_meta.data_claim_name(FLEET)}"

    def scheduled() -> list[dict[str, Any]] | None:
        pods = kjson(cluster, "get", "pods", "-n", NS, "-l", selector)["items"]
        return pods if len(pods) == 4 and all(p["spec"].get("nodeName") for p in pods) else None

    pods = wait_for("2 collectors + forecast + compaction pods scheduled", scheduled, timeout=120)
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(nodes) == 1, {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods}
    assert len(kjson(cluster, "get", "nodes")["items"]) >= 2, "the test needs several nodes to mean anything"
    cluster.kubectl("delete", "job", "vault-forecast-now", "vault-compact-now", "-n", NS, "--wait=false")

    live = claim(cluster)
    assert live and "ownerReferences" not in live["metadata"]
    assert live["metadata"]["labels"][child_meta.CLAIM_RETENTION_LABEL] == "Retain"
    uid = live["metadata"]["uid"]

    # Deleting the fleet: the claim stays, and an Event says so.
    cluster.kubectl("delete", "sensorfleet", FLEET, "-n", NS)
    wait_for("the collectors gone", lambda: not kjson(cluster, "get", "deployments", "-n", NS, "-l", f"sensorfleet.io/fleet={FLEET}")["items"], timeout=120)
    kept = claim(cluster)
    assert kept and kept["metadata"]["uid"] == uid and not kept["metadata"].get("deletionTimestamp")
    events = wait_for("a DataClaimRetained event", lambda: kjson(
        cluster, "get", "events", "-n", NS, "--field-selector", f"involvedObject.name={FLEET},reason=DataClaimRetained")["items"], timeout=60)
    assert child_meta.data_claim_name(FLEET) in events[0]["message"]


def test_claim_with_when_deleted_delete_goes_with_the_fleet(cluster: devcluster.Cluster) -> None:
    name = "ledger"  # another fleet: re-creating one of the same name at once is not what this tests
    cluster.kubectl("apply", "-f", "-", input=static_volume("sf-claims-rwx", "ReadWriteMany", fleet=name))
    cluster.kubectl("apply", "-f", "-", input=fleet_manifest(name, claimRetention={"whenDeleted": "Delete"}, accessModes=["ReadWriteMany"]))
    wait_for("fleet Ready", lambda: ready(cluster, name), timeout=120)
    live = claim(cluster, name)
    assert live["spec"]["accessModes"] == ["ReadWriteMany"]
    assert live["metadata"]["ownerReferences"][0]["kind"] == "SensorFleet"
    # Switching to object storage never deletes the data, even for an owned claim: it is never pruned.
    cluster.kubectl("apply", "-f", "-", input=fleet_manifest(name, claimRetention={"whenDeleted": "Delete"}).replace("size: 1Gi", "url: s3://vault/fleet"))
    wait_for("fleet Ready on s3", lambda: (lambda b: b if b and b["status"].get("dataset") == "s3://vault/fleet" else None)(ready(cluster, name)), timeout=120)
    assert claim(cluster, name)["metadata"]["uid"] == live["metadata"]["uid"]
    cluster.kubectl("delete", "sensorfleet", name, "-n", NS)
    wait_for("the claim garbage-collected with the fleet",
             lambda: (found := claim(cluster, name)) is None or found["metadata"].get("deletionTimestamp"), timeout=120)
