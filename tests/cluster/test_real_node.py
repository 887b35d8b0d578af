"""The real node sf-node-0 of the dev cluster: real containers, cluster DNS, Services, the API server
from a pod, logs/exec/port-forward, dynamic volumes, and placement apart from kwok's fake nodes.

Pods here use the busybox image the node is given at start (no registry anywhere).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

import devcluster
from devcluster import node_config

pytestmark = pytest.mark.cluster

BUSYBOX = "sensorfleet.local/busybox:static"


def _owned(cluster: devcluster.Cluster) -> None:
    if not cluster.owned or cluster.node is None:
        pytest.skip("needs the local harness's real node (SENSORFLEET_USE_KUBECONFIG points elsewhere)")


@pytest.fixture(scope="module")
def real_ns(k8s_cluster: devcluster.Cluster) -> str:
    _owned(k8s_cluster)
    name = f"real-{uuid.uuid4().hex[:6]}"
    devcluster.real_pods_namespace(k8s_cluster, name)
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def pod(name: str, command: str, **extra: Any) -> dict[str, Any]:
    """A busybox pod with no toleration and no node selector of its own."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"restartPolicy": extra.pop("restartPolicy", "Never"), "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": BUSYBOX, "imagePullPolicy": "Never",
                                     "command": ["sh", "-c", command], **extra}]}}


def apply(cluster: devcluster.Cluster, namespace: str, *manifests: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifests)}))


def wait_phase(cluster: devcluster.Cluster, namespace: str, name: str, phases: tuple[str, ...],
               timeout: float = 120) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = cluster.kubectl_json("get", "pod", name, "-n", namespace)
        return body if body.get("status", {}).get("phase") in phases else None

    try:
        return devcluster.wait_for(done, timeout=timeout, what=f"pod {namespace}/{name} to be {'/'.join(phases)}")
    except TimeoutError:
        described = cluster.kubectl("describe", "pod", name, "-n", namespace, check=False).stdout
        raise AssertionError(f"pod {name} never reached {phases}:\n{described[-3000:]}") from None


def wait_ready(cluster: devcluster.Cluster, namespace: str, name: str, timeout: float = 120) -> None:
    cluster.kubectl("wait", "-n", namespace, f"pod/{name}", "--for=condition=Ready", f"--timeout={timeout:.0f}s",
                    timeout=timeout + 30)


def test_the_real_node_is_ready_tainted_and_labelled_apart_from_kwok(k8s_cluster: devcluster.Cluster) -> None:
    _owned(k8s_cluster)
    nodes = {n["metadata"]["name"]: n for n in k8s_cluster.kubectl_json("get", "nodes")["items"]}
    real = nodes[devcluster.NODE_NAME]
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in real["status"]["conditions"])
    assert real["metadata"]["labels"][node_config.REAL_NODE_LABEL] == "real"
    assert {"key": node_config.REAL_NODE_TAINT_KEY, "value": "true", "effect": "NoSchedule"} in real["spec"]["taints"]
    assert real["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.")
    assert real["status"]["nodeInfo"]["kubeletVersion"] == devcluster.pinned_versions()["K8S_VERSION"]
    kwok = [n for name, n in nodes.items() if name.startswith("kwok-node-")]
    assert len(kwok) == devcluster.NODE_COUNT
    assert all(n["metadata"]["labels"][node_config.REAL_NODE_LABEL] == "kwok" for n in kwok)
    assert all(node_config.KWOK_NODE_TAINT in n["spec"]["taints"] for n in kwok)


def test_pods_go_to_the_real_node_only_from_real_pod_namespaces(k8s_cluster: devcluster.Cluster, real_ns: str) -> None:
    plain = f"plain-{uuid.uuid4().hex[:6]}"
    k8s_cluster.kubectl("create", "namespace", plain)
    try:
        fake = pod("fake", "sleep 3600")
        fake["spec"]["containers"][0]["image"] = "registry.k8s.io/pause:3.10"  # kwok never pulls it
        apply(k8s_cluster, plain, fake)
        apply(k8s_cluster, real_ns, pod("placed", "sleep 3600"))
        assert wait_phase(k8s_cluster, plain, "fake", ("Running",))["spec"]["nodeName"].startswith("kwok-node-")
        placed = wait_phase(k8s_cluster, real_ns, "placed", ("Running",))
        assert placed["spec"]["nodeName"] == devcluster.NODE_NAME
        assert placed["status"]["podIP"].startswith("10.88.0.")
        # The kwok nodes are tainted: a pod of a plain namespace tolerates them by the API server's
        # default, a real pod does not, so even a pod that asks for every node but the real one
        # (a nodeSelector PodNodeSelector lets through) finds none and stays Pending.
        fake_live = k8s_cluster.kubectl_json("get", "pod", "fake", "-n", plain)
        assert node_config.KWOK_NODE_TOLERATION in fake_live["spec"]["tolerations"]
        assert node_config.KWOK_NODE_TOLERATION not in placed["spec"].get("tolerations", [])
        real_ns_annotations = k8s_cluster.kubectl_json("get", "namespace", real_ns)["metadata"]["annotations"]
        bare = f"bare-{uuid.uuid4().hex[:6]}"  # a real-pod namespace's toleration, but no node selector
        k8s_cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": bare, "annotations": {node_config.DEFAULT_TOLERATIONS_ANNOTATION: real_ns_annotations[node_config.DEFAULT_TOLERATIONS_ANNOTATION]}}}))
        try:
            off_real = pod("off-real", "sleep 3600")
            off_real["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": node_config.REAL_NODE_LABEL, "operator": "NotIn", "values": ["real"]}]}]}}}
            apply(k8s_cluster, bare, off_real)

            def unschedulable() -> dict[str, Any] | None:
                live = k8s_cluster.kubectl_json("get", "pod", "off-real", "-n", bare)
                scheduled = next((c for c in live["status"].get("conditions", []) if c["type"] == "PodScheduled"), {})
                return live if scheduled.get("reason") == "Unschedulable" else None
            stuck = devcluster.wait_for(unschedulable, timeout=60, what="the pod Unschedulable")
            assert not stuck["spec"].get("nodeName") and "untolerated taint" in json.dumps(stuck["status"]["conditions"])
        finally:
            k8s_cluster.kubectl("delete", "namespace", bare, "--wait=false", check=False)
    finally:
        k8s_cluster.kubectl("delete", "namespace", plain, "--wait=false", check=False)


