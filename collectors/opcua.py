"""OPC UA collector: browses each target's `SensorFleet` folder, subscribes to every sensor
variable with monitored items created in batches, reconnects and resubscribes after a server
restart, and hands every value to the shared `CollectorSink` (dedupe, gap = lost, dataset, metrics).

The sequence number is recovered exactly from the value's source timestamp: the simulator stamps a
reading of device d at tick k with `epoch + (k + phase_d) * interval` (see `sensorfleet.signals`),
so `k = round((ts - epoch) / interval - phase_d)`. One notification carries everything; no pairing
with the `Seq` variable (a separate monitored item, delivered independently) is needed.

Threads: the asyncio loop only talks OPC UA; converting notifications into readings and writing
Parquet run in one sink thread fed through a deque, so a batch write never delays publish
responses (the server would otherwise queue, then drop, notifications).
"""

from __future__ import annotations

import asyncio
import gc
import collections
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from asyncua import Client, ua
from asyncua.common.subscription import Subscription

from sensorfleet.collectors.base import CollectorSink, SequenceSpace, drain_into_sink
from sensorfleet.collectors.opcua_events import ControlEventSink, subscribe_control_events
from sensorfleet.collectors.opcua_pki import ensure_client_certificate
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import Reading
from sensorfleet.runtime import CollectorOptions, stop_event_on_signals
from sensorfleet.signals import SignalModel, device_index

log = logging.getLogger("sensorfleet.collectors.opcua")

PROTOCOL = "opcua"
FOLDER = "SensorFleet"  # the simulator's folder under Objects (docs/protocols.md)
SEQ_VARIABLE = "Seq"
ENV_USERNAME = "SENSORFLEET_OPCUA_USERNAME"
ENV_PASSWORD = "SENSORFLEET_OPCUA_PASSWORD"
MONITORED_ITEMS_PER_REQUEST = 1000  # thousands in one request stall the server past timeouts
NODES_PER_BROWSE = 500
REQUEST_TIMEOUT = 30.0
HEALTH_CHECK_INTERVAL = 1.0
HEALTH_TIMEOUT = 15.0  # seconds a server may take to answer a status read before it counts as hung
MAX_BACKOFF = 2.0  # seconds between reconnect attempts at most: a restarted server is found quickly
# Monotonic time the seq of a value may sit off its device's tick grid, in ticks: values not
# written by the simulator (or with a foreign clock) are refused instead of guessed.
MAX_TICK_OFFSET = 0.01


@dataclass(frozen=True)
class SensorNode:
    device: str
    sensor: str
    unit: str
    phase: float


class SensorFleetSubscription(Subscription):
    """A subscription that hands raw data-change notifications to the collector.

    asyncua's stock delivery creates one task per notification (or a bounded queue that drops the
    oldest when full); at 10,000 values/s that costs more than the rest of the collector, and a
    dropped notification would be a silent loss. Here a publish response becomes one deque
    extend, no task and no drop."""

    def __init__(self, session: Any, params: ua.CreateSubscriptionParameters, target: TargetCollector):
        super().__init__(session, params, handler=None)
        self.target = target

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        self.last_publish_at = time.monotonic()
        data = publish_result.NotificationMessage.NotificationData
        if not data:
            return
        received_at = datetime.now(timezone.utc)
        nodes = self.target.nodes
        for notification in data:
            if isinstance(notification, ua.DataChangeNotification):
                self.target.intake.extend((nodes.get(item.ClientHandle), item.Value, received_at) for item in notification.MonitoredItems)
            elif isinstance(notification, ua.StatusChangeNotification):
                log.warning("%s: subscription status changed to %s; resubscribing", self.target.url, notification.Status)
                self.target.lost_subscription = True


