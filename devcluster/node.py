"""The real node `sf-node-0`: kubelet + containerd + runc + CNI + kube-proxy, CoreDNS as a pod, and
local-path-provisioner behind the default StorageClass, beside kwok's fake nodes.

Everything of the node runs inside one network and mount namespace of its own, held open by a
`sleep` process (the "holder"); each component joins it with nsenter:

    host netns                                   node netns (one per cluster)
    127.0.0.1:P  kube-apiserver                  eth0 10.250.k.2  kubelet :10250, kube-proxy
    10.250.k.1:P socat relay ──veth sfh<k>──────  sfbr0 10.88.0.1 ── pods 10.88.0.x
                                                 iptables (kube-proxy, CNI), mounts, /run/containerd

So two clusters on one machine never share a bridge, a pod subnet, an iptables chain or a mount,
and the host is left as it was: when the holder and every process in the node are gone, the kernel
drops the namespaces with their interfaces, routes, iptables rules and mounts. What `stop` removes
by hand is only what lives outside them: the processes (found by cgroup and by namespace, so also
after a crash, from the state file), the node's cgroup subtree and its folder.

Placement (taints, labels, namespace defaults) is described in devcluster/node_config.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from devcluster import node_config as config
from devcluster.errors import ClusterError, StartupError
from devcluster.pki import issue_certificate, load_ca, write_kubeconfig, write_private
from devcluster.processes import Component, tail_of, wait_until

if TYPE_CHECKING:
    from devcluster.cluster import Cluster

CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
# the processes of the node, in start order (names in the state file and logs/<name>.log)
NODE_COMPONENTS = ("node-namespaces", "apiserver-relay", "containerd", "kubelet", "kube-proxy", "local-path-provisioner")
NODE_BINARIES = ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "coredns", "local-path-provisioner", "pause")
NODE_IMAGES = ("pause", "coredns", "busybox")  # <name>.tar + <name>.ref made by hack/build-node.sh
LINK_POOL = ipaddress.ip_network("10.250.0.0/16")  # one /30 per node on the machine
LINK_LOCK = Path("/tmp/sensorfleet-node-links.lock")
HOST_INTERFACE_PREFIX = "sfh"
# Folders of the host that the node's components write to by fixed path; inside the node's mount
# namespace each gets a tmpfs of its own, so nothing lands in the host's copy (which stays empty).
PRIVATE_TMPFS = ("/run/containerd", "/run/netns", "/var/lib/cni", "/var/log/containers")
CONTAINERD_NAMESPACE = "k8s.io"


def missing_prerequisites(k8s_bin: Path, node_bin: Path) -> list[str]:
    """What the node cannot start without, each with where it comes from."""
    missing = [f"{k8s_bin / b} (make cluster-build)" for b in ("kubelet", "kube-proxy") if not (k8s_bin / b).is_file()]
    missing += [f"{node_bin / b} (hack/build-node.sh)" for b in NODE_BINARIES if not (node_bin / b).is_file()]
    missing += [f"{node_bin / f'{i}.tar'} (hack/build-node.sh)" for i in NODE_IMAGES if not (node_bin / f"{i}.tar").is_file()]
    missing += [f"{CNI_BIN_DIR / p} (Debian containernetworking-plugins)" for p in CNI_PLUGINS if not (CNI_BIN_DIR / p).is_file()]
    missing += [f"{tool} (Debian)" for tool in ("unshare", "nsenter", "ip", "iptables", "socat", "conntrack")
                if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (namespaces, cgroups, veth)")
    return missing


def image_ref(node_bin: Path, name: str) -> str:
    return (node_bin / f"{name}.ref").read_text().strip()


# --------------------------------------------------------------------------------------------
# State kept in the cluster's state file, enough to clean up after a crash
# --------------------------------------------------------------------------------------------


@dataclass
class NodeState:
    root: str
    holder_pid: int
    holder_started_at: float
    netns_inode: int
    cgroup_root: str  # "/sensorfleet-<id>", under every cgroup v1 hierarchy
    host_interface: str
    host_ip: str
    node_ip: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeState:
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Namespaces, link, cgroups
# --------------------------------------------------------------------------------------------


def _sh(*argv: str, input: str | None = None, timeout: float = 60) -> str:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s") from None
    if result.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def _in_node(holder_pid: int, *argv: str) -> list[str]:
    return ["nsenter", f"--target={holder_pid}", "--net", "--mount", "--", *argv]


def _netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy: the v1 controllers (cpu,cpuacct and friends are one folder
    with links) and the empty v2 mount of this hybrid layout, where runc makes folders too."""
    seen: dict[str, Path] = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mountpoint, fstype, options, *_ = line.split()
        if fstype in ("cgroup", "cgroup2"):
            seen.setdefault(options, Path(mountpoint))
    return list(seen.values())