def test_logs_exec_and_port_forward_reach_a_real_container(k8s_cluster: devcluster.Cluster, real_ns: str) -> None:
    apply(k8s_cluster, real_ns, pod("web", "echo started-$(hostname); mkdir -p /www; echo hello-from-pod > /www/index.html;"
                                           " exec httpd -f -p 8080 -h /www"))
    wait_phase(k8s_cluster, real_ns, "web", ("Running",))
    assert devcluster.wait_for(lambda: "started-web" in k8s_cluster.kubectl("logs", "-n", real_ns, "web").stdout,
                               timeout=30, what="the pod's log line")
    assert k8s_cluster.kubectl("exec", "-n", real_ns, "web", "--", "cat", "/www/index.html").stdout == "hello-from-pod\n"
    port = devcluster.free_ports(1)[0]
    forward = subprocess.Popen([str(devcluster.kubectl_binary()), "port-forward", "-n", real_ns, "pod/web",
                                f"{port}:8080", "--address=127.0.0.1"], env=k8s_cluster.env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def fetch() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as response:
                return response.read().decode()

        assert devcluster.wait_for(fetch, timeout=60, what="the page through port-forward") == "hello-from-pod\n"
    finally:
        forward.terminate()
        forward.wait(10)


def test_services_dns_and_the_api_server_from_a_pod(k8s_cluster: devcluster.Cluster, real_ns: str) -> None:
    apply(k8s_cluster, real_ns,
          pod("backend", "mkdir -p /www; echo backend-page > /www/index.html; exec httpd -f -p 8080 -h /www",
              restartPolicy="Always", readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1}),
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend"},
           "spec": {"selector": {"app": "backend"}, "ports": [{"port": 80, "targetPort": 8080}]}})
    wait_ready(k8s_cluster, real_ns, "backend")
    client = pod("client", f"nslookup kubernetes.default.svc.cluster.local; "
                           f"wget -q -O - http://backend.{real_ns}.svc.cluster.local/index.html; "
                           "echo | nc -w 5 kubernetes.default.svc.cluster.local 443 && echo api-reachable")
    apply(k8s_cluster, real_ns, client)
    done = wait_phase(k8s_cluster, real_ns, "client", ("Succeeded", "Failed"))
    log = k8s_cluster.kubectl("logs", "-n", real_ns, "client").stdout
    assert done["status"]["phase"] == "Succeeded", log
    assert "10.0.0.1" in log  # the kubernetes Service's ClusterIP, from CoreDNS
    assert "backend-page" in log  # Service name -> ClusterIP -> kube-proxy -> the other pod
    assert "api-reachable" in log


def test_a_claim_of_the_default_storage_class_binds_and_keeps_what_a_pod_wrote(
    k8s_cluster: devcluster.Cluster, real_ns: str
) -> None:
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    writer = pod("writer", "echo kept > /data/file; id -u > /data/uid")
    writer["spec"]["securityContext"] = {"runAsUser": 10001, "runAsGroup": 10001}
    writer["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    writer["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    apply(k8s_cluster, real_ns, claim, writer)
    done = wait_phase(k8s_cluster, real_ns, "writer", ("Succeeded", "Failed"), timeout=180)
    assert done["status"]["phase"] == "Succeeded", k8s_cluster.kubectl("logs", "-n", real_ns, "writer", check=False).stdout
    body = k8s_cluster.kubectl_json("get", "pvc", "data", "-n", real_ns)
    assert body["status"]["phase"] == "Bound"
    assert body["spec"]["storageClassName"] == devcluster.STORAGE_CLASS  # the default, never named
    volume = k8s_cluster.kubectl_json("get", "pv", body["spec"]["volumeName"])
    path = Path((volume["spec"].get("hostPath") or volume["spec"]["local"])["path"])
    assert (path / "file").read_text() == "kept\n"  # on the host, where the provisioner put it
    assert (path / "uid").read_text() == "10001\n"  # a non-root pod could write it
