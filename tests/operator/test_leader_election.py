"""Two operator replicas against the real API server: the leader frozen (SIGSTOP, as a partition
looks to the others) or killed (SIGKILL) — the standby takes over within the lease, and the write
audit of both replicas (`--write-log`, one line per request sent) shows they never wrote at once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from devcluster import deploy


def wait_for(what: str, condition: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NS = "sf-leader"
LEASE_SECONDS = 6.0
FLEET = {"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "le", "namespace": NS},
         "spec": {"protocols": {"mqtt": {"devices": 3}}, "storage": {"url": "memory://le"}}}


def writes(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def child_writes(log: Path, pid: int) -> list[float]:
    """When replica `pid` sent a write to one of the fleet's objects (the Lease calls excluded)."""
    return [w["time"] for w in writes(log) if w["pid"] == pid and w["method"] != "LEADING" and "/leases/" not in w["path"]]


def leading_since(log: Path, pid: int) -> float | None:
    return next((w["time"] for w in writes(log) if w["pid"] == pid and w["method"] == "LEADING"), None)


def start(cluster: Any, state: Path, log: Path) -> deploy.OperatorProcess:
    return deploy.start_operator(cluster, state, args=[
        "--namespace", NS, "--resync", "1", "--lease-duration", str(LEASE_SECONDS), "--write-log", str(log)])


@pytest.fixture()
def replicas(deployed: dict[str, Any], tmp_path: Path) -> Any:
    """The session's operator steps aside (SIGTERM releases the Lease); restarted afterwards."""
    cluster = deployed["cluster"]
    deployed["operator"].stop()
    cluster.kubectl("create", "namespace", NS, check=False)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(FLEET))
    started: list[deploy.OperatorProcess] = []
    try:
        yield cluster, started, tmp_path / "writes.jsonl"
    finally:
        for process in started:
            if process.alive():
                os.kill(process.pid, signal.SIGCONT)  # a frozen process cannot handle SIGTERM
                process.stop()
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        deployed["operator"] = deploy.start_operator(cluster, deployed["state"])
        deployed["operator"].wait_leading()


def is_leader(process: deploy.OperatorProcess) -> bool:
    try:
        return "sensorfleet_operator_leader 1.0" in process.get("/metrics")[1]
    except OSError:
        return False


def answering(process: deploy.OperatorProcess) -> bool:
    try:
        return process.alive() and process.get("/metrics")[0] == 200
    except OSError:
        return False


def test_a_frozen_or_killed_leader_is_replaced_within_the_lease_and_two_never_write_at_once(replicas: Any) -> None:
    cluster, started, log = replicas
    state = log.parent
    first = start(cluster, state, log)
    started.append(first)
    first.wait_leading()
    second = start(cluster, state, log)
    started.append(second)
    wait_for("the first leader applying the fleet", lambda: len(child_writes(log, first.pid)) >= 5, 60)
    time.sleep(2 * LEASE_SECONDS / 7.5 + 1)  # the standby has read the lease at least once
    assert not is_leader(second) and leading_since(log, second.pid) is None

    # Frozen: the process cannot renew, nor notice. The standby takes over within the lease.
    os.kill(first.pid, signal.SIGSTOP)
    frozen_at = time.time()
    wait_for("the standby taking over", lambda: is_leader(second), LEASE_SECONDS + 30, 0.2)
    took_over = leading_since(log, second.pid)
    assert took_over is not None
    # Lease duration after the last renewal it saw, plus its retry period and a loaded machine's slack.
    assert took_over - frozen_at < LEASE_SECONDS + 10
    assert took_over - frozen_at >= LEASE_SECONDS * 2 / 3  # it did wait for the lease to lapse
    wait_for("the new leader applying the fleet", lambda: child_writes(log, second.pid), 30)
    # Thawed, the old leader finds its lease lapsed on its own clock: it writes nothing and exits 1.
    os.kill(first.pid, signal.SIGCONT)
    assert first.popen is not None
    assert first.popen.wait(30) == 1
    assert max(child_writes(log, first.pid)) < took_over
    assert min(child_writes(log, second.pid)) >= took_over

    # Killed: the next standby takes over within the lease, again never overlapping.
    third = start(cluster, state, log)
    started.append(third)
    wait_for("the third replica standing by", lambda: answering(third), 60)
    time.sleep(2 * LEASE_SECONDS / 7.5 + 1)
    assert not is_leader(third)
    os.killpg(second.pid, signal.SIGKILL)
    killed_at = time.time()
    assert second.popen is not None
    second.popen.wait(10)
    wait_for("the third replica taking over", lambda: is_leader(third), LEASE_SECONDS + 30, 0.2)
    took_over_again = leading_since(log, third.pid)
    assert took_over_again is not None and took_over_again - killed_at < LEASE_SECONDS + 10
    wait_for("the third leader applying the fleet", lambda: child_writes(log, third.pid), 30)
    assert max(child_writes(log, second.pid)) < took_over_again
    assert min(child_writes(log, third.pid)) >= took_over_again