def _make_cgroup_root(name: str) -> None:
    for hierarchy in _cgroup_hierarchies():
        folder = hierarchy / name.lstrip("/")
        folder.mkdir(exist_ok=True)
        # a new cpuset is empty (no CPU, no memory node): nothing could run in it until copied
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (folder / knob).exists() and not (folder / knob).read_text().strip():
                (folder / knob).write_text((hierarchy / knob).read_text())


def _cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for hierarchy in _cgroup_hierarchies():
        root = hierarchy / name.lstrip("/")
        if root.is_dir():
            for procs in root.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in procs.read_text().split())
    return pids


def _remove_cgroup_root(name: str, timeout: float = 20.0) -> list[str]:
    """rmdir the subtree deepest first (the kernel frees a cgroup once its last task is gone)."""
    left = []
    for hierarchy in _cgroup_hierarchies():
        root = hierarchy / name.lstrip("/")
        if not root.is_dir():
            continue
        deadline = time.monotonic() + timeout
        while root.is_dir():
            for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()
            if not root.is_dir() or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if root.is_dir():
            left.append(str(root))
    return left


def _pids_in_netns(inode: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(entry / "ns" / "net").st_ino == inode:
                    pids.add(int(entry.name))
    return pids


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            if "\nState:\tZ" not in status:
                alive.add(pid)
    return alive


def _pick_link(lock: IO[str]) -> config.NodeAddresses:
    """The first /30 of LINK_POOL no interface on this machine uses (called under LINK_LOCK)."""
    del lock
    used = set()
    for entry in json.loads(_sh("ip", "-j", "-4", "addr")):
        for info in entry.get("addr_info", []):
            used.add(ipaddress.ip_address(info["local"]))
    for index, subnet in enumerate(LINK_POOL.subnets(new_prefix=30)):
        host_ip, node_ip = list(subnet.hosts())
        if host_ip not in used and not Path(f"/sys/class/net/{HOST_INTERFACE_PREFIX}{index}").exists():
            return config.NodeAddresses(str(host_ip), str(node_ip), f"{HOST_INTERFACE_PREFIX}{index}")
    raise ClusterError(f"no free /30 left in {LINK_POOL} for the node's link")


# --------------------------------------------------------------------------------------------
# Start
# --------------------------------------------------------------------------------------------


def start_node(cluster: Cluster, *, k8s_bin: Path, node_bin: Path, tie_to_parent: bool, timeout: float,
               progress: IO[str]) -> NodeState:
    """Start sf-node-0 in `cluster` and wait until it is Ready with CoreDNS answering.

    Components are appended to cluster.components (so Cluster.stop stops them) and the node's
    state is saved in the cluster's state file before anything that could leak is made.
    """
    assert cluster.state_dir is not None and cluster.cluster_dir is not None
    missing = missing_prerequisites(k8s_bin, node_bin)
    if missing:
        raise ClusterError("the real node cannot start; missing: " + "; ".join(missing))
    paths = config.NodePaths(cluster.state_dir / "node")
    for folder in ("run", "cni/net.d", "cni/ipam", "storage", "pod-logs", "kubelet", "containerd", "pki"):
        (paths.root / folder).mkdir(parents=True, exist_ok=True)
    logs = cluster.cluster_dir / "logs"
    pki = paths.root / "pki"
    t0 = time.monotonic()

    # 1. the holder: new network + mount namespace, private tmpfs over the host's fixed paths
    for folder in PRIVATE_TMPFS:
        Path(folder).mkdir(parents=True, exist_ok=True)
    mounts = "; ".join(f"mount -t tmpfs -o mode=0755 sensorfleet-node {f}" for f in PRIVATE_TMPFS)
    holder = Component("node-namespaces", [
        "unshare", "--net", "--mount", "--propagation", "private", "--",
        "sh", "-c", f"set -e; {mounts}; ip link set lo up; sysctl -q -w net.ipv4.ip_forward=1; "
                    "sysctl -q -w net.ipv4.conf.all.route_localnet=1 || true; exec sleep infinity",
    ], logs / "node-namespaces.log")
    holder.start(dict(os.environ), tie_to_parent)
    cluster.components.append(holder)
    deadline = time.monotonic() + 10
    while _netns_inode(holder.pid) == _netns_inode(os.getpid()) or not _holder_ready(holder.pid):
        if holder.exit_code() is not None or time.monotonic() > deadline:
            raise StartupError("node-namespaces", "the namespace holder did not come up", holder.log, tail_of(holder.log))
        time.sleep(0.05)
    cgroup_root = f"/sensorfleet-{Path(cluster.state_dir).name}"

    # 2. the link host <-> node (chosen and made under a machine-wide lock)
    LINK_LOCK.touch(exist_ok=True)
    with LINK_LOCK.open("r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        addresses = _pick_link(lock)
        state = NodeState(str(paths.root), holder.pid, holder.started_at, _netns_inode(holder.pid), cgroup_root,
                          addresses.host_interface, addresses.host_ip, addresses.node_ip)
        cluster.node = state
        cluster.save_state()
        peer = f"sfn{addresses.host_interface[len(HOST_INTERFACE_PREFIX):]}"
        _sh("ip", "link", "add", addresses.host_interface, "type", "veth", "peer", "name", peer)
        _sh("ip", "link", "set", peer, "netns", str(holder.pid))
        _sh("ip", "addr", "add", f"{addresses.host_ip}/{addresses.prefix}", "dev", addresses.host_interface)
        _sh("ip", "link", "set", addresses.host_interface, "up")
    inside = lambda *argv: _sh(*_in_node(holder.pid, *argv))  # noqa: E731
    inside("ip", "link", "set", peer, "name", "eth0")
    inside("ip", "addr", "add", f"{addresses.node_ip}/{addresses.prefix}", "dev", "eth0")
    inside("ip", "link", "set", "eth0", "up")
    inside("ip", "route", "add", "default", "via", addresses.host_ip)
    _make_cgroup_root(cgroup_root)

    # 3. certificates and kubeconfigs of the node's components
    api_port = cluster.ports["kube-apiserver"]
    node_server = f"https://{addresses.host_ip}:{api_port}"
    ca_pem, ca_cert, ca_key = load_ca(cluster.state_dir / "pki")
    write_private(pki / "ca.crt", ca_pem)
    serving = issue_certificate(ca_cert, ca_key, f"system:node:{config.NODE_NAME}",
                                server_names=(addresses.node_ip, config.NODE_NAME))
    write_private(pki / "kubelet-serving.crt", serving.cert_pem)
    write_private(pki / "kubelet-serving.key", serving.key_pem)
    identities = {
        "kubelet": issue_certificate(ca_cert, ca_key, f"system:node:{config.NODE_NAME}", groups=["system:nodes"]),
        "kube-proxy": issue_certificate(ca_cert, ca_key, "system:kube-proxy"),
        # it creates PVs and helper pods in any namespace; an admin identity keeps it simple
        "local-path-provisioner": issue_certificate(ca_cert, ca_key, "local-path-provisioner", groups=["system:masters"]),
    }
    for name, pair in identities.items():
        # the API server's certificate names `kubernetes`, not the link address
        write_kubeconfig(pki / f"{name}.kubeconfig", node_server, ca_pem, name, client=pair,
                         tls_server_name="kubernetes")

    # 4. configs
    sandbox = image_ref(node_bin, "pause")
    (paths.root / "containerd.toml").write_text(config.containerd_config(
        paths, runc=str(node_bin / "runc"), cni_bin_dir=str(CNI_BIN_DIR), sandbox_image=sandbox))
    (paths.cni_conf_dir / "10-sensorfleet.conflist").write_text(json.dumps(config.cni_conflist(paths), indent=2))
    (paths.root / "resolv.conf").write_text("# pods of dnsPolicy Default: no resolver beyond the cluster's\n"
                                            f"nameserver {config.DNS_SERVICE_IP}\n")
    (paths.root / "kubelet.yaml").write_text(json.dumps(config.kubelet_config(
        paths, addresses, pki=pki, cgroup_root=cgroup_root), indent=2))
    (paths.root / "local-path-config.json").write_text(json.dumps(config.local_path_config(paths)))
    (paths.root / "local-path-helper-pod.yaml").write_text(json.dumps(
        config.local_path_helper_pod(image_ref(node_bin, "busybox"))))

    env = dict(os.environ)
    env["PATH"] = f"{node_bin}:{k8s_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.pop("KUBECONFIG", None)

    def launch(name: str, argv: list[str], *, in_node: bool = True) -> Component:
        component = Component(name, _in_node(holder.pid, *argv) if in_node else argv, logs / f"{name}.log")
        component.start(env, tie_to_parent)
        cluster.components.append(component)
        cluster.save_state()
        return component

    # 5. pods reach the API server through the `kubernetes` Service -> this relay -> 127.0.0.1
    launch("apiserver-relay", [
        "socat", f"TCP-LISTEN:{api_port},bind={addresses.host_ip},reuseaddr,fork", f"TCP:127.0.0.1:{api_port}",
    ], in_node=False)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(config.kubernetes_endpoint_slice(addresses.host_ip, api_port)))

    containerd = launch("containerd", [str(node_bin / "containerd"), f"--config={paths.root / 'containerd.toml'}"])
    ctr = [str(node_bin / "ctr"), f"--address={paths.containerd_socket}", f"--namespace={CONTAINERD_NAMESPACE}"]
    wait_until(containerd, "serving", lambda: subprocess.run(
        [*ctr, "version"], capture_output=True, timeout=10).returncode == 0, timeout, progress)
    import_images(paths, node_bin, [node_bin / f"{name}.tar" for name in NODE_IMAGES])

    kubelet = launch("kubelet", [
        str(k8s_bin / "kubelet"),
        f"--config={paths.root / 'kubelet.yaml'}",
        f"--kubeconfig={pki / 'kubelet.kubeconfig'}",
        f"--root-dir={paths.root / 'kubelet'}",
        f"--hostname-override={config.NODE_NAME}",
        f"--node-ip={addresses.node_ip}",
        f"--node-labels={config.REAL_NODE_LABEL}=real",
        "--v=1",
    ])
    launch("kube-proxy", config.kube_proxy_argv(k8s_bin / "kube-proxy", pki / "kube-proxy.kubeconfig"))
    wait_until(kubelet, "Node Ready", lambda: _node_ready(cluster), timeout, progress)

    for namespace in (*config.REAL_POD_NAMESPACES,):
        real_pods_namespace(cluster, namespace)
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        *config.storage_manifests(), *config.coredns_manifests(image_ref(node_bin, "coredns"))]}))
    launch("local-path-provisioner", [
        str(node_bin / "local-path-provisioner"), "start",
        f"--kubeconfig={pki / 'local-path-provisioner.kubeconfig'}",
        f"--config={paths.root / 'local-path-config.json'}",
        f"--helper-pod-file={paths.root / 'local-path-helper-pod.yaml'}",
        f"--namespace={config.STORAGE_NAMESPACE}",
        "--service-account-name=local-path-provisioner",
        "--configmap-name=local-path-config",
        f"--helper-image={image_ref(node_bin, 'busybox')}",
    ], in_node=False)
    wait_until(kubelet, "CoreDNS Ready", lambda: _deployment_ready(cluster, "kube-system", "coredns"),
               timeout, progress)
    progress.write(f"[devcluster]   {config.NODE_NAME}: up in {time.monotonic() - t0:.1f}s "
                   f"(node {addresses.node_ip}, link {addresses.host_interface})\n")
    progress.flush()
    return state


