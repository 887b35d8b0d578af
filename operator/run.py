"""Process wiring of `sensorfleet operator`: HTTP endpoints, the Lease, the Reconciler, kopf."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import kopf

from sensorfleet.operator.child_meta import BuildOptions
from sensorfleet.operator.handlers import make_registry, operator_settings
from sensorfleet.operator.kube import KubeClient
from sensorfleet.operator.lease import LeaderLease
from sensorfleet.operator.metrics import OperatorMetrics, make_app, start_http
from sensorfleet.operator.reconcile import Reconciler

log = logging.getLogger("sensorfleet.operator")


@dataclass
class OperatorConfig:
    namespaces: list[str] = field(default_factory=list)  # empty: cluster-wide
    image: str = "sensorfleet:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8080
    leader_election: bool = True
    lease_name: str = "sensorfleet-operator"
    lease_namespace: str | None = None
    lease_duration: float = 15
    identity: str = ""
    kubeconfig: str | None = None
    workers: int = 8
    resync_seconds: float = 300.0
    network_policy: bool = True
    metrics_namespace: str = ""
    write_log: str | None = None  # one JSON line per write to the API server (an audit of what this replica did)


def _own_namespace(kubeconfig: str | None) -> str:
    """The namespace the operator runs in: POD_NAMESPACE, the in-cluster one, or the kubeconfig's."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    from kubernetes import config as k8s_config

    with contextlib.suppress(Exception):
        _, context = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
        if context and context.get("context", {}).get("namespace"):
            return str(context["context"]["namespace"])
    return "default"


async def run_operator(config: OperatorConfig) -> int:
    """Serve /metrics and /healthz, wait for the Lease, then run kopf until stopped.
    Returns 0 on a requested stop, 1 when leadership was lost."""
    if config.kubeconfig:
        os.environ["KUBECONFIG"] = config.kubeconfig  # kopf's login and our client read the same file
    identity = config.identity or f"{socket.gethostname()}-{os.getpid()}"
    metrics = OperatorMetrics()
    record = _write_recorder(config.write_log, identity)
    lease_client = KubeClient(config.kubeconfig, connections=2, on_write=record)  # never queued behind applies
    lease = LeaderLease(lease_client, config.lease_namespace or _own_namespace(config.kubeconfig), config.lease_name,
                        identity, config.lease_duration)
    # Every write of the reconciler is fenced by the lease: refused once leadership has lapsed.
    client = KubeClient(config.kubeconfig, may_write=lease.is_leading if config.leader_election else None,
                        on_write=record)
    reconciler = Reconciler(client, BuildOptions(config.image, config.image_pull_policy,
                                                      network_policy=config.network_policy,
                                                      metrics_namespace=config.metrics_namespace), metrics,
                            workers=config.workers, resync_seconds=config.resync_seconds)
    stop = asyncio.Event()
    kopf_ready = asyncio.Event()
    leading = asyncio.Event()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    def healthy() -> bool:
        return not leading.is_set() or reconciler.healthy()

    def ready() -> bool:
        return not leading.is_set() or kopf_ready.is_set()  # a standby replica is ready to take over

    runner = await start_http(make_app(metrics, healthy, ready), config.metrics_host, config.metrics_port)
    log.info("metrics and health on http://%s:%d/metrics /healthz", config.metrics_host, config.metrics_port)
    exit_code = 0
    try:
        if config.leader_election:
            acquiring = asyncio.create_task(lease.acquire())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not acquiring.done():
                acquiring.cancel()
                return 0
            stopping.cancel()
        leading.set()
        metrics.leader.set(1)
        if record is not None:
            record("LEADING", "", time.time())
        reconciler.start()
        memo = kopf.Memo(reconciler=reconciler)
        kopf_task = asyncio.create_task(kopf.operator(
            registry=make_registry(client),
            settings=operator_settings(),
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            memo=memo,
            stop_flag=stop,
            ready_flag=kopf_ready,
            standalone=True,
        ))
        watchers = {kopf_task}
        keeper = asyncio.create_task(lease.keep()) if config.leader_election else None
        if keeper:
            watchers.add(keeper)
        done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
        if keeper is not None and keeper in done:
            log.error("leadership lost: stopping so that only one replica acts")
            exit_code = 1
            stop.set()
        elif keeper is not None:
            keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await kopf_task
    finally:
        metrics.leader.set(0)
        await reconciler.stop()
        if config.leader_election:
            await lease.release()
        await client.close()
        await lease_client.close()
        await runner.cleanup()
    return exit_code


def _write_recorder(path: str | None, identity: str) -> Callable[[str, str, float], None] | None:
    if not path:
        return None
    out = open(path, "a", buffering=1)  # line-buffered: each line is on disk before the request goes

    def record(method: str, request_path: str, at: float) -> None:
        out.write(json.dumps({"identity": identity, "pid": os.getpid(), "method": method, "path": request_path,
                              "time": at}) + "\n")
    return record