class TargetCollector:
    """One OPC UA server: connect, browse, subscribe; on any failure start over."""

    def __init__(self, url: str, opts: CollectorOptions, intake: collections.deque, metrics: FleetMetrics):
        parts = urlsplit(url)
        if parts.scheme != "opc.tcp" or not parts.hostname:
            raise ValueError(f"target {url!r}: expected opc.tcp://host[:port]")
        self.url = url
        self.fleet = opts.fleet
        self.cfg = opts.fleet.spec.protocols.opcua
        self.intake = intake
        self.metrics = metrics
        self.model = SignalModel(opts.fleet.spec, opts.fleet.name, PROTOCOL)
        self.units = {s.name: s.unit for s in opts.fleet.spec.sensors}
        self.nodes: dict[int, SensorNode] = {}
        self.lost_subscription = False
        self.connected = False
        self.subscribed = 0
        # Device events (setpoint writes, InjectFault, Reset) go to the dataset's events table.
        self.events = ControlEventSink(opts.fleet.name, opts.data_url, PROTOCOL, opts.client_id)

    # --- connection -----------------------------------------------------------------------------
    async def _client(self) -> Client:
        # asyncua's own watchdog probes the server every `watchdog_intervall` with that same
        # timeout (1 s by default) and declares the connection lost when a busy server (creating
        # thousands of monitored items, or starved of CPU) answers later. A dead server closes the
        # TCP connection anyway; a hung one is caught by `watch`.
        client = Client(self.url, timeout=REQUEST_TIMEOUT, watchdog_intervall=HEALTH_TIMEOUT)
        client.session_timeout = 60_000
        if self.cfg.authentication == "username":
            username, password = os.environ.get(ENV_USERNAME), os.environ.get(ENV_PASSWORD)
            if not username or not password:
                raise ValueError(f"spec.protocols.opcua.authentication is 'username' but {ENV_USERNAME} / {ENV_PASSWORD} are not set (in Kubernetes: set spec.protocols.opcua.credentials)")
            client.set_user(username)
            client.set_password(password)
        if self.cfg.security == "Basic256Sha256":
            from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

            app_uri = f"urn:sensorfleet:{self.fleet.name}:opcua-collector"
            cert, key = await ensure_client_certificate(app_uri, self.fleet.name)
            client.application_uri = app_uri
            await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key), mode=ua.MessageSecurityMode.SignAndEncrypt)
        return client

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            client = None
            try:
                client = await self._client()
                await asyncio.wait_for(client.connect(), timeout=REQUEST_TIMEOUT)
                self.connected = True
                variables = await self.browse(client)
                await self.subscribe(client, variables)
                await subscribe_control_events(client, f"urn:sensorfleet:{self.fleet.name}", self.events)
                backoff = 0.5
                await self.watch(client, stop)
            except ValueError:
                raise
            except (OSError, asyncio.TimeoutError, ua.UaError, ConnectionError, RuntimeError) as exc:
                self.metrics.error("connection_lost" if self.connected else "connect_failed").inc()
                log.warning("%s: %s; reconnecting in %.1f s", self.url, exc or type(exc).__name__, backoff)
            finally:
                self.connected = False
                self.subscribed = 0
                if client is not None:
                    await _quietly_disconnect(client)
            if not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                except asyncio.TimeoutError:
                    pass
                backoff = min(MAX_BACKOFF, backoff * 2)

    async def watch(self, client: Client, stop: asyncio.Event) -> None:
        """Return when stopping; raise when the server stops answering (restart, crash)."""
        state = client.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus_State))
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=HEALTH_CHECK_INTERVAL)
            except asyncio.TimeoutError:
                pass
            if self.lost_subscription:
                self.lost_subscription = False
                raise ConnectionError("subscription lost")
            await asyncio.wait_for(state.read_value(), timeout=max(HEALTH_TIMEOUT, 3 * self.cfg.publishing_interval))

    # --- address space --------------------------------------------------------------------------
    async def browse(self, client: Client) -> list[tuple[ua.NodeId, str, str]]:
        """(node id, device, sensor) of every sensor variable under Objects/SensorFleet."""
        started = time.perf_counter()
        ns = await client.get_namespace_index(f"urn:sensorfleet:{self.fleet.name}")
        folder = await client.nodes.objects.get_child(f"{ns}:{FOLDER}")
        devices = await folder.get_children(refs=ua.ObjectIds.Organizes, nodeclassmask=ua.NodeClass.Object)
        names = {d.nodeid: None for d in devices}
        found: list[tuple[ua.NodeId, str, str]] = []
        ids = list(names)
        for start in range(0, len(ids), NODES_PER_BROWSE):
            chunk = ids[start : start + NODES_PER_BROWSE]
            params = ua.BrowseParameters()
            params.View = ua.ViewDescription()
            params.RequestedMaxReferencesPerNode = 0
            params.NodesToBrowse = [
                ua.BrowseDescription(NodeId=n, BrowseDirection=ua.BrowseDirection.Forward, ReferenceTypeId=ua.NodeId(ua.ObjectIds.HierarchicalReferences),
                                     IncludeSubtypes=True, NodeClassMask=ua.NodeClass.Variable, ResultMask=ua.BrowseResultMask.All)
                for n in chunk
            ]
            results = await client.uaclient.browse(params)
            device_names = await _browse_names(client, chunk)
            for device, result in zip(device_names, results):
                for ref in result.References:
                    sensor = ref.BrowseName.Name
                    if sensor == SEQ_VARIABLE or ref.TypeDefinition != ua.NodeId(ua.ObjectIds.AnalogItemType):
                        continue
                    found.append((ref.NodeId.to_nodeid() if hasattr(ref.NodeId, "to_nodeid") else ref.NodeId, device, sensor))
        log.info("%s: browsed %d devices, %d sensor variables in %.1f s", self.url, len(ids), len(found), time.perf_counter() - started)
        return found

    async def subscribe(self, client: Client, variables: list[tuple[ua.NodeId, str, str]]) -> None:
        interval = self.model.interval
        publishing = self.cfg.publishing_interval
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = publishing * 1000.0
        params.RequestedMaxKeepAliveCount = max(3, math.ceil(5.0 / publishing))
        params.RequestedLifetimeCount = params.RequestedMaxKeepAliveCount * 4
        params.MaxNotificationsPerPublish = 0  # no limit: the server sends all it has each interval
        params.PublishingEnabled = True
        params.Priority = 0
        subscription = SensorFleetSubscription(client.uaclient.session, params, self)
        await subscription.init()
        # A value changes every `interval`; the queue holds what ten publishing intervals
        # accumulate, so no change is overwritten while the server is late to publish (it is,
        # while it creates thousands of monitored items or is starved of CPU).
        queue_size = max(4, math.ceil(10 * publishing / interval) + 1)
        phases = self.model.phase(np.array([device_index(d) for _, d, _ in variables], dtype=np.int64)).tolist() if variables else []
        handle_base = len(self.nodes) + 1
        self.nodes.clear()
        trigger = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp)
        for start in range(0, len(variables), MONITORED_ITEMS_PER_REQUEST):
            items = []
            for offset, (nodeid, device, sensor) in enumerate(variables[start : start + MONITORED_ITEMS_PER_REQUEST]):
                handle = handle_base + start + offset
                self.nodes[handle] = SensorNode(device, sensor, self.units.get(sensor, "1"), phases[start + offset])
                # StatusValueTimestamp: a stuck-at run repeats the value; only the new source
                # timestamp tells the server it is a new reading.
                parameters = ua.MonitoringParameters(ClientHandle=handle, SamplingInterval=0.0, QueueSize=queue_size, DiscardOldest=True, Filter=trigger)
                items.append(ua.MonitoredItemCreateRequest(ItemToMonitor=ua.ReadValueId(NodeId=nodeid, AttributeId=ua.AttributeIds.Value),
                                                           MonitoringMode=ua.MonitoringMode.Reporting, RequestedParameters=parameters))
            request = ua.CreateMonitoredItemsParameters(SubscriptionId=subscription.subscription_id, ItemsToCreate=items, TimestampsToReturn=ua.TimestampsToReturn.Both)
            results = await client.uaclient.create_monitored_items(request)
            failed = [r.StatusCode for r in results if not r.StatusCode.is_good()]
            if failed:
                self.metrics.error("monitored_item_failed").inc(len(failed))
                log.warning("%s: %d monitored items refused (first: %s)", self.url, len(failed), failed[0])
            self.subscribed += len(results) - len(failed)
        log.info("%s: subscribed to %d variables (publishing interval %.2f s, queue size %d)", self.url, self.subscribed, publishing, queue_size)
        gc.freeze()  # long-lived state: keep full GC passes short

    # --- values -> readings (sink thread) -------------------------------------------------------
    def to_reading(self, node: SensorNode, value: ua.DataValue) -> Reading | tuple[str, str]:
        """A Reading, or (kind, detail) naming why the value is refused."""
        ts = value.SourceTimestamp
        if ts is None:
            return "bad_ts", f"{node.device}/{node.sensor}: value without source timestamp"
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=timezone.utc)
        position = (ts.timestamp() - self.model.epoch) / self.model.interval - node.phase
        seq = round(position)
        if abs(position - seq) > MAX_TICK_OFFSET or not 0 <= seq < 2**63:
            return "bad_seq", f"{node.device}/{node.sensor}: source timestamp {ts.isoformat()} is off the device's tick schedule"
        status = value.StatusCode
        code = status.value if status is not None else 0
        severity = code >> 30  # 0 good, 1 uncertain, 2/3 bad (Part 4, 7.39)
        if severity >= 2:
            return Reading(self.fleet.name, PROTOCOL, node.device, node.sensor, None, node.unit, ts, seq, "bad", "dropout")
        raw = value.Value.Value if value.Value is not None else None
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            return "bad_value", f"{node.device}/{node.sensor}: value {raw!r:.40} is not a number"
        try:
            number = float(raw)  # an Int64 / UInt64 beyond a double's range raises here
        except OverflowError:
            return "out_of_range", f"{node.device}/{node.sensor}: value {raw!r:.40} does not fit a double"
        if not math.isfinite(number):
            return "non_finite", f"{node.device}/{node.sensor}: value {number} is not a finite number"
        if severity == 1:
            return Reading(self.fleet.name, PROTOCOL, node.device, node.sensor, number, node.unit, ts, seq, "uncertain", "stuck")
        return Reading(self.fleet.name, PROTOCOL, node.device, node.sensor, number, node.unit, ts, seq, "good", None)