def _holder_ready(pid: int) -> bool:
    """The holder has made its mounts and exec'd sleep."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
    return False


IMAGE_IMPORT_TIMEOUT = 600.0


def import_images(paths: config.NodePaths, node_bin: Path, archives: list[Path]) -> None:
    """Load image archives (docker-archive or OCI) into the node's containerd, for the kubelet."""
    ctr = [str(node_bin / "ctr"), f"--address={paths.containerd_socket}", f"--namespace={CONTAINERD_NAMESPACE}"]
    for archive in archives:
        # Unpacking the app image (~1 GB) took over 60 s at a load average of 15 on 2 cores.
        _sh(*ctr, "images", "import", "--local", str(archive), timeout=IMAGE_IMPORT_TIMEOUT)


def real_pods_namespace(cluster: Cluster, name: str) -> None:
    """Create (or annotate) a namespace whose pods all go to the real node, with no toleration or
    node selector in the pods themselves (PodNodeSelector + PodTolerationRestriction)."""
    manifest = {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "annotations": config.real_pods_annotations()}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def _node_ready(cluster: Cluster) -> bool:
    result = cluster.kubectl("get", "node", config.NODE_NAME, "-o", "json", check=False)
    if result.returncode != 0:
        return False
    conditions = json.loads(result.stdout).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _deployment_ready(cluster: Cluster, namespace: str, name: str) -> bool:
    result = cluster.kubectl("get", "deployment", name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return False
    status = json.loads(result.stdout).get("status", {})
    return int(status.get("readyReplicas", 0)) >= 1


# --------------------------------------------------------------------------------------------
# Stop (also after a crash, from the state file alone)
# --------------------------------------------------------------------------------------------


def stop_node(state: NodeState, timeout: float = 30.0) -> list[str]:
    """Kill what is left of the node (containers by cgroup, shims by namespace, then the holder),
    remove its cgroups and folder. Returns what could not be removed (empty when clean)."""
    problems = []
    deadline = time.monotonic() + timeout
    while True:
        pids = _cgroup_pids(state.cgroup_root) | _pids_in_netns(state.netns_inode)
        pids.discard(os.getpid())
        pids = _alive(pids)
        if not pids:
            break
        _kill_all(pids)
        if time.monotonic() > deadline:
            problems.append(f"processes still alive: {sorted(pids)}")
            break
        time.sleep(0.2)
    holder_alive = Path(f"/proc/{state.holder_pid}").exists() and _alive({state.holder_pid})
    if holder_alive:
        with contextlib.suppress(OSError):
            if abs(_start_time(state.holder_pid) - state.holder_started_at) < 1.0:
                os.kill(state.holder_pid, signal.SIGKILL)
    # the kernel destroys the namespaces (and with them the veth pair) once the holder is gone
    link = Path(f"/sys/class/net/{state.host_interface}")
    while link.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if link.exists():
        with contextlib.suppress(ClusterError):
            _sh("ip", "link", "delete", state.host_interface)
    if link.exists():
        problems.append(f"interface {state.host_interface} still exists")
    problems += [f"cgroup {c} not removed" for c in _remove_cgroup_root(state.cgroup_root)]
    shutil.rmtree(state.root, ignore_errors=True)
    return problems


def _start_time(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).create_time())
