"""MQTT collector for `payloadFormat: sparkplugB`: a Sparkplug B host application.

It is MqttCollector (collectors/mqtt.py) with another decoder. Delivery, backpressure and health
come from there unchanged:
- a persistent session at QoS 1, with acknowledgements only once the batch is written, on the
  connection the message came on;
- paho's network thread only queues what arrives, and a writer thread reads it;
- no message is taken while `spec.storage.maxBufferedReadings` readings wait to be written;
- /healthz watches the threads.

What differs is the topic, `spBv1.0/<fleet>/#`, and `handle`. Every message goes through the pure
state machine sensorfleet.sparkplug.host, which turns births, data and deaths into reading
documents for the same CollectorSink, so loss is accounted as for JSON.

It asks an edge node for a rebirth (NCMD `Node Control/Rebirth`) in two cases: the node's `seq`
jumps, or a device sends data before any DBIRTH. Such data is typically the unacknowledged backlog
that a restarted collector gets from its persistent session. It is held back, unacknowledged,
until the device's DBIRTH tells what its aliases mean, and then read before the birth's own
values. After PARK_SECONDS without a birth it is refused (`unknown_device`) and acknowledged.

With `sparkplug.primaryHostId` it is that primary host. Its STATE (`spBv1.0/STATE/<id>`,
retained) says online while it is connected, and its Last Will says offline, so edge nodes
publish only while someone collects.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sensorfleet.collectors.mqtt import MqttCollector
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import MalformedReading
from sensorfleet.runtime import BrokerAddress, CollectorOptions, broker_address, stop_event_on_signals
from sensorfleet.sparkplug.host import HostState, Outcome, UnknownDevice
from sensorfleet.sparkplug.payload import NAMESPACE, rebirth_request, state_topic

log = logging.getLogger(__name__)
COUNTED_EVENTS = {"seq_gap": "sparkplug_seq_gap", "stale_ndeath": "sparkplug_stale_ndeath"}
MAX_PARKED = 20_000  # messages held back for a DBIRTH, in all
PARK_SECONDS = 60.0


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """A Sparkplug 3.0 STATE message (JSON, retained)."""
    return json.dumps({"online": online, "timestamp": timestamp_ms}).encode()


@dataclass
class _Parked:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int
    received_at: datetime
    since: float


class SparkplugCollector(MqttCollector):
    def __init__(self, opts: CollectorOptions, broker: BrokerAddress, metrics: FleetMetrics):
        super().__init__(opts, broker, metrics)
        self.fleet = opts.fleet.name
        self.topic = f"{NAMESPACE}/{self.fleet}/#"  # never shared: a host must see every birth
        self.subscriber = None  # paho: a host needs its Will (STATE offline) and STATE publishes
        self.sink.count_gaps = True
        self.host_id = opts.fleet.spec.protocols.mqtt.sparkplug.primary_host_id
        self.host = HostState(self.fleet)
        self.events: dict[str, int] = {}
        # (edge node, device) -> data before its DBIRTH; writer thread only. In the order the keys
        # came (a key's first message is its oldest), so expiry looks only at the oldest ones, and
        # with a running count: a flood of data for unknown devices costs O(1) a message.
        self._parked: dict[tuple[str, str], list[_Parked]] = {}
        self._parked_count = 0
        self._online_ms = int(time.time() * 1000)
        if self.host_id is not None:
            self.client.will_set(state_topic(self.host_id), state_payload(False, self._online_ms), qos=1, retain=True)

    def _on_connect(self, client, userdata, flags, reason_code, props) -> None:
        super()._on_connect(client, userdata, flags, reason_code, props)
        if not reason_code.is_failure and self.host_id is not None:
            client.publish(state_topic(self.host_id), state_payload(True, self._online_ms), qos=1, retain=True)
            log.info("primary host %r online", self.host_id)

    # --- writer thread --------------------------------------------------------------------------
    def handle(self, item: tuple) -> None:
        payload, topic, mid, qos, connection, received_at = item
        self._intake_out += len(payload)  # as MqttCollector.handle: else the intake's byte bound stalls the network thread
        self._expire_parked()
        if not topic.startswith(f"{NAMESPACE}/STATE/") and self._read(topic, payload, mid, qos, connection, received_at):
            return  # held back, not acknowledged until read
        self._unacked.append((mid, qos, connection))
        if not self.sink.pending():  # as MqttCollector: nothing left in the open batch
            acks, self._unacked = self._unacked, []
            self.sink.when_written(lambda: self._ack(acks))
        elif self.sink.pending() >= self.sink.batch_size:
            self.flush_and_ack()

    def _read(self, topic: str, payload: bytes, mid: int, qos: int, connection: int, received_at: datetime) -> bool:
        """One message into the sink; True if it was held back for its device's DBIRTH."""
        if len(payload) > self.max_payload:  # what the JSON path refuses too, before any parsing
            self.sink.reject("too_large", f"topic {topic}: payload of {len(payload):,} bytes is larger than the limit of {self.max_payload:,}")
            return False
        try:
            out = self.host.handle(topic, payload, time.monotonic())
        except UnknownDevice as exc:
            if exc.rebirth is not None:
                self.request_rebirth(exc.rebirth)
            if self._parked_count < MAX_PARKED:
                parts = topic.split("/")
                self._parked.setdefault((parts[3], parts[4]), []).append(_Parked(topic, payload, mid, qos, connection, received_at, time.monotonic()))
                self._parked_count += 1
                return True
            self.sink.reject(exc.kind, str(exc))
            return False
        except MalformedReading as exc:
            self.sink.reject(exc.kind, str(exc))
            return False
        if "dbirth" in out.events:
            parts = topic.split("/")
            held = self._parked.pop((parts[3], parts[4]), [])
            self._parked_count -= len(held)
            if held:
                log.info("reading %d held-back messages of %s/%s now that its DBIRTH came", len(held), parts[3], parts[4])
            # The held-back data is older than the birth: into the sink first, in the order it came,
            # so its seqs follow the stored ones and the birth's values come after them.
            for parked in held:
                try:
                    self._apply(self.host.handle(parked.topic, parked.payload, time.monotonic(), replay=True), parked.received_at)
                except MalformedReading as exc:
                    self.sink.reject(exc.kind, str(exc))
            self._unacked.extend((p.mid, p.qos, p.connection) for p in held)
        self._apply(out, received_at)
        return False

    def _expire_parked(self) -> None:
        now = time.monotonic()
        expired = list(itertools.takewhile(lambda key: now - self._parked[key][0].since > PARK_SECONDS, self._parked))
        for key in expired:
            held = self._parked.pop(key)
            self._parked_count -= len(held)
            for p in held:
                self.sink.reject("unknown_device", f"topic {p.topic}: no DBIRTH for this device within {PARK_SECONDS:.0f} s")
                self._unacked.append((p.mid, p.qos, p.connection))

    def _apply(self, out: Outcome, received_at: datetime) -> None:
        for event in out.events:
            self.events[event] = self.events.get(event, 0) + 1
            if event in COUNTED_EVENTS:
                self.metrics.error(COUNTED_EVENTS[event]).inc()
        for exc in out.rejected:
            self.sink.reject(exc.kind, str(exc))
        for device, sensor, last_silent in out.resumed:
            self.sink.skip_to(device, sensor, last_silent)
        if out.documents:  # node messages (NBIRTH, NDEATH, NCMD) carry no readings
            self.sink.accept_documents(out.documents, received_at)
        if out.rebirth is not None:
            self.request_rebirth(out.rebirth)

    def request_rebirth(self, edge_node: str) -> None:
        log.info("asking edge node %s for a rebirth", edge_node)
        self.client.publish(f"{NAMESPACE}/{self.fleet}/NCMD/{edge_node}", rebirth_request(int(time.time() * 1000)), qos=0)

    def drain(self, done: threading.Event) -> None:
        super().drain(done)  # everything received is written and acknowledged
        if self.host_id is not None:  # going away on purpose: say so (the Will covers a crash)
            self.client.publish(state_topic(self.host_id), state_payload(False, self._online_ms), qos=1, retain=True)

    def run(self, stop: threading.Event, duration: float | None) -> int:
        code = super().run(stop, duration)
        log.info("SPARKPLUG %s", json.dumps({"host": self.host_id, "messages": self.events}))
        return code


def run(opts: CollectorOptions) -> int:
    broker = broker_address(opts.broker_url, opts.fleet, opts.tls_ca, opts.tls_cert, opts.tls_key)
    metrics = FleetMetrics(opts.fleet.name, "mqtt", "collector")
    collector = SparkplugCollector(opts, broker, metrics)
    metrics.serve(opts.metrics_port, opts.metrics_host, opts.metrics_port_file)
    stop = stop_event_on_signals()
    return collector.run(stop, opts.duration)