async def _browse_names(client: Client, nodeids: list[ua.NodeId]) -> list[str]:
    params = ua.ReadParameters()
    params.NodesToRead = [ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.BrowseName) for n in nodeids]
    results = await client.uaclient.read(params)
    return [r.Value.Value.Name for r in results]


async def _quietly_disconnect(client: Client) -> None:
    try:
        await asyncio.wait_for(client.disconnect(), timeout=5)
    except Exception:  # noqa: BLE001 -- the server is gone or going; nothing to tell it
        try:
            client.disconnect_socket()
        except Exception:  # noqa: BLE001
            pass


def handle_item(sink: CollectorSink, target: TargetCollector, item: tuple) -> None:
    """One data-change notification -> a reading in the sink, or a counted refusal."""
    node, value, received_at = item
    if node is None:
        sink.reject("unknown_handle", "notification for a monitored item this collector did not create")
        return
    result = target.to_reading(node, value)
    if isinstance(result, Reading):
        sink.accept(result, received_at)
    else:
        sink.reject(*result)


def sink_worker(sink: CollectorSink, targets: list[TargetCollector], intake: collections.deque, done: threading.Event) -> None:
    """Turn notifications into readings and store them, until `done` and drained."""
    target = targets[0]  # every target serves the same fleet: one schedule
    drain_into_sink(sink, intake, done, lambda item: handle_item(sink, target, item), flush_check_every=5000)


