"""Collector of one third-party OPC UA server (`spec.sources.opcua[]`): resolve the listed node ids
and browse paths, subscribe to their values, and store every data change as a reading of the
device and sensor the spec gives the node, `seq` null.

Nothing here knows SensorFleet's simulator: the source timestamp is the server's (its server
timestamp when it sends none, the time of receipt when neither), a Bad status is stored as
quality `bad` with no value, Uncertain as `uncertain`; a value that is not a number (a string, a
structure) is refused and counted (`wrong_type`), a Boolean is stored as 0 / 1. Without sequence
numbers there is no loss accounting: the collector counts notifications received, stored and
refused. It reconnects and resubscribes when the server restarts.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import threading
import time
from datetime import datetime, timezone

from asyncua import Client, ua

from sensorfleet.collectors.base import CollectorSink, drain_into_sink
from sensorfleet.collectors.foreign import third_party_reading
from sensorfleet.mapping import MappingError, number
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import MalformedReading, Reading
from sensorfleet.runtime import CollectorOptions, stop_event_on_signals
from sensorfleet.sources import OpcuaNode, OpcuaSource

log = logging.getLogger("sensorfleet.collectors.foreign_opcua")

ENV_USERNAME = "SENSORFLEET_OPCUA_USERNAME"
ENV_PASSWORD = "SENSORFLEET_OPCUA_PASSWORD"
REQUEST_TIMEOUT = 30.0
HEALTH_CHECK_INTERVAL = 1.0
MAX_BACKOFF = 5.0


def to_reading(fleet: str, node: OpcuaNode, value: ua.DataValue, received_at: datetime) -> Reading | MalformedReading:
    """One data change of a third-party variable -> a reading, or why it is refused."""
    ts = value.SourceTimestamp or value.ServerTimestamp or received_at
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    code = value.StatusCode.value if value.StatusCode is not None else 0
    severity = code >> 30  # 0 good, 1 uncertain, 2/3 bad (OPC UA Part 4, 7.39)
    if severity >= 2:
        return third_party_reading(fleet, "opcua", node.device, node.sensor, None, node.unit, ts)
    raw = value.Value.Value if value.Value is not None else None
    where = f"{node.node_id or node.browse_path}"
    try:
        result = float(raw) if isinstance(raw, bool) else number(raw, where)
    except MappingError as exc:
        return MalformedReading(exc.kind, str(exc))
    reading = third_party_reading(fleet, "opcua", node.device, node.sensor, result, node.unit, ts)
    if severity == 1:
        return Reading(reading.fleet, reading.protocol, reading.device, reading.sensor, reading.value, reading.unit, reading.ts, None, "uncertain", None)
    return reading


class _Handler:
    """asyncua calls this in its loop for every data change: hand it to the sink thread."""

    def __init__(self, collector: ForeignOpcuaCollector):
        self.collector = collector

    def datachange_notification(self, node, _value, data) -> None:
        self.collector.intake.append((self.collector.by_nodeid.get(node.nodeid), data.monitored_item.Value, datetime.now(timezone.utc)))

    def status_change_notification(self, status) -> None:
        log.warning("%s: subscription status changed to %s; resubscribing", self.collector.source.endpoint, status)
        self.collector.lost_subscription = True


class ForeignOpcuaCollector:
    def __init__(self, opts: CollectorOptions, source: OpcuaSource, metrics: FleetMetrics):
        self.fleet = opts.fleet.name
        self.source = source
        self.metrics = metrics
        self.intake: collections.deque = collections.deque()
        self.by_nodeid: dict[ua.NodeId, OpcuaNode] = {}
        self.subscribed = 0
        self.lost_subscription = False

    async def _client(self) -> Client:
        client = Client(self.source.endpoint, timeout=REQUEST_TIMEOUT)
        if self.source.authentication == "username":
            username, password = os.environ.get(ENV_USERNAME), os.environ.get(ENV_PASSWORD)
            if not username or not password:
                raise ValueError(f"spec.sources.opcua {self.source.name}: authentication is 'username' but {ENV_USERNAME} / {ENV_PASSWORD} are not set (in Kubernetes: set its credentials)")
            client.set_user(username)
            client.set_password(password)
        if self.source.security == "Basic256Sha256":
            from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

            from sensorfleet.collectors.opcua_pki import ensure_client_certificate

            client.application_uri = f"urn:sensorfleet:{self.fleet}:source-{self.source.name}"
            cert, key = await ensure_client_certificate(client.application_uri, self.fleet, f"source-{self.source.name}")
            await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key), mode=getattr(ua.MessageSecurityMode, self.source.security_mode))
        return client

    def _security_hint(self, exc: BaseException) -> str:
        """What to change in the source's spec when the server refused its security settings."""
        code = getattr(exc, "code", None)
        if code in (ua.StatusCodes.BadSecurityModeRejected, ua.StatusCodes.BadSecurityPolicyRejected):
            other = "None" if self.source.security == "Basic256Sha256" else "Basic256Sha256"
            return f" (spec.sources.opcua {self.source.name}: the server refused security {self.source.security}; try security: {other}, or securityMode)"
        if code in (ua.StatusCodes.BadUserAccessDenied, ua.StatusCodes.BadIdentityTokenRejected, ua.StatusCodes.BadIdentityTokenInvalid):
            return f" (spec.sources.opcua {self.source.name}: the server refused the {self.source.authentication} identity; check authentication and its credentials)"
        return ""

    async def resolve(self, client: Client) -> dict[ua.NodeId, OpcuaNode]:
        """The node id of every listed node; one that does not resolve is logged and skipped
        (tried again at the next connection: servers add nodes as they start)."""
        found: dict[ua.NodeId, OpcuaNode] = {}
        for node in self.source.nodes:
            try:
                if node.node_id is not None:
                    text = node.node_id
                    if text.startswith("nsu="):
                        uri, _, rest = text[4:].partition(";")
                        text = f"ns={await client.get_namespace_index(uri)};{rest}"
                    nodeid = ua.NodeId.from_string(text)
                else:
                    nodeid = (await client.nodes.objects.get_child(node.browse_path.split("/"))).nodeid
            except (ua.UaError, ValueError) as exc:
                self.metrics.error("node_unresolved").inc()
                log.warning("source %s: cannot resolve %s (%s); skipped until the next connection", self.source.name, node.node_id or node.browse_path, exc)
                continue
            found[nodeid] = node
        return found

    async def subscribe(self, client: Client) -> None:
        self.by_nodeid = await self.resolve(client)
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = self.source.publishing_interval * 1000.0
        params.RequestedMaxKeepAliveCount = max(3, math.ceil(5.0 / self.source.publishing_interval))
        params.RequestedLifetimeCount = params.RequestedMaxKeepAliveCount * 4
        params.MaxNotificationsPerPublish = 0
        params.PublishingEnabled = True
        params.Priority = 0
        subscription = await client.create_subscription(params, _Handler(self))
        nodes = [client.get_node(n) for n in self.by_nodeid]
        if not nodes:
            return
        # Every change between two publishes is kept (queue), none overwritten by the next.
        results = await subscription.subscribe_data_change(nodes, queuesize=100, sampling_interval=self.source.sampling_interval * 1000.0)
        failed = [(n, r) for n, r in zip(nodes, results) if isinstance(r, ua.StatusCode)]
        for node, status in failed:
            self.metrics.error("monitored_item_failed").inc()
            log.warning("source %s: the server refused to monitor %s: %s", self.source.name, node.nodeid.to_string(), status)
        self.subscribed = len(nodes) - len(failed)
        log.info("source %s: subscribed to %d of %d variables of %s", self.source.name, self.subscribed, len(self.source.nodes), self.source.endpoint)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            client = None
            connected = False
            try:
                client = await self._client()
                await asyncio.wait_for(client.connect(), timeout=REQUEST_TIMEOUT)
                connected = True
                self.metrics.connected.set(1)
                await self.subscribe(client)
                backoff = 0.5
                state = client.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus_State))
                while not stop.is_set():
                    try:
                        await asyncio.wait_for(stop.wait(), timeout=HEALTH_CHECK_INTERVAL)
                    except asyncio.TimeoutError:
                        pass
                    if self.lost_subscription:
                        self.lost_subscription = False
                        raise ConnectionError("subscription lost")
                    await asyncio.wait_for(state.read_value(), timeout=REQUEST_TIMEOUT)
            except ValueError:
                raise
            except (OSError, asyncio.TimeoutError, ua.UaError, ConnectionError, RuntimeError) as exc:
                self.metrics.error("connection_lost" if connected else "connect_failed").inc()
                log.warning("source %s: %s: %s%s; reconnecting in %.1f s", self.source.name, self.source.endpoint, exc or type(exc).__name__,
                            self._security_hint(exc), backoff)
            finally:
                self.metrics.connected.set(0)
                self.subscribed = 0
                if client is not None:
                    try:
                        await asyncio.wait_for(client.disconnect(), timeout=5)
                    except Exception:  # noqa: BLE001 -- the server is gone or going
                        client.disconnect_socket()
            if not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                except asyncio.TimeoutError:
                    pass
                backoff = min(MAX_BACKOFF, backoff * 2)

    def handle(self, sink: CollectorSink, item: tuple) -> None:
        node, value, received_at = item
        if node is None:
            sink.reject("unknown_handle", "notification for a node this collector did not subscribe to")
            return
        result = to_reading(self.fleet, node, value, received_at)
        if isinstance(result, Reading):
            sink.accept(result, received_at)
        else:
            sink.reject(result.kind, str(result))


