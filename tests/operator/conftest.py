"""Fixtures of the operator's end-to-end tests: the chart installed in the harness cluster and the
operator running as a local process with the chart's ServiceAccount token (as `make deploy-local`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import devcluster
from devcluster import deploy


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 60.0, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


@pytest.fixture(scope="session")
def deployed(k8s_cluster: devcluster.Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`make deploy-local` in a fixture: yields the cluster, the operator process and its state dir."""
    deploy.install_chart(k8s_cluster)
    state = tmp_path_factory.mktemp("operator")
    operator = deploy.start_operator(k8s_cluster, state)
    env: dict[str, Any] = {"cluster": k8s_cluster, "operator": operator, "state": state}
    try:
        operator.wait_leading()
        yield env
    finally:
        env["operator"].stop()
        k8s_cluster.helm("uninstall", deploy.RELEASE, "--namespace", deploy.NAMESPACE, check=False)
