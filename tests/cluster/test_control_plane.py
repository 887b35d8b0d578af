"""The local control plane is a real Kubernetes: validation, controllers, scheduling, GC, helm.

Every test works in its own namespace and asserts what a user of the cluster would see. The same
tests run against kind (SENSORFLEET_USE_KUBECONFIG=1, KUBECONFIG=...); see docs/kubernetes-testing.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

import devcluster
from devcluster import Cluster, CommandError, wait_for

pytestmark = pytest.mark.cluster

CHART = Path(__file__).parent / "testdata" / "hello-chart"
# kwok never pulls images; on kind these are real, small, and do what the test needs.
LONG_RUNNING_IMAGE = "registry.k8s.io/pause:3.10"
EXITING_IMAGE = "busybox:1.36"


@pytest.fixture
def namespace(k8s_cluster: Cluster) -> Any:
    name = f"t-{uuid.uuid4().hex[:8]}"
    k8s_cluster.kubectl("create", "namespace", name)
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def apply(cluster: Cluster, manifest: dict[str, Any], namespace: str | None = None) -> None:
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    cluster.kubectl(*args, input=json.dumps(manifest))


def condition(obj: dict[str, Any], kind: str) -> str | None:
    for c in obj.get("status", {}).get("conditions", []) or []:
        if c["type"] == kind:
            return str(c["status"])
    return None


def deployment(name: str, replicas: int = 1) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "main", "image": LONG_RUNNING_IMAGE}]},
            },
        },
    }


def test_kubectl_get_nodes_with_the_written_kubeconfig(k8s_cluster: Cluster) -> None:
    kubectl = devcluster.kubectl_binary()
    assert Path(kubectl).resolve() != Path("/usr/bin/kubectl").resolve()
    env = {**os.environ, "KUBECONFIG": str(k8s_cluster.kubeconfig)}

    table = subprocess.run([str(kubectl), "get", "nodes"], env=env, capture_output=True, text=True, check=True)
    nodes = json.loads(
        subprocess.run([str(kubectl), "get", "nodes", "-o", "json"], env=env,
                       capture_output=True, text=True, check=True).stdout
    )["items"]
    ready = [n["metadata"]["name"] for n in nodes if condition(n, "Ready") == "True"]
    assert ready, table.stdout
    assert all(name in table.stdout for name in ready)

    version = json.loads(
        subprocess.run([str(kubectl), "version", "-o", "json"], env=env,
                       capture_output=True, text=True, check=True).stdout
    )
    assert version["clientVersion"]["gitVersion"].startswith("v1.37.")
    if k8s_cluster.owned:
        assert sorted(ready) == sorted([devcluster.NODE_NAME, *(f"kwok-node-{i}" for i in range(devcluster.NODE_COUNT))])
        # the version ldflags reached the binaries: the server reports the pinned release
        assert version["serverVersion"]["gitVersion"] == devcluster.pinned_versions()["K8S_VERSION"]


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.sensorfleet.io"},
    "spec": {
        "group": "test.sensorfleet.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["minReplicas", "maxReplicas"],
                                "properties": {
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.minReplicas <= self.maxReplicas",
                                        "message": "must not exceed maxReplicas",
                                        "fieldPath": ".minReplicas",
                                    }
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str, min_replicas: int, max_replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "test.sensorfleet.io/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"minReplicas": min_replicas, "maxReplicas": max_replicas},
    }


def test_crd_schema_and_cel_rule_refuse_invalid_objects(k8s_cluster: Cluster, namespace: str) -> None:
    apply(k8s_cluster, CRD)
    wait_for(lambda: condition(k8s_cluster.kubectl_json("get", "crd", CRD["metadata"]["name"]),
                               "Established") == "True", timeout=60, what="the Widget CRD to be Established")

    apply(k8s_cluster, widget("good", 1, 3), namespace)
    stored = k8s_cluster.kubectl_json("get", "widget", "good", "-n", namespace)
    assert stored["spec"] == {"minReplicas": 1, "maxReplicas": 3}

    with pytest.raises(CommandError) as cel:
        apply(k8s_cluster, widget("inverted", 5, 2), namespace)
    assert "spec.minReplicas" in cel.value.stderr
    assert "must not exceed maxReplicas" in cel.value.stderr

    with pytest.raises(CommandError) as schema:
        apply(k8s_cluster, widget("negative", -1, 2), namespace)
    assert "spec.minReplicas" in schema.value.stderr
    assert "greater than or equal to 0" in schema.value.stderr

    names = [w["metadata"]["name"] for w in k8s_cluster.kubectl_json("get", "widgets", "-n", namespace)["items"]]
    assert names == ["good"]


def test_deployment_becomes_available_with_pods_running_on_nodes(k8s_cluster: Cluster, namespace: str) -> None:
    apply(k8s_cluster, deployment("web", replicas=2), namespace)

    def available() -> dict[str, Any] | None:
        d = k8s_cluster.kubectl_json("get", "deployment", "web", "-n", namespace)
        ok = condition(d, "Available") == "True" and d["status"].get("availableReplicas") == 2
        return d if ok else None

    wait_for(available, timeout=90, what="deployment web to be Available with 2 replicas")
    pods = k8s_cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "app=web")["items"]
    assert len(pods) == 2
    node_names = {n["metadata"]["name"] for n in k8s_cluster.kubectl_json("get", "nodes")["items"]}
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert condition(pod, "Ready") == "True"
        assert pod["spec"]["nodeName"] in node_names  # bound by kube-scheduler
        assert pod["status"].get("podIP")
        if k8s_cluster.owned:
            assert pod["spec"]["nodeName"].startswith("kwok-node-")


def test_deleting_the_owner_garbage_collects_an_owned_configmap(k8s_cluster: Cluster, namespace: str) -> None:
    apply(k8s_cluster, deployment("owner"), namespace)
    owner = k8s_cluster.kubectl_json("get", "deployment", "owner", "-n", namespace)
    apply(k8s_cluster, {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "owned",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "owner",
                                 "uid": owner["metadata"]["uid"]}],
        },
        "data": {"k": "v"},
    }, namespace)
    wait_for(lambda: k8s_cluster.kubectl_json("get", "replicasets", "-n", namespace)["items"],
             timeout=60, what="the Deployment's ReplicaSet")
    assert k8s_cluster.kubectl_json("get", "configmap", "owned", "-n", namespace)["data"] == {"k": "v"}

    k8s_cluster.kubectl("delete", "deployment", "owner", "-n", namespace, "--wait=true")

    def gone() -> bool:
        result = k8s_cluster.kubectl("get", "configmap", "owned", "-n", namespace, check=False)
        return result.returncode != 0 and "NotFound" in result.stderr

    wait_for(gone, timeout=60, what="the garbage collector to delete ConfigMap owned")
    wait_for(lambda: not k8s_cluster.kubectl_json("get", "replicasets", "-n", namespace)["items"],
             timeout=60, what="the garbage collector to delete the ReplicaSet")


@pytest.mark.timeout(300)
def test_cronjob_creates_a_job_that_completes(k8s_cluster: Cluster, namespace: str) -> None:
    apply(k8s_cluster, {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "tick"},
        "spec": {
            "schedule": "* * * * *",
            "concurrencyPolicy": "Forbid",
            "jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "tick", "image": EXITING_IMAGE, "command": ["sh", "-c", "echo tick"]}],
            }}}},
        },
    }, namespace)

    def scheduled_job() -> dict[str, Any] | None:
        for job in k8s_cluster.kubectl_json("get", "jobs", "-n", namespace)["items"]:
            owners = job["metadata"].get("ownerReferences", [])
            if any(o["kind"] == "CronJob" and o["name"] == "tick" for o in owners):
                return job  # type: ignore[no-any-return]
        return None

    # the schedule fires on the next minute boundary: at most ~60 s plus the controller's sync
    job = wait_for(scheduled_job, timeout=150, what="the CronJob to create a Job")
    name = job["metadata"]["name"]
    wait_for(lambda: condition(k8s_cluster.kubectl_json("get", "job", name, "-n", namespace), "Complete") == "True",
             timeout=120, what=f"Job {name} to complete")
    done = k8s_cluster.kubectl_json("get", "job", name, "-n", namespace)
    assert done["status"]["succeeded"] == 1
    pods = k8s_cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"job-name={name}")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Succeeded"]
    wait_for(lambda: k8s_cluster.kubectl_json("get", "cronjob", "tick", "-n", namespace)["status"]
             .get("lastSuccessfulTime"), timeout=60, what="the CronJob to record lastSuccessfulTime")


def test_helm_install_upgrade_uninstall(k8s_cluster: Cluster, namespace: str) -> None:
    helm = ("-n", namespace)
    k8s_cluster.helm("install", "hello", str(CHART), *helm, "--wait", "--timeout", "2m")
    greeting = k8s_cluster.kubectl_json("get", "configmap", "hello-greeting", "-n", namespace)["data"]
    assert greeting["greeting"] == "hello"
    # helm asked the API server for its version, so this is the cluster's, not helm's built-in default
    server = k8s_cluster.kubectl_json("version")["serverVersion"]["gitVersion"]
    assert greeting["kubeVersion"] == server

    k8s_cluster.helm("upgrade", "hello", str(CHART), *helm, "--set", "greeting=bye", "--wait", "--timeout", "2m")
    assert k8s_cluster.kubectl_json("get", "configmap", "hello-greeting", "-n", namespace)["data"]["greeting"] == "bye"
    status = json.loads(k8s_cluster.helm("status", "hello", *helm, "-o", "json").stdout)
    assert status["version"] == 2
    assert status["info"]["status"] == "deployed"
    d = k8s_cluster.kubectl_json("get", "deployment", "hello-hello", "-n", namespace)
    assert d["status"].get("updatedReplicas") == 1 and condition(d, "Available") == "True"

    k8s_cluster.helm("uninstall", "hello", *helm, "--wait")
    assert json.loads(k8s_cluster.helm("list", *helm, "-o", "json").stdout) == []
    missing = k8s_cluster.kubectl("get", "configmap", "hello-greeting", "-n", namespace, check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


def test_service_account_kubeconfig_authenticates_and_rbac_applies(
    k8s_cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    path = devcluster.service_account_kubeconfig(k8s_cluster, namespace, "operator", tmp_path / "sa.kubeconfig")
    as_sa = Cluster.external(path)

    whoami = as_sa.kubectl_json("auth", "whoami")
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:operator"

    denied = as_sa.kubectl("get", "configmaps", "-n", namespace, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    k8s_cluster.kubectl("create", "role", "read-configmaps", "-n", namespace,
                        "--verb=get,list", "--resource=configmaps")
    k8s_cluster.kubectl("create", "rolebinding", "operator-reads", "-n", namespace,
                        "--role=read-configmaps", f"--serviceaccount={namespace}:operator")
    listed = wait_for(lambda: as_sa.kubectl("get", "configmaps", "-n", namespace, "-o", "json"),
                      timeout=30, what="the RoleBinding to take effect")
    names = {c["metadata"]["name"] for c in json.loads(listed.stdout)["items"]}
    assert "kube-root-ca.crt" in names  # published by the controller-manager's root-CA controller
