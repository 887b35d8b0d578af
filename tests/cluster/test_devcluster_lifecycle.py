"""`make cluster-up` / `make cluster-down` leave nothing behind (no process, port, mount, interface,
iptables rule or cgroup, also after the real node's kubelet and containerd crashed), and a broken
component says why.

These start their own small clusters from the local binaries (the `k8s_binaries` fixture), so
they also run when the other cluster tests point at kind.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import devcluster

pytestmark = pytest.mark.cluster


def _our_processes(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in arg for arg in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def _host_iptables() -> set[str]:
    """The host's rules (counters dropped); the node's own live in its network namespace."""
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return {line.split(" [")[0] for line in out.splitlines() if line and not line.startswith("#")}


def test_up_then_crash_then_down_leaves_nothing_behind(k8s_binaries: Path, tmp_path: Path) -> None:
    cluster_dir = tmp_path / "cluster"
    iptables_before = _host_iptables()
    cli = [sys.executable, "-m", "devcluster"]
    # the Makefile's way: devcluster/ is importable from the repository root only (not in the wheel)
    env = {**os.environ, "CLUSTER_DIR": str(cluster_dir), "PYTHONPATH": str(Path(devcluster.__file__).parents[1])}
    up = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, timeout=300)
    state_file = cluster_dir / devcluster.STATE_FILE
    try:
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={cluster_dir / 'kubeconfig'}" in up.stdout
        state = json.loads(state_file.read_text())
        # the `up` process has exited; the cluster outlives it and answers with the kubeconfig
        nodes = subprocess.run([str(devcluster.kubectl_binary()), "get", "nodes", "-o", "name"],
                               env={**os.environ, "KUBECONFIG": str(cluster_dir / "kubeconfig")},
                               capture_output=True, text=True, check=True).stdout.split()
        assert sorted(n.split("/")[-1] for n in nodes) == sorted(
            [devcluster.NODE_NAME, *(f"kwok-node-{i}" for i in range(devcluster.NODE_COUNT))])
        pids = {c["name"]: c["pid"] for c in state["components"]}
        assert sorted(pids) == sorted((*devcluster.COMPONENTS, *devcluster.NODE_COMPONENTS))
        assert all(psutil.pid_exists(pid) for pid in pids.values())
        assert not any(devcluster.port_is_free(port) for port in state["ports"].values() if port)
        node = state["node"]
        assert Path(f"/sys/class/net/{node['host_interface']}").exists()
        containers = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "coredns"
                      and f"{node['cgroup_root']}/" in Path(f"/proc/{p.pid}/cgroup").read_text()]
        assert containers, "CoreDNS runs as a container on the node"
        # a crash: the kubelet and containerd die, their shims and containers stay orphaned
        for name in ("kubelet", "containerd"):
            os.kill(pids[name], signal.SIGKILL)
    finally:
        down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    for name, pid in pids.items():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, name
    listening = {name: port for name, port in state["ports"].items() if not devcluster.port_is_free(port)}
    assert listening == {}
    assert not state_file.exists()
    assert not Path(state["state_dir"]).exists()  # certificates, keys and etcd data are gone
    assert not _our_processes(state["state_dir"])
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in containers)
    assert not Path(f"/sys/class/net/{node['host_interface']}").exists()  # the veth pair went with the netns
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{node['cgroup_root'].lstrip('/')}"))
    assert state["state_dir"] not in Path("/proc/self/mountinfo").read_text()
    assert _host_iptables() - iptables_before == set()


def test_a_component_that_fails_is_named_with_its_log_and_the_rest_is_stopped(
    k8s_binaries: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "bin"
    broken.mkdir()
    for name in (*devcluster.COMPONENTS, "helm"):
        (broken / name).symlink_to(k8s_binaries / name)
    (broken / "kube-apiserver").unlink()
    fake = broken / "kube-apiserver"
    fake.write_text("#!/bin/sh\necho 'Error: unknown flag: --sensorfleet-broken' >&2\nexit 1\n")
    fake.chmod(0o755)

    with pytest.raises(devcluster.StartupError) as failure:
        devcluster.start_cluster(tmp_path / "cluster", binaries=broken, timeout=60,
                                 progress=io.StringIO())
    error = failure.value
    assert error.component == "kube-apiserver"
    assert "exited with code 1" in str(error)
    assert "unknown flag: --sensorfleet-broken" in str(error)
    # etcd was already running; the failed start stopped it again
    assert not _our_processes(str(broken))
    assert not (tmp_path / "cluster" / devcluster.STATE_FILE).exists()