async def _collect(collector: ForeignOpcuaCollector, stop_flag: threading.Event, duration: float | None) -> None:
    stop = asyncio.Event()
    deadline = time.monotonic() + duration if duration else math.inf

    async def watch_stop() -> None:
        while not stop_flag.is_set() and time.monotonic() < deadline and not collector.metrics.dead_workers():
            await asyncio.sleep(0.2)
        stop.set()

    await asyncio.gather(watch_stop(), collector.run(stop))


def run(opts: CollectorOptions) -> int:
    stop = stop_event_on_signals()
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    source = opts.fleet.spec.sources.named(opts.source or "")
    assert isinstance(source, OpcuaSource)  # the CLI checked the source's protocol
    fleet = opts.fleet
    metrics = FleetMetrics(fleet.name, "opcua", "collector")
    sink = CollectorSink(fleet.name, "opcua", opts.data_url, metrics, fleet.spec.collector.batch_size, fleet.spec.collector.flush_interval,
                         writer_id=opts.client_id or f"{fleet.name}-src-{source.name}", buffer_limit=fleet.spec.storage.max_buffered_readings)
    collector = ForeignOpcuaCollector(opts, source, metrics)
    metrics.serve(opts.metrics_port, opts.metrics_host, opts.metrics_port_file)
    sink.start_storage_thread()
    done = threading.Event()
    worker = metrics.watch(threading.Thread(target=drain_into_sink, args=(sink, collector.intake, done, lambda item: collector.handle(sink, item)),
                                            name="source-opcua-sink", daemon=True))
    worker.start()
    code = 0
    try:
        asyncio.run(_collect(collector, stop, opts.duration))
    except ValueError as exc:
        log.error("%s", exc)
        code = 2
    finally:
        died = metrics.dead_workers()
        done.set()
        worker.join(timeout=60)
    if died and code == 0:
        log.error("thread(s) %s ended unexpectedly; exiting so the collector is restarted", ", ".join(died))
        code = 1
    log.info("SUMMARY %s", json.dumps({**sink.summary(), "source": source.name}))
    return code
