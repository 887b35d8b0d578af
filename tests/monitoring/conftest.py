"""Monitoring fixtures: Prometheus with Kubernetes discovery, built from the Go module proxy
(hack/build-prometheus.sh) because Debian's is built without kubernetes_sd_configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "hack" / "build-prometheus.sh"
_BUILT = pytest.StashKey[object]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A cold build takes longer than the per-test timeout: build here, only when a test needs it.
    if config.option.collectonly or not any("prometheus_with_k8s_sd" in getattr(i, "fixturenames", ()) for i in items):
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        result = subprocess.run(["nice", "-n", "10", str(BUILD_SCRIPT)], stdout=sys.stderr, stderr=sys.stderr)
    config.stash[_BUILT] = result.returncode


@pytest.fixture(scope="session")
def prometheus_with_k8s_sd(request: pytest.FixtureRequest) -> Path:
    """The prometheus binary (v3, kubernetes, file and http service discovery compiled in)."""
    code = request.config.stash.get(_BUILT, None)
    if code is None:
        code = subprocess.run([str(BUILD_SCRIPT)], capture_output=True).returncode
    assert code == 0, f"{BUILD_SCRIPT} failed (its log is under ~/.cache/sensorfleet/prometheus-*/build.log)"
    bin_dir = Path(subprocess.run([str(BUILD_SCRIPT), "--bin-dir"], capture_output=True, text=True, check=True).stdout.strip())
    return bin_dir / "prometheus"