async def collect(targets: list[TargetCollector], metrics: FleetMetrics, stop_flag: threading.Event, duration: float | None) -> None:
    stop = asyncio.Event()
    deadline = time.monotonic() + duration if duration else math.inf

    async def watch_stop() -> None:
        while not stop_flag.is_set() and time.monotonic() < deadline and not metrics.dead_workers():
            metrics.connected.set(1 if all(t.subscribed for t in targets) else 0)
            await asyncio.sleep(0.2)
        stop.set()

    try:
        await asyncio.gather(watch_stop(), *(t.run(stop) for t in targets))
    finally:
        metrics.connected.set(0)
        await asyncio.gather(*(t.events.drain() for t in targets))


def run(opts: CollectorOptions) -> int:
    """Collect from every OPC UA server in `opts.targets` until SIGINT/SIGTERM or `opts.duration`."""
    stop = stop_event_on_signals()
    # asyncua logs whole publish responses at INFO; at thousands of values per second that alone
    # would cost a core.
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    if not opts.targets:
        log.error("no OPC UA targets given (e.g. --target opc.tcp://127.0.0.1:4840)")
        return 2
    fleet = opts.fleet
    metrics = FleetMetrics(fleet.name, PROTOCOL, "collector")
    sink = CollectorSink(fleet.name, PROTOCOL, opts.data_url, metrics, fleet.spec.collector.batch_size, fleet.spec.collector.flush_interval,
                         writer_id=opts.client_id, buffer_limit=fleet.spec.storage.max_buffered_readings)
    intake: collections.deque = collections.deque()
    try:
        targets = [TargetCollector(url, opts, intake, metrics) for url in opts.targets]
        metrics.serve(opts.metrics_port, opts.metrics_host, opts.metrics_port_file)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2 if isinstance(exc, ValueError) else 1
    resumed = sink.resume_from_dataset(space=SequenceSpace.of(fleet.spec, PROTOCOL))
    if resumed:
        log.info("resuming %d series from the dataset", resumed)
    sink.start_storage_thread()  # bounded buffer; beyond it readings are counted lost (backpressure.py)
    done = threading.Event()
    worker = metrics.watch(threading.Thread(target=sink_worker, args=(sink, targets, intake, done), name="opcua-sink", daemon=True))
    worker.start()
    code = 0
    try:
        asyncio.run(collect(targets, metrics, stop, opts.duration))
    except ValueError as exc:
        log.error("%s", exc)
        code = 2
    finally:
        died = metrics.dead_workers()  # before `done`: from then on the worker ends by design
        done.set()
        worker.join(timeout=60)
    if died and code == 0:
        log.error("thread(s) %s ended unexpectedly; exiting so the collector is restarted", ", ".join(died))
        metrics.error("worker_died").inc()
        code = 1
    log.info("SUMMARY %s", json.dumps(sink.summary()))
    return code
