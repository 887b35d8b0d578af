"""MQTT collector for `payloadFormat: sparkplugB`: a Sparkplug B host application (paho-mqtt).

It subscribes to `spBv1.0/<fleet>/#`, reads every message through the pure state machine
sensorfleet.sparkplug.host (births, data and deaths -> reading documents) and hands the documents
to the same CollectorSink as the JSON path: validation, de-duplication, loss accounting, batches.
Delivery and backpressure are MqttCollector's: a persistent session, QoS 1, messages acknowledged
once their batch is written by the sink's storage thread (on the connection they came on), and no
message taken while `spec.storage.maxBufferedReadings` readings wait to be written.

It asks an edge node for a rebirth (NCMD `Node Control/Rebirth`) when the node's `seq` jumps or a
device sends data before any DBIRTH. Such data (typically the unacknowledged backlog a restarted
collector gets from its persistent session) is held back, unacknowledged, until the device's
DBIRTH tells what its aliases mean, and then read; after PARK_SECONDS without a birth it is refused
(`unknown_device`) and acknowledged. With `sparkplug.primaryHostId` it is that primary host: its
STATE (`spBv1.0/STATE/<id>`, retained) says online while it is connected, and its Last Will says
offline, so edge nodes publish only while someone collects.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import paho.mqtt.client as mqtt

from sensorfleet.collectors.base import CollectorSink, SequenceSpace
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import MalformedReading
from sensorfleet.runtime import BrokerAddress, CollectorOptions, mqtt_client, parse_broker_url, stop_event_on_signals
from sensorfleet.sparkplug.host import HostState, Outcome, UnknownDevice
from sensorfleet.sparkplug.payload import NAMESPACE, rebirth_request, state_topic

log = logging.getLogger(__name__)
COUNTED_EVENTS = {"seq_gap": "sparkplug_seq_gap", "stale_ndeath": "sparkplug_stale_ndeath"}
MAX_PARKED = 20_000  # messages held back for a DBIRTH, in all
PARK_SECONDS = 60.0


@dataclass
class _Parked:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int
    received_at: datetime
    since: float


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """A Sparkplug 3.0 STATE message (JSON, retained)."""
    return json.dumps({"online": online, "timestamp": timestamp_ms}).encode()


class SparkplugCollector:
    def __init__(self, opts: CollectorOptions, broker: BrokerAddress, metrics: FleetMetrics):
        fleet = opts.fleet
        spec = fleet.spec
        self.fleet = fleet.name
        self.broker = broker
        self.metrics = metrics
        self.topic = f"{NAMESPACE}/{fleet.name}/#"
        self.host_id = spec.protocols.mqtt.sparkplug.primary_host_id
        self.client_id = opts.client_id or f"{fleet.name}-mqtt-collector-0"
        self.sink = CollectorSink(
            fleet.name, "mqtt", opts.data_url, metrics,
            batch_size=spec.collector.batch_size, flush_interval=spec.collector.flush_interval, writer_id=self.client_id,
            buffer_limit=spec.storage.max_buffered_readings, redelivered=True,
        )
        self.sequence_space = SequenceSpace.of(spec, "mqtt")
        self.host = HostState(fleet.name)
        self.events: dict[str, int] = {}
        self._unacked: list[tuple[int, int, int]] = []  # (mid, qos, connection)
        self._connection = 0  # packet ids belong to one connection
        self._stop = threading.Event()
        self._parked: dict[tuple[str, str], list[_Parked]] = {}  # (edge node, device) -> data before its DBIRTH
        self._lock = threading.Lock()
        self.client = mqtt_client(broker, self.client_id, clean_session=False, manual_ack=True)
        self._online_ms = int(time.time() * 1000)
        if self.host_id is not None:
            self.client.will_set(state_topic(self.host_id), state_payload(False, self._online_ms), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _on_connect(self, client, _userdata, flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self.broker.url, reason_code)
            self.metrics.error("connect_refused").inc()
            return
        client.subscribe(self.topic, qos=1)
        if self.host_id is not None:
            client.publish(state_topic(self.host_id), state_payload(True, self._online_ms), qos=1, retain=True)
        self.metrics.connected.set(1)
        log.info("connected to %s (session present: %s), Sparkplug host%s, subscribed to %s", self.broker.url, flags.session_present, f" {self.host_id!r} (primary)" if self.host_id else "", self.topic)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        self.metrics.connected.set(0)
        with self._lock:
            self._connection += 1
            self._unacked.clear()  # the broker redelivers them; the tracker knows the repeats
            self._parked.clear()  # unacknowledged too: redelivered as well
        if reason_code != 0:
            log.warning("lost the broker %s (%s); reconnecting with back-off", self.broker.url, reason_code)
            self.metrics.error("connection_lost").inc()

    def _on_message(self, client, _userdata, message: mqtt.MQTTMessage) -> None:
        if not self.sink.wait_for_room(self._stop):
            return  # stopping: not taken, not acknowledged; the broker redelivers it
        received_at = datetime.now(timezone.utc)
        if message.topic.startswith(f"{NAMESPACE}/STATE/") or not self._handle(client, message, received_at):
            with self._lock:
                self._unacked.append((message.mid, message.qos, self._connection))
        if self.sink.pending() >= self.sink.batch_size:
            self.flush_and_ack()

    def _handle(self, client, message: mqtt.MQTTMessage, received_at: datetime) -> bool:
        """Read one message into the sink; True if it was held back for its device's DBIRTH."""
        topic = message.topic
        try:
            out = self.host.handle(topic, message.payload, time.monotonic())
        except UnknownDevice as exc:
            log.debug("holding back %s until its device's DBIRTH", topic)
            if exc.rebirth is not None:
                self.request_rebirth(client, exc.rebirth)
            key = (topic.split("/")[3], topic.split("/")[4])
            with self._lock:
                if sum(len(v) for v in self._parked.values()) < MAX_PARKED:
                    self._parked.setdefault(key, []).append(_Parked(topic, message.payload, message.mid, message.qos, self._connection, received_at, time.monotonic()))
                    return True
            self.sink.reject(exc.kind, str(exc))
            return False
        except MalformedReading as exc:
            self.sink.reject(exc.kind, str(exc))
            return False
        if "dbirth" in out.events:
            parts = topic.split("/")
            with self._lock:
                held = self._parked.pop((parts[3], parts[4]), [])
            if held:
                log.info("reading %d held-back messages of %s/%s now that its DBIRTH came", len(held), parts[3], parts[4])
            # The held-back data is older than the birth: into the sink first, in the order it came,
            # so its seqs follow the stored ones and the birth's values come after them.
            for parked in held:
                try:
                    self._apply(client, self.host.handle(parked.topic, parked.payload, time.monotonic(), replay=True), parked.received_at)
                except MalformedReading as exc:
                    self.sink.reject(exc.kind, str(exc))
            with self._lock:
                self._unacked.extend((p.mid, p.qos, p.connection) for p in held)
        self._apply(client, out, received_at)
        return False

    def _expire_parked(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [key for key, held in self._parked.items() if now - held[0].since > PARK_SECONDS]
            gone = [p for key in expired for p in self._parked.pop(key)]
            self._unacked.extend((p.mid, p.qos, p.connection) for p in gone)
        for p in gone:
            self.sink.reject("unknown_device", f"topic {p.topic}: no DBIRTH for this device within {PARK_SECONDS:.0f} s")

    def _apply(self, client, out: Outcome, received_at: datetime) -> None:
        for event in out.events:
            self.events[event] = self.events.get(event, 0) + 1
            if event in COUNTED_EVENTS:
                self.metrics.error(COUNTED_EVENTS[event]).inc()
        for device, sensor, last_silent in out.resumed:
            self.sink.skip_to(device, sensor, last_silent)
        if out.documents:  # node messages (NBIRTH, NDEATH, NCMD) carry no readings
            self.sink.accept_documents(out.documents, received_at)
        if out.rebirth is not None:
            self.request_rebirth(client, out.rebirth)

    def request_rebirth(self, client, edge_node: str) -> None:
        log.info("asking edge node %s for a rebirth", edge_node)
        client.publish(f"{NAMESPACE}/{self.fleet}/NCMD/{edge_node}", rebirth_request(int(time.time() * 1000)), qos=0)

    def flush_and_ack(self) -> None:
        """Hand the batch to the storage thread; its messages are acknowledged once it is written."""
        with self._lock:
            acks, self._unacked = self._unacked, []
        self.sink.flush(on_written=lambda: self._ack(acks))

    def _ack(self, acks: list[tuple[int, int, int]]) -> None:
        with self._lock:
            current = self._connection
        for mid, qos, connection in acks:
            if qos and connection == current:
                self.client.ack(mid, qos)

    def run(self, stop: threading.Event, duration: float | None) -> None:
        resumed = self.sink.resume_from_dataset(space=self.sequence_space)
        if resumed:
            log.info("resuming %d series from the dataset", resumed)
        self.sink.start_storage_thread()
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        deadline = time.monotonic() + duration if duration else None
        try:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                stop.wait(0.1)
                self.sink.update_lag()
                self._expire_parked()
                if self.sink.due():
                    self.flush_and_ack()
        finally:
            self._stop.set()
            self.flush_and_ack()
            self.sink.close()
            if self.host_id is not None:  # going away on purpose: say so (the Will covers a crash)
                self.client.publish(state_topic(self.host_id), state_payload(False, self._online_ms), qos=1, retain=True)
            time.sleep(0.1)
            self.client.disconnect()
            self.client.loop_stop()
            t = self.sink.totals
            log.info("stored %d readings (received %d, lost %d, duplicates %d, malformed %d); Sparkplug messages: %s", t["stored"], t["received"], t["lost"], t["duplicates"], t["malformed"], self.events)
            log.info("SUMMARY %s", json.dumps({"component": "collector", "protocol": "mqtt", "payload_format": "sparkplugB", **t, "sparkplug": self.events}))


def run(opts: CollectorOptions) -> int:
    broker = parse_broker_url(opts.broker_url or "mqtt://127.0.0.1:1883")
    metrics = FleetMetrics(opts.fleet.name, "mqtt", "collector")
    metrics.serve(opts.metrics_port, opts.metrics_host)
    stop = stop_event_on_signals()
    SparkplugCollector(opts, broker, metrics).run(stop, opts.duration)
    return 0
