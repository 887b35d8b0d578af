"""The user's path with real containers on sf-node-0: `helm install` runs the operator as a pod from
the image (identity and hardening enforced by the runtime); `kubectl apply -f examples/fleet.yaml`
(unchanged) becomes Ready with every pod on the real node; readings land on the claim (bound by the
default StorageClass) with no gap and no duplicate.

It sits in tests/cluster so that it runs before tests/operator, whose session-wide operator (a
local process, cluster-wide) would otherwise reconcile these fleets too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import devcluster
from devcluster import deploy
from sensorfleet.dataset import read_dataset

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
FLEET = "demo"  # examples/fleet.yaml's name
READY_TIMEOUT = 600  # image import, a first start of Python in every pod, on a loaded 2-core machine


def fleet_ready(cluster: devcluster.Cluster, namespace: str) -> dict[str, Any] | None:
    body = cluster.kubectl_json("get", "sensorfleet", FLEET, "-n", namespace)
    conditions = body.get("status", {}).get("conditions", [])
    return body if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else None


def diagnosis(cluster: devcluster.Cluster, namespace: str) -> str:
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
    events = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
    status = cluster.kubectl("get", "sensorfleet", FLEET, "-n", namespace, "-o", "jsonpath={.status}", check=False).stdout
    return f"status: {status}\npods:\n{pods}\nevents:\n{events[-4000:]}"


@pytest.fixture(scope="module")
def real(k8s_cluster: devcluster.Cluster) -> Iterator[dict[str, Any]]:
    if not k8s_cluster.owned or k8s_cluster.node is None:
        pytest.skip("needs the local harness's real node (SENSORFLEET_USE_KUBECONFIG points elsewhere)")
    suffix = uuid.uuid4().hex[:5]
    system, fleets, release = f"sf-real-system-{suffix}", f"sf-real-{suffix}", f"sf-real-{suffix}"
    deploy.load_images_into_node(k8s_cluster)
    devcluster.real_pods_namespace(k8s_cluster, fleets)
    operator = deploy.install_operator_pod(k8s_cluster, namespace=system, release=release,
                                           extra=["--set", f"watchNamespaces={{{fleets}}}"])
    try:
        yield {"cluster": k8s_cluster, "system": system, "fleets": fleets, "release": release, "operator": operator}
    finally:
        k8s_cluster.kubectl("delete", "namespace", fleets, "--wait=true", "--timeout=120s", check=False, timeout=180)
        k8s_cluster.helm("uninstall", release, "--namespace", system, check=False)
        k8s_cluster.kubectl("delete", "namespace", system, "--wait=false", check=False)


def test_the_operator_runs_as_a_pod_with_the_charts_identity_and_hardening(real: dict[str, Any]) -> None:
    cluster, system, pod = real["cluster"], real["system"], real["operator"]
    assert pod["spec"]["nodeName"] == devcluster.NODE_NAME
    assert pod["spec"]["serviceAccountName"] == f"{real['release']}-sensorfleet-operator"  # the chart's own
    name = pod["metadata"]["name"]
    # enforced by the runtime, not only written in the manifest
    assert cluster.kubectl("exec", "-n", system, name, "--", "id", "-u").stdout.strip() == "10001"
    write = cluster.kubectl("exec", "-n", system, name, "--", "sh", "-c", "touch /opt/x", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr + write.stdout
    log = cluster.kubectl("logs", "-n", system, name).stdout
    assert log, "the operator pod logs"


def test_the_example_fleet_unchanged_becomes_ready_and_stores_readings_without_gaps(real: dict[str, Any]) -> None:
    cluster, fleets = real["cluster"], real["fleets"]
    cluster.kubectl("apply", "-n", fleets, "-f", str(REPO / "examples" / "fleet.yaml"))
    try:
        devcluster.wait_for(lambda: fleet_ready(cluster, fleets), timeout=READY_TIMEOUT, interval=3,
                            what="the example fleet to be Ready")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{diagnosis(cluster, fleets)}") from None
    pods = cluster.kubectl_json("get", "pods", "-n", fleets)["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    assert running and all(p["spec"]["nodeName"] == devcluster.NODE_NAME for p in running)
    (readings,) = devcluster.wait_for(lambda: _readings(cluster, fleets, minimum=200), timeout=300, interval=5,
                                      what="readings on the claim")
    assert_no_gaps_or_duplicates(readings)


def _claim_folder(cluster: devcluster.Cluster, namespace: str) -> Path:
    claims = cluster.kubectl_json("get", "pvc", "-n", namespace)["items"]
    (claim,) = [c for c in claims if c["metadata"]["name"].startswith(FLEET)]
    assert claim["status"]["phase"] == "Bound"
    assert claim["spec"]["storageClassName"] == devcluster.STORAGE_CLASS
    volume = cluster.kubectl_json("get", "pv", claim["spec"]["volumeName"])
    return Path((volume["spec"].get("hostPath") or volume["spec"]["local"])["path"])


def _readings(cluster: devcluster.Cluster, namespace: str, minimum: int) -> tuple[Any] | None:
    """(frame,) once the claim holds `minimum` readings (a tuple: a DataFrame has no truth value)."""
    frame = read_dataset(str(_claim_folder(cluster, namespace)))
    return (frame,) if len(frame) >= minimum else None


def assert_no_gaps_or_duplicates(frame: Any) -> None:
    for (protocol, device, sensor), group in frame.groupby(["protocol", "device", "sensor"]):
        seq = group["seq"].astype(int).sort_values()
        assert seq.is_unique, f"duplicates in {protocol}/{device}/{sensor}"
        missing = int(seq.iloc[-1] - seq.iloc[0] + 1 - len(seq))
        assert missing == 0, f"{missing} readings missing in {protocol}/{device}/{sensor}"
