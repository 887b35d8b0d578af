"""`make deploy-local` / `make undeploy-local`: the chart in the harness cluster, the operator as a
local process that authenticates with the chart's own ServiceAccount (a TokenRequest token), so a
missing RBAC rule fails here exactly as it would in a cluster.

    python -m devcluster deploy      # helm upgrade --install + start the operator
    python -m devcluster undeploy    # stop the operator + helm uninstall

With the real node sf-node-0 in the cluster (`make cluster-up`), the images are built (or taken
from the cache), imported into the node's containerd, and the chart is installed as a user would:
the operator runs as a pod on sf-node-0. On a cluster without one (kind, an older harness), the
chart is installed with replicaCount=0 and the operator runs as a local process with the chart's
ServiceAccount token; its state (pid, port, kubeconfig, log) is kept in $CLUSTER_DIR/operator/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from typing import Any

from devcluster.binaries import node_bin_dir
from devcluster.cluster import Cluster, default_cluster_dir, service_account_kubeconfig
from devcluster.errors import ClusterError
from devcluster.node import real_pods_namespace
from devcluster.node_config import NodePaths
from devcluster.processes import free_ports

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "charts" / "sensorfleet"
NAMESPACE = "sensorfleet-system"
RELEASE = "sensorfleet"
SERVICE_ACCOUNT = "sensorfleet-operator"  # the chart's fullname for release "sensorfleet"


@dataclass
class OperatorProcess:
    """The operator running locally: its process, endpoints and log."""

    popen: subprocess.Popen[bytes] | None
    pid: int
    port: int
    log: Path
    kubeconfig: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 3.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            os.kill(self.pid, 0)
            return True
        except OSError:
            return False

    def wait_leading(self, timeout: float = 60.0) -> None:
        """Until the operator holds the Lease and kopf is running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the operator exited; log {self.log}:\n{_tail(self.log)}")
            try:
                code, text = self.get("/metrics")
                if code == 200 and "sensorfleet_operator_leader 1.0" in text and self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the operator did not start leading within {timeout:.0f}s; log {self.log}:\n{_tail(self.log)}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (it releases its Lease), then SIGKILL if it hangs."""
        if not self.alive():
            return self.popen.returncode if self.popen else None
        os.killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            if self.popen is not None:
                try:
                    self.popen.wait(0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
            if self.popen is not None:
                self.popen.wait(5)
        return self.popen.returncode if self.popen else None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def install_chart(cluster: Cluster, namespace: str = NAMESPACE, release: str = RELEASE,
                  extra: list[str] | None = None) -> None:
    cluster.helm("upgrade", "--install", release, str(CHART), "--namespace", namespace, "--create-namespace",
                 "--set", "replicaCount=0", *(extra or []))


def start_operator(cluster: Cluster, state_dir: Path, *, namespace: str = NAMESPACE,
                   service_account: str = SERVICE_ACCOUNT, port: int | None = None,
                   args: list[str] | None = None, image: str = "sensorfleet:0.1.0") -> OperatorProcess:
    """Start `sensorfleet operator` with a token of the chart's ServiceAccount."""
    state_dir.mkdir(parents=True, exist_ok=True)
    kubeconfig = service_account_kubeconfig(
        cluster, namespace, service_account, state_dir / "operator.kubeconfig", create=False, expiration_seconds=24 * 3600)
    port = port or free_ports(1)[0]
    log = state_dir / f"operator-{port}.log"
    env = dict(os.environ)
    env.pop("KUBECONFIG", None)
    env.update({"POD_NAMESPACE": namespace, "PYTHONUNBUFFERED": "1"})
    argv = [str(Path(sys.executable).parent / "sensorfleet"), "operator", "--kubeconfig", str(kubeconfig),
            "--metrics-host", "127.0.0.1", "--metrics-port", str(port), "--image", image, *(args or [])]
    if not any(a.startswith("--lease-name") for a in argv):
        # the chart grants the Lease by name: its fullname, which is also the ServiceAccount's
        argv += ["--lease-name", service_account]
    with log.open("ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO_ROOT)
    return OperatorProcess(popen, popen.pid, port, log, kubeconfig)


def load_images_into_node(cluster: Cluster, progress: Any = None) -> list[str]:
    """Build (or take from the cache) the SensorFleet and Mosquitto images and import them into
    the real node's containerd; returns their references."""
    from devcluster import images  # podman + debootstrap: only when a real node needs them
    from devcluster.node import import_images

    if cluster.node is None:
        raise ClusterError("the cluster has no real node (make cluster-up starts sf-node-0)")
    archives = images.ensure_images(**({"progress": progress} if progress else {}))
    import_images(NodePaths(Path(cluster.node.root)), node_bin_dir(), [a.archive for a in archives])
    return [a.ref for a in archives]


def install_operator_pod(cluster: Cluster, namespace: str = NAMESPACE, release: str = RELEASE,
                         extra: list[str] | None = None, timeout: float = 300) -> dict[str, Any]:
    """`helm upgrade --install` with the operator as a pod (the chart's defaults: one replica, its
    ServiceAccount, probes, non-root, read-only root filesystem), into a namespace whose pods go
    to the real node; waits until the operator pod is Ready and returns it."""
    real_pods_namespace(cluster, namespace)
    cluster.helm("upgrade", "--install", release, str(CHART), "--namespace", namespace, *(extra or []),
                 timeout=timeout + 60)
    selector = f"app.kubernetes.io/instance={release}"
    cluster.kubectl("rollout", "status", "deployment", "-n", namespace, "-l", selector, f"--timeout={timeout:.0f}s",
                    timeout=timeout + 30)
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
    return next(p for p in pods if p["metadata"].get("deletionTimestamp") is None
                and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", [])))


def _cluster() -> Cluster:
    cluster_dir = default_cluster_dir()
    cluster = Cluster.load_state(cluster_dir)
    if cluster is not None:
        return cluster
    kubeconfig = Path(os.environ.get("KUBECONFIG") or cluster_dir / "kubeconfig")
    if not kubeconfig.is_file():
        raise SystemExit(f"no cluster: run `make cluster-up` first (looked for {kubeconfig})")
    return Cluster.external(kubeconfig)


def deploy(command: str) -> int:
    """`deploy` (command "up") or `undeploy` ("down")."""
    cluster = _cluster()
    state_dir = default_cluster_dir() / "operator"
    state_file = state_dir / "operator.json"
    if command == "up" and cluster.node is not None:
        # the real node is there: the operator runs as a pod from the image, not on the host
        if state_file.is_file():
            old = json.loads(state_file.read_text())
            OperatorProcess(None, old["pid"], old["port"], Path(old["log"]), Path(old["kubeconfig"])).stop()
            state_file.unlink()
        refs = load_images_into_node(cluster)
        pod = install_operator_pod(cluster)
        print(f"[deploy-local] images in {cluster.node and 'sf-node-0'}'s containerd: {', '.join(refs)}")
        print(f"[deploy-local] chart {RELEASE} installed in {NAMESPACE}; operator pod {pod['metadata']['name']} "
              f"on {pod['spec']['nodeName']} as system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}")
        print(f"[deploy-local] try: export KUBECONFIG={cluster.kubeconfig}; "
              "kubectl apply -f examples/fleet.yaml && kubectl wait sf/demo --for=condition=Ready --timeout=300s")
        return 0
    if command == "up":
        if state_file.is_file():
            old = json.loads(state_file.read_text())
            previous = OperatorProcess(None, old["pid"], old["port"], Path(old["log"]), Path(old["kubeconfig"]))
            if previous.alive():
                previous.stop()
        install_chart(cluster)
        operator = start_operator(cluster, state_dir)
        operator.wait_leading()
        state_file.write_text(json.dumps({"pid": operator.pid, "port": operator.port, "log": str(operator.log),
                                          "kubeconfig": str(operator.kubeconfig)}))
        print(f"[deploy-local] chart {RELEASE} installed in {NAMESPACE}; operator pid {operator.pid} "
              f"as system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}")
        print(f"[deploy-local] metrics {operator.url}/metrics, log {operator.log}")
        print(f"[deploy-local] try: KUBECONFIG={cluster.kubeconfig} kubectl apply -f examples/fleet.yaml && kubectl get sf")
        return 0
    if state_file.is_file():
        old = json.loads(state_file.read_text())
        OperatorProcess(None, old["pid"], old["port"], Path(old["log"]), Path(old["kubeconfig"])).stop()
        state_file.unlink()
        print(f"[undeploy-local] stopped the operator (pid {old['pid']})")
    result = cluster.helm("uninstall", RELEASE, "--namespace", NAMESPACE, check=False)
    print(f"[undeploy-local] {result.stdout.strip() or result.stderr.strip()}")
    return 0

