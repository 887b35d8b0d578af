"""Real-node benchmark (issue 10): the dev cluster's sf-node-0 with real containers.

    PYTHONPATH=. python bench/bench_realnode.py

1. node start: from a running control plane to sf-node-0 Ready with CoreDNS Ready;
2. apply -> all pods Running and Ready on sf-node-0, p50 over 5 applies one after another:
   a 3-replica busybox Deployment (the node alone), and, when the SensorFleet images can be built
   (devcluster/images.py), the example fleet with the operator running as a pod;
3. memory (RSS) of the node stack: kubelet, containerd, shims, kube-proxy, CoreDNS.
Every figure comes with the load average it was measured under. Results: bench/results/realnode.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

import devcluster
from devcluster import node as node_module
from devcluster.binaries import node_bin_dir

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "realnode.json"
RUNS = 5


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pods_ready_on_node(cluster: devcluster.Cluster, namespace: str, selector: str, count: int) -> bool:
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
    ready = [p for p in pods if p["spec"].get("nodeName") == devcluster.NODE_NAME
             and p["status"].get("phase") == "Running"
             and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
    return len(ready) >= count


def deployment(name: str) -> dict[str, Any]:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": 3, "selector": {"matchLabels": labels}, "template": {
                "metadata": {"labels": labels},
                "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                    "name": "main", "image": "sensorfleet.local/busybox:static", "imagePullPolicy": "Never",
                    "command": ["sh", "-c", "mkdir -p /w && echo ok > /w/i && exec httpd -f -p 8080 -h /w"],
                    "readinessProbe": {"httpGet": {"path": "/i", "port": 8080}, "periodSeconds": 1}}]}}}}


def time_applies(cluster: devcluster.Cluster, namespace: str, manifests: list[dict[str, Any]], ready: Any,
                 timeout: float = 600) -> list[float]:
    seconds = []
    for manifest in manifests:
        start = time.monotonic()
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
        devcluster.wait_for(lambda m=manifest: ready(m), timeout=timeout, interval=0.25,
                            what=f"{manifest['metadata']['name']} Ready")
        seconds.append(time.monotonic() - start)
    return seconds


def fleet_ready_on_node(cluster: devcluster.Cluster, namespace: str, name: str) -> bool:
    """The fleet says Ready and every one of its pods runs, Ready, on the real node."""
    body = cluster.kubectl_json("get", "sensorfleet", name, "-n", namespace)
    if not any(c["type"] == "Ready" and c["status"] == "True" for c in body.get("status", {}).get("conditions", [])):
        return False
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"sensorfleet.io/fleet={name}")["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    return bool(running) and all(p["spec"].get("nodeName") == devcluster.NODE_NAME for p in running)


def node_stack_rss(cluster: devcluster.Cluster) -> dict[str, float]:
    assert cluster.node is not None
    inode = cluster.node.netns_inode
    by_part: dict[str, float] = {}
    for proc in psutil.process_iter(["name", "pid", "memory_info"]):
        try:
            name = proc.info["name"]
            in_node = os.stat(f"/proc/{proc.pid}/ns/net").st_ino == inode
            in_pods = f"{cluster.node.cgroup_root}/" in Path(f"/proc/{proc.pid}/cgroup").read_text()
        except (OSError, psutil.Error):
            continue
        part = None
        if in_node and name in ("kubelet", "containerd", "kube-proxy"):
            part = name
        elif in_node and name.startswith("containerd-shim"):
            part = "shims"
        elif in_pods and name == "coredns":
            part = "coredns"
        if part:
            by_part[part] = by_part.get(part, 0.0) + proc.info["memory_info"].rss / 2**20
    by_part = {k: round(v, 1) for k, v in sorted(by_part.items())}
    by_part["total"] = round(sum(by_part.values()), 1)
    return by_part


def main() -> int:
    results: dict[str, Any] = {"runs": RUNS}
    with tempfile.TemporaryDirectory(prefix="sf-bench-realnode-") as tmp:
        devcluster.ensure_binaries()
        cluster = devcluster.start_cluster(Path(tmp) / "cluster", real_node=False)
        try:
            results["load_before"] = load()
            t0 = time.monotonic()
            cluster.node = node_module.start_node(cluster, k8s_bin=devcluster.bin_dir(), node_bin=node_bin_dir(),
                                                  tie_to_parent=True, timeout=300, progress=sys.stderr)
            results["node_start_s"] = round(time.monotonic() - t0, 1)
            results["load_node_start"] = load()

            namespace = "bench-real"
            devcluster.real_pods_namespace(cluster, namespace)
            seconds = time_applies(cluster, namespace, [deployment(f"web-{i}") for i in range(RUNS)],
                                   lambda m: pods_ready_on_node(cluster, namespace, f"app={m['metadata']['name']}", 3))
            results["deployment_ready_s"] = {"p50": round(statistics.median(seconds), 2),
                                             "all": [round(s, 2) for s in seconds], "load": load()}
            results["rss_mib_idle_plus_15_pods"] = node_stack_rss(cluster)
            fleets = bench_fleets(cluster)
            if fleets:
                results["fleet_ready_s"] = fleets
                results["rss_mib_with_fleets"] = node_stack_rss(cluster)
            results["load_after"] = load()
        finally:
            cluster.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def bench_fleets(cluster: devcluster.Cluster) -> dict[str, Any] | None:
    """The example fleet, applied 5 times under new names, with the operator as a pod."""
    try:
        from devcluster import deploy, images  # noqa: F401  (images: podman + debootstrap)
    except ImportError:
        print("[bench] devcluster/images.py not there: fleets skipped", file=sys.stderr)
        return None
    t0 = time.monotonic()
    deploy.load_images_into_node(cluster)
    images_s = time.monotonic() - t0
    deploy.install_operator_pod(cluster)
    example = yaml.safe_load((REPO / "examples" / "fleet.yaml").read_text())
    manifests = []
    for i in range(RUNS):
        fleet = json.loads(json.dumps(example))
        fleet["metadata"]["name"] = f"demo-{i}"
        manifests.append(fleet)
    seconds = time_applies(cluster, "default", manifests,
                           lambda m: fleet_ready_on_node(cluster, "default", m["metadata"]["name"]))
    return {"p50": round(statistics.median(seconds), 2), "all": [round(s, 2) for s in seconds],
            "images_into_node_s": round(images_s, 1), "load": load()}


if __name__ == "__main__":
    sys.exit(main())
