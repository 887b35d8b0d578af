"""Prometheus metrics shared by every SensorFleet process.

The same names and labels for every protocol (the `protocol` label tells them apart), so one
dashboard panel covers MQTT, CoAP and OPC UA. Labels stay bounded: fleet, protocol and a small
fixed set of reasons; never a device or sensor label.
"""

from __future__ import annotations

import json
import os
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

from sensorfleet.reading import MALFORMED_REASONS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Why a write to the dataset store failed (collectors/backpressure.py classifies).
WRITE_FAILURE_REASONS = ("no_space", "read_only", "permission_denied", "unreachable", "io_error", "other")
WRITE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class FleetMetrics:
    """All metrics of one process (simulator, collector or broker helper) for one fleet and protocol."""

    fleet: str
    protocol: str
    component: str
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    # Threads this process cannot work without (network loop, writer): /healthz fails, so the
    # kubelet restarts the container, as soon as one of them has ended.
    workers: dict[str, threading.Thread] = field(default_factory=dict)
    # What /readyz reports (a collector's storage health, collectors/backpressure.py): 503 while
    # it says "degraded". The collectors' readinessProbe; the operator's StorageDegraded follows it.
    readiness: Callable[[], dict[str, object]] | None = None

    def __post_init__(self) -> None:
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        labels = ["fleet", "protocol"]
        values = (self.fleet, self.protocol)

        def counter(name: str, doc: str, extra: list[str] | None = None) -> Counter:
            return Counter(name, doc, labels + (extra or []), registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        self.info = Gauge("sensorfleet_component_info", "Constant 1; labels say which component this process is.", labels + ["component", "version"], registry=r)
        from sensorfleet import __version__

        self.info.labels(*values, self.component, __version__).set(1)
        # Simulator side
        self._published = counter("sensorfleet_readings_published_total", "Readings handed to the protocol (published, served or written).")
        self._dropped = counter("sensorfleet_readings_dropped_total", "Readings a simulator could not send, by reason.", ["reason"])
        self._devices = gauge("sensorfleet_simulated_devices", "Devices this simulator simulates.")
        self._schedule_lag = gauge("sensorfleet_simulator_lag_seconds", "How far the simulator is behind its schedule.")
        self._queue = gauge("sensorfleet_publish_queue_messages", "Messages waiting to be sent or acknowledged.")
        # Collector side
        self._received = counter("sensorfleet_readings_received_total", "Valid readings received by a collector, duplicates included.")
        self._stored = counter("sensorfleet_readings_stored_total", "Readings written to the dataset.")
        self._lost = counter("sensorfleet_readings_lost_total", "Readings missing from a device's sequence (gaps in seq), and readings dropped at the buffer bound (see readings_unstored_total).")
        self._recovered = counter("sensorfleet_readings_late_total", "Readings first counted lost that arrived later (reordered); lost_total was corrected.")
        self._offline = counter("sensorfleet_readings_offline_total", "Readings missing between the dataset's last reading of a series and the first one received after a collector (re)start: never produced while the fleet was stopped; not counted lost.")
        self._offline_late = counter("sensorfleet_readings_offline_late_total", "Readings first counted offline that arrived later (held by a removed replica's session); offline_total - offline_late_total were never produced.")
        self._other_space = counter("sensorfleet_readings_other_space_total", "Readings stored whose seq and timestamp belong to another seed/epoch/interval than this collector's (a simulator of the spec before or after an edit, during the rollout): de-duplicated, not counted for loss.")
        self._duplicates = counter("sensorfleet_readings_duplicate_total", "Readings received again (same device, sensor and seq) and not stored twice.")
        self._malformed = counter("sensorfleet_payloads_malformed_total", "Payloads or readings that failed validation and were skipped, by reason.", ["reason"])
        self.latency = Histogram("sensorfleet_reading_latency_seconds", "End-to-end latency: source timestamp to stored in the dataset.", labels, buckets=LATENCY_BUCKETS, registry=r).labels(*values)
        self._batches = counter("sensorfleet_batch_writes_total", "Parquet files written.")
        self.batch_write_seconds = Histogram("sensorfleet_batch_write_duration_seconds", "Time to write one batch to the dataset.", labels, buckets=WRITE_BUCKETS, registry=r).labels(*values)
        self._batch_lag = gauge("sensorfleet_collector_batch_lag_seconds", "Age of the oldest reading received but not yet written.")
        # Backpressure (collectors/backpressure.py)
        self._buffered = gauge("sensorfleet_collector_buffered_readings", "Readings accepted but not yet written (open batch and batches waiting for the store).")
        self._buffer_limit = gauge("sensorfleet_collector_buffer_limit_readings", "spec.storage.maxBufferedReadings: at this many buffered readings the collector applies backpressure.")
        self._storage_degraded = gauge("sensorfleet_storage_degraded", "1 while writes to the dataset store fail (full disk, store unreachable, ...), else 0.")
        self._write_failures = counter("sensorfleet_storage_write_failures_total", "Failed attempts to write a batch to the dataset store, by reason.", ["reason"])
        self._unstored = counter("sensorfleet_readings_unstored_total", "Readings a collector dropped without storing them, by reason (also counted in lost_total).", ["reason"])
        # Both
        self._errors = counter("sensorfleet_errors_total", "Errors by kind (connection lost, write failed, ...).", ["component", "kind"])
        self._connected = gauge("sensorfleet_connected", "1 while connected to the broker / server / clients this component needs.")
        self._last_activity = gauge("sensorfleet_last_activity_timestamp_seconds", "Unix time of the last reading published or stored.")

        # Pre-bind label values so the hot paths do no label lookups.
        self.published = self._published.labels(*values)
        self.devices = self._devices.labels(*values)
        self.schedule_lag = self._schedule_lag.labels(*values)
        self.queue = self._queue.labels(*values)
        self.received = self._received.labels(*values)
        self.stored = self._stored.labels(*values)
        self.lost = self._lost.labels(*values)
        self.late = self._recovered.labels(*values)
        self.offline = self._offline.labels(*values)
        self.offline_late = self._offline_late.labels(*values)
        self.duplicates = self._duplicates.labels(*values)
        self.other_space = self._other_space.labels(*values)
        self.batches = self._batches.labels(*values)
        self.batch_lag = self._batch_lag.labels(*values)
        self.connected = self._connected.labels(*values)
        self.last_activity = self._last_activity.labels(*values)
        self.buffered = self._buffered.labels(*values)
        self.buffer_limit = self._buffer_limit.labels(*values)
        self.storage_degraded = self._storage_degraded.labels(*values)
        for reason in WRITE_FAILURE_REASONS:
            self._write_failures.labels(*values, reason)
        self._unstored.labels(*values, "storage_unavailable")
        for reason in MALFORMED_REASONS:
            self._malformed.labels(*values, reason)
        self._dropped.labels(*values, "queue_full")

    def malformed(self, reason: str) -> Counter:
        return self._malformed.labels(self.fleet, self.protocol, reason)

    def dropped(self, reason: str) -> Counter:
        return self._dropped.labels(self.fleet, self.protocol, reason)

    def write_failures(self, reason: str) -> Counter:
        return self._write_failures.labels(self.fleet, self.protocol, reason)

    def unstored(self, reason: str) -> Counter:
        return self._unstored.labels(self.fleet, self.protocol, reason)

    def error(self, kind: str) -> Counter:
        return self._errors.labels(self.fleet, self.protocol, self.component, kind)

    def watch(self, thread: threading.Thread) -> threading.Thread:
        """Count `thread` as vital: /healthz answers 503 once it has ended."""
        self.workers[thread.name] = thread
        return thread

    def dead_workers(self) -> list[str]:
        return [name for name, thread in self.workers.items() if thread.ident is not None and not thread.is_alive()]

    def serve(self, port: int, host: str, port_file: str | None) -> int:
        """Serve /metrics, /healthz and /readyz and return the port; port 0 means do not serve,
        unless `port_file` is given: then the kernel picks a free port and its number is written
        to that file once the socket listens (how `sensorfleet run` learns it: a port chosen by
        the parent and bound later by the child can be taken meanwhile, e.g. by a second run).
        No defaults: a component that left `port_file` out would keep `sensorfleet run` waiting
        for a file that never comes. A port in use raises OSError naming it."""
        if not port and not port_file:
            return 0
        metrics_app = make_wsgi_app(self.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/healthz":
                dead = self.dead_workers()
                body = (f"dead: {', '.join(dead)}\n" if dead else "ok\n").encode()
                start_response("503 Service Unavailable" if dead else "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
                return [body]
            if environ.get("PATH_INFO") == "/readyz":
                report = self.readiness() if self.readiness is not None else {"storage": "ok"}
                body = (json.dumps(report) + "\n").encode()
                start_response("503 Service Unavailable" if report.get("storage") == "degraded" else "200 OK",
                               [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
                return [body]
            return metrics_app(environ, start_response)

        try:
            server = make_server(host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics port {host}:{port} is not available ({exc.strerror})") from None
        bound = int(server.server_address[1])
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        if port_file:
            # Written whole then renamed: a reader never sees a half-written number.
            partial = f"{port_file}.partial"
            with open(partial, "w") as out:
                out.write(f"{bound}\n")
            os.replace(partial, port_file)
        return bound


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *_args) -> None:  # every scrape would be a log line
        pass
