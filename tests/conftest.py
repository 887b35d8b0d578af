"""Shared pytest fixtures. Each section belongs to one area; add yours in its own marked block."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import devcluster

# --- local Kubernetes control plane (issue 5) ---
# `k8s_cluster` is a real control plane (etcd, kube-apiserver, controller-manager, scheduler,
# kwok with 3 fake Nodes) started once per session from devcluster and always
# stopped at the end. With SENSORFLEET_USE_KUBECONFIG=1 and KUBECONFIG naming an existing file,
# the tests use that cluster instead (kind, or one from `make cluster-up`) and leave it running.


def _external_kubeconfig() -> Path | None:
    path = os.environ.get("KUBECONFIG", "")
    if os.environ.get("SENSORFLEET_USE_KUBECONFIG") == "1" and path and Path(path).is_file():
        return Path(path)
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Build the binaries here, not in a fixture: a cold build takes longer than the per-test
    # timeout, which also covers fixture setup. Only when a selected test needs them.
    need_local = any("k8s_binaries" in getattr(item, "fixturenames", ()) for item in items) or (
        _external_kubeconfig() is None
        and any("k8s_cluster" in getattr(item, "fixturenames", ()) for item in items)
    )
    if need_local and not config.option.collectonly:
        capture = config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            try:
                devcluster.ensure_binaries(progress=sys.stderr)
            except devcluster.ClusterError as error:
                # the cluster tests error with this message; every other test still runs
                config.stash[_BUILD_ERROR] = error


_BUILD_ERROR = pytest.StashKey[devcluster.ClusterError]()


@pytest.fixture(scope="session")
def k8s_binaries(request: pytest.FixtureRequest) -> Path:
    """The folder with etcd, kube-*, kwok and helm at the pinned versions."""
    if _BUILD_ERROR in request.config.stash:
        raise request.config.stash[_BUILD_ERROR]
    return devcluster.bin_dir()


@pytest.fixture(scope="session")
def k8s_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[devcluster.Cluster]:
    """A running cluster: `.kubeconfig` (admin), `.kubectl(...)`, `.helm(...)`, `.api_client()`."""
    external = _external_kubeconfig()
    if external is not None:
        yield devcluster.Cluster.external(external)
        return
    if _BUILD_ERROR in request.config.stash:
        raise request.config.stash[_BUILD_ERROR]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        cluster = devcluster.start_cluster(tmp_path_factory.mktemp("k8s-cluster"), progress=sys.stderr)
    try:
        yield cluster
    finally:
        cluster.stop()


# --- end of local Kubernetes control plane (issue 5) ---
