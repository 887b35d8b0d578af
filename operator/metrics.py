"""The operator's own Prometheus metrics and its HTTP endpoints (/metrics, /healthz, /readyz)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class OperatorMetrics:
    """One set of metrics per operator process (a registry per instance keeps tests independent)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.reconciles = Counter(
            "sensorfleet_operator_reconciles_total", "Reconciles of a fleet, by kind (full|status) and result (success|error).",
            ["kind", "result"], registry=registry)
        self.duration = Histogram(
            "sensorfleet_operator_reconcile_duration_seconds", "Time to reconcile one fleet.", ["kind"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=registry)
        self.errors = Counter(
            "sensorfleet_operator_reconcile_errors_total", "Failed reconcile steps, by reason.", ["reason"], registry=registry)
        self.applies = Counter(
            "sensorfleet_operator_applies_total", "Server-side applies of children, by kind and whether the child changed.",
            ["kind", "changed"], registry=registry)
        self.deletes = Counter(
            "sensorfleet_operator_pruned_total", "Children deleted because the spec no longer asks for them.", ["kind"], registry=registry)
        self.fleets = Gauge(
            "sensorfleet_operator_fleets", "Fleets by condition type and status.", ["condition", "status"], registry=registry)
        self.queue_depth = Gauge("sensorfleet_operator_queue_depth", "Fleets waiting to be reconciled.", registry=registry)
        self.leader = Gauge("sensorfleet_operator_leader", "1 while this replica holds the leader Lease.", registry=registry)


def make_app(metrics: OperatorMetrics, healthy: Callable[[], bool], ready: Callable[[], bool]) -> web.Application:
    async def serve_metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def serve_health(_: web.Request) -> web.Response:
        ok = healthy()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "unhealthy\n")

    async def serve_ready(_: web.Request) -> web.Response:
        ok = ready()
        return web.Response(status=200 if ok else 503, text="ready\n" if ok else "not ready\n")

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", serve_health)
    app.router.add_get("/readyz", serve_ready)
    return app


async def start_http(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
