"""MQTT collector: subscribe, validate, de-duplicate, account for gaps, write batches (paho-mqtt).

Nothing is lost across a collector restart: the session is persistent (clean_session=False with a
stable client id), the subscription is QoS 1, and messages are acknowledged only after the batch
holding them is written to the dataset (manual acks). A collector killed before writing gets the
unacknowledged messages again from the broker; a restarted collector seeds its de-duplication from
the dataset, so a message written but not yet acknowledged is not stored twice.

Backpressure (collectors/backpressure.py): batches are written by the sink's storage thread, which
retries while the store is full or unreachable. When `spec.storage.maxBufferedReadings` readings
wait to be written, the message callback waits for room before taking the next message: nothing
more is read or acknowledged, and the broker keeps the rest of the session's messages (QoS 1).
If that lasts longer than the keep-alive, the broker closes the connection; once there is room
again paho reconnects and the broker redelivers everything unacknowledged.

With `collectorReplicas > 1`, replicas share the load through a shared subscription
(`$share/<group>/...`, Mosquitto); a device's readings then spread over replicas, so each replica
cannot see gaps: gap accounting is switched off there (see README, "Loss accounting").

The network side speaks MQTT 5 (`mqtt_session.Mqtt5Subscriber`: packets decoded by the Rust
`mqtt5` codec, PUBACKs of a written batch sent in one write); against a broker that refuses MQTT 5
(the embedded amqtt broker) it falls back to paho at MQTT 3.1.1, with the same threads and acks.

Threads: the network loop only appends each message to a deque (it must keep answering the
broker: a loop busy writing Parquet misses keep-alives); the writer thread decodes, validates,
writes batches and then acknowledges what they hold. The process exits non-zero, and /healthz
fails, as soon as either thread has ended.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone

import paho.mqtt.client as mqtt

from sensorfleet.collectors.base import CollectorSink, SequenceSpace, drain_into_sink
from sensorfleet.collectors.mqtt_session import Mqtt5Subscriber
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import DEFAULT_MAX_PAYLOAD_BYTES, DecodedPayload, ReadingColumns, decode_json_columns, decode_json_payload
from sensorfleet.runtime import BrokerAddress, CollectorOptions, mqtt_client, broker_address, stop_event_on_signals
from sensorfleet.spec import SensorFleet

log = logging.getLogger(__name__)

# Bytes a reading may take on the wire at most (five names of MAX_NAME characters, escaped).
MAX_READING_BYTES = 2048
# Payloads from this size up (a gateway message of a dozen readings or more) try the columnar
# intake first; below it (a perDevice message is ~600 bytes) its fixed cost of ~20 Arrow calls
# outweighs what it saves per reading.
COLUMNAR_MIN_BYTES = 4096
# Payload bytes the intake deque holds at most before the network thread waits (backpressure as
# at the buffer bound): counting messages alone let 500-reading gateway messages pile up to
# hundreds of MiB while the writer thread was behind. ~0.3 s of 100,000 readings/s.
INTAKE_MAX_BYTES = 16 << 20
# Replica 0 retires the sessions of removed replicas only this long after it started: a replica
# still shutting down (Kubernetes gives a pod 30 s) would otherwise be taken over mid-batch.
ENV_RETIRE_AFTER = "SENSORFLEET_MQTT_RETIRE_AFTER_SECONDS"
RETIRE_AFTER_DEFAULT = 60.0


def subscription_topic(prefix: str, fleet: str, shared_group: str | None) -> str:
    topic = f"{prefix}/{fleet}/#"
    return f"$share/{shared_group}/{topic}" if shared_group else topic


def max_payload_bytes(fleet: SensorFleet) -> int:
    """The largest payload this fleet's publishers may send (a full gateway batch)."""
    return max(DEFAULT_MAX_PAYLOAD_BYTES, fleet.spec.protocols.mqtt.gateway_batch * MAX_READING_BYTES)


class MqttCollector:
    def __init__(self, opts: CollectorOptions, broker: BrokerAddress, metrics: FleetMetrics):
        fleet = opts.fleet
        spec = fleet.spec
        self.broker = broker
        self.metrics = metrics
        self.replicas = spec.protocols.mqtt.collector_replicas
        shared = self.replicas > 1
        group = f"{fleet.name}-collectors"
        self.topic = subscription_topic(spec.protocols.mqtt.topic_prefix, fleet.name, group if shared else None)
        # The subscription of the other mode, which a persistent session from before a change of
        # collectorReplicas (1 <-> N) still holds: left in place it delivers every reading twice.
        self.stale_topic = subscription_topic(spec.protocols.mqtt.topic_prefix, fleet.name, None if shared else group)
        self.client_id = opts.client_id or f"{fleet.name}-mqtt-collector-0"
        self.max_payload = max_payload_bytes(fleet)
        self.status_topics = spec.protocols.mqtt.connection_per_device
        self.columnar_min_bytes = COLUMNAR_MIN_BYTES
        self.columnar_messages = 0  # messages the columnar intake took whole (the rest went reading by reading)
        self.sink = CollectorSink(
            fleet.name, "mqtt", opts.data_url, metrics,
            batch_size=spec.collector.batch_size, flush_interval=spec.collector.flush_interval,
            writer_id=self.client_id, count_gaps=not shared,
            buffer_limit=spec.storage.max_buffered_readings, redelivered=True,
        )
        self.sequence_space = SequenceSpace.of(spec, "mqtt")
        # (payload, topic, mid, qos, connection, received_at), appended by paho's network thread.
        self.intake: collections.deque = collections.deque()
        # Bytes appended (network thread) and taken out (writer thread): each written by one thread
        # only, so their difference is what the intake holds without a lock.
        self._intake_in = 0
        self._intake_out = 0
        # (mid, qos, connection) of handled messages whose readings are not handed to storage yet;
        # only the writer thread touches it.
        self._unacked: list[tuple[int, int, int]] = []
        # Packet ids are per connection: a message received on an earlier connection is
        # redelivered by the broker, never acknowledged on the new one (the tracker drops the copy).
        self._connection = 0
        self._stop = threading.Event()
        # spec mqttVersion "3.1.1": paho from the start (the MQTT 5 subscriber never connects).
        self.subscriber: Mqtt5Subscriber | None = (None if opts.fleet.spec.protocols.mqtt.mqtt_version == "3.1.1" else
                                                  Mqtt5Subscriber(broker, self.client_id, metrics, self.topic, self._take, stale_topic=self.stale_topic))
        self._network_stop = threading.Event()
        # paho at MQTT 3.1.1, used if the spec says so or the broker refuses MQTT 5.
        self.client = mqtt_client(broker, self.client_id, clean_session=False, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _on_connect(self, client, _userdata, flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self.broker.url, reason_code)
            self.metrics.error("connect_refused").inc()
            return
        self._connection += 1
        # Subscribe on every connect: a broker restarted without persistence forgot the session.
        # The broker handles the two packets in order, so no reading finds neither subscription.
        client.subscribe(self.topic, qos=1)
        client.unsubscribe(self.stale_topic)
        self.metrics.connected.set(1)
        log.info("connected to %s (session present: %s), subscribed to %s", self.broker.url, flags.session_present, self.topic)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        self.metrics.connected.set(0)
        self._connection += 1  # acks of messages received so far would name the wrong packets
        if reason_code != 0:
            log.warning("lost the broker %s (%s); reconnecting with back-off", self.broker.url, reason_code)
            self.metrics.error("connection_lost").inc()

    def _on_message(self, _client, _userdata, message: mqtt.MQTTMessage) -> None:
        self._take((message.payload, message.topic, message.mid, message.qos, self._connection, datetime.now(timezone.utc)))

    def _take(self, item: tuple) -> None:
        """Runs in the network thread (paho's or the MQTT 5 loop's): nothing here may raise. It
        blocks only at the buffer bound (backpressure.py): nothing more is read or acknowledged,
        the broker keeps the rest."""
        while len(self.intake) + self.sink.buffered() >= self.sink.buffer_limit or self._intake_in - self._intake_out >= INTAKE_MAX_BYTES:
            if self._stop.wait(0.01):
                return  # stopping: not taken, not acknowledged; the broker redelivers it
        self._intake_in += len(item[0])
        self.intake.append(item)

    def _decode(self, payload: bytes, topic: str) -> DecodedPayload:
        # A device's birth or Last Will (connectionPerDevice) carries no reading: acknowledged, not stored.
        if self.status_topics and topic.endswith("/status"):
            return DecodedPayload([], [])
        return decode_json_payload(payload, self.max_payload)

    def _decode_columns(self, payload: bytes, topic: str) -> ReadingColumns | None:
        if len(payload) < self.columnar_min_bytes or (self.status_topics and topic.endswith("/status")):
            return None
        return decode_json_columns(payload, self.max_payload)

    # --- writer thread --------------------------------------------------------------------------
    def handle(self, item: tuple) -> None:
        """Decode, validate and batch one message; acknowledge it once its readings are written.
        A large message with nothing irregular in it goes in whole, as columns; any other goes
        reading by reading, so every refusal, gap, duplicate and late reading is counted."""
        payload, topic, mid, qos, connection, received_at = item
        self._intake_out += len(payload)
        columns = self._decode_columns(payload, topic)
        if columns is not None and self.sink.accept_columns(columns, received_at):
            self.columnar_messages += 1
        else:
            self.sink.accept_decoded(self._decode(payload, topic), received_at, where=f"topic {topic}: ")
        self._unacked.append((mid, qos, connection))
        if not self.sink.pending():
            # None of the messages since the last hand-over left a reading in the open batch
            # (refused, duplicates): acknowledge them now, so the broker never redelivers them.
            # Once what was handed over before is written: a duplicate's first copy may still wait
            # for a failing store, and acknowledging it now would lose it if we died meanwhile.
            acks, self._unacked = self._unacked, []
            self.sink.when_written(lambda: self._ack(acks))
        elif self.sink.pending() >= self.sink.batch_size:
            self.flush_and_ack()

    def flush_and_ack(self) -> None:
        """Hand the batch to the storage thread; its messages are acknowledged once it is written."""
        acks, self._unacked = self._unacked, []
        self.sink.flush(on_written=lambda: self._ack(acks))

    def _ack(self, acks: list[tuple[int, int, int]]) -> None:
        if self.subscriber is not None:
            by_connection: dict[int, list[int]] = {}
            for mid, qos, connection in acks:
                if qos:
                    by_connection.setdefault(connection, []).append(mid)
            for connection, mids in by_connection.items():
                self.subscriber.ack(mids, connection)  # dropped there if from an earlier connection
            return
        current = self._connection
        for mid, qos, connection in acks:
            if qos and connection == current:
                self.client.ack(mid, qos)

    def drain(self, done: threading.Event) -> None:
        drain_into_sink(self.sink, self.intake, done, self.handle, flush_check_every=2000, flush=self.flush_and_ack)

    def _network(self) -> None:
        if self.subscriber is not None:
            self.subscriber.run_forever(self._network_stop)
            if self.subscriber.refused is None:
                return
            log.warning("%s; collecting through paho at MQTT 3.1.1 instead", self.subscriber.refused)
            self.subscriber = None  # acks go through paho from now on (nothing was received yet)
            if self._network_stop.is_set():
                return
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_forever(retry_first_connection=True)

    def run(self, stop: threading.Event, duration: float | None) -> int:
        """Collect until `stop` or `duration`; 0, or 1 when a vital thread died."""
        resumed = self.sink.resume_from_dataset(space=self.sequence_space)
        if resumed:
            log.info("resuming %d series from the dataset", resumed)
        self.sink.start_storage_thread()  # watched too: /healthz fails if it dies
        done = threading.Event()
        writer = self.metrics.watch(threading.Thread(target=self.drain, args=(done,), name="mqtt-writer", daemon=True))
        network = self.metrics.watch(threading.Thread(target=self._network, name="mqtt-network", daemon=True))
        writer.start()
        network.start()
        if self.client_id == replica_client_id(self.client_id, 0):
            # Replica 0 always exists: it collects what the sessions of replicas removed by a
            # scale-down still hold, then deletes those sessions (they would queue without end).
            threading.Thread(target=self.retire_removed_replicas, args=(stop,), name="mqtt-retire", daemon=True).start()
        deadline = time.monotonic() + duration if duration else None
        code = 0
        try:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                stop.wait(0.1)
                dead = self.metrics.dead_workers()
                if dead:
                    log.error("thread(s) %s ended unexpectedly; exiting so the collector is restarted (unacknowledged messages are redelivered)", ", ".join(dead))
                    self.metrics.error("worker_died").inc()
                    code = 1
                    break
        finally:
            # Write and acknowledge everything received before disconnecting (the writer thread
            # ends with sink.close(), which waits for the storage thread).
            self._stop.set()
            done.set()
            writer.join(timeout=60)
            time.sleep(0.1)
            self._network_stop.set()
            self.client.disconnect()
            network.join(timeout=10)
            t = self.sink.totals
            log.info("stored %d readings (received %d, lost %d, duplicates %d, malformed %d)", t["stored"], t["received"], t["lost"], t["duplicates"], t["malformed"])
            log.info("SUMMARY %s", json.dumps(self.sink.summary()))
        return code

    # --- sessions of removed replicas -----------------------------------------------------------
    def retire_removed_replicas(self, stop: threading.Event, timeout: float = 30.0) -> int:
        """Drain and delete the persistent sessions of replicas >= collectorReplicas; returns how
        many existed. Stops at the first replica id without a session."""
        if stop.wait(float(os.environ.get(ENV_RETIRE_AFTER, RETIRE_AFTER_DEFAULT))):
            return 0
        retired = 0
        for replica in range(self.replicas, self.replicas + 1000):
            if stop.is_set():
                break
            try:
                present = self._retire_session(replica_client_id(self.client_id, replica), stop, timeout)
            except (OSError, TimeoutError) as exc:
                log.warning("could not retire the session of collector replica %d (%s); retrying at the next start", replica, exc)
                break
            if not present:
                break
            retired += 1
        return retired

    def _retire_session(self, client_id: str, stop: threading.Event, timeout: float) -> bool:
        received: collections.deque = collections.deque()
        connected, unsubscribed = threading.Event(), threading.Event()
        state: dict[str, bool] = {}
        client = mqtt_client(self.broker, client_id, clean_session=False, manual_ack=True)
        client.on_connect = lambda _c, _u, flags, rc, _p: (state.update(present=bool(flags.session_present), refused=rc.is_failure), connected.set())
        client.on_unsubscribe = lambda *_args: unsubscribed.set()
        client.on_message = lambda _c, _u, m: received.append((m.payload, m.topic, m.mid, m.qos, datetime.now(timezone.utc)))
        client.connect(self.broker.host, self.broker.port, keepalive=30)
        client.loop_start()
        try:
            if not connected.wait(timeout) or state.get("refused"):
                raise TimeoutError(f"broker did not accept {client_id}")
            if state["present"]:
                # No new reading is routed to the session once it holds no subscription; then
                # what it had queued arrives, is written by this collector and acknowledged.
                client.unsubscribe([self.topic, self.stale_topic])
                if not unsubscribed.wait(timeout):
                    raise TimeoutError(f"broker did not confirm the unsubscription of {client_id}")
                quiet_since, seen = time.monotonic(), 0
                while time.monotonic() - quiet_since < 1.0 and not stop.is_set():
                    time.sleep(0.1)
                    if len(received) != seen:
                        seen, quiet_since = len(received), time.monotonic()
                count = len(received)
                while received:
                    payload, topic, _mid, _qos, received_at = received.popleft()
                    self.sink.accept_decoded(self._decode(payload, topic), received_at, where=f"topic {topic}: ")
                # The writer thread writes them with its next batch; only then may the session go
                # (its unacknowledged copies are the only others).
                # A write completed after these accepts holds them (accept and flush share a lock).
                stored = self.sink.totals["stored"]
                deadline = time.monotonic() + self.sink.flush_interval + timeout
                while self.sink.pending() and self.sink.totals["stored"] == stored and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self.sink.pending() and self.sink.totals["stored"] == stored:
                    raise TimeoutError(f"the readings left in the session of {client_id} were not written in time")
                log.info("collected %d message(s) left in the session of removed replica %s", count, client_id)
            client.disconnect()
        finally:
            client.loop_stop()
        # A clean connection deletes the session (and the one this probe may just have created).
        cleaner = mqtt_client(self.broker, client_id, clean_session=True)
        cleaner.connect(self.broker.host, self.broker.port, keepalive=30)
        cleaner.loop_start()
        try:
            deadline = time.monotonic() + timeout
            while not cleaner.is_connected() and time.monotonic() < deadline:
                time.sleep(0.05)
            cleaner.disconnect()
        finally:
            cleaner.loop_stop()
        return state["present"]


def replica_client_id(client_id: str, replica: int) -> str:
    """The client id of collector `replica` of the same fleet (`<fleet>-mqtt-collector-<n>`)."""
    stem, _, number = client_id.rpartition("-")
    return f"{stem}-{replica}" if number.isdigit() and stem.endswith("-collector") else client_id if replica == 0 else f"{client_id}-{replica}"


def run(opts: CollectorOptions) -> int:
    if opts.fleet.spec.protocols.mqtt.payload_format == "sparkplugB":  # a Sparkplug B host: collectors/sparkplug.py
        from sensorfleet.collectors.sparkplug import run as run_sparkplug

        return run_sparkplug(opts)
    broker = broker_address(opts.broker_url, opts.fleet, opts.tls_ca, opts.tls_cert, opts.tls_key)
    metrics = FleetMetrics(opts.fleet.name, "mqtt", "collector")
    collector = MqttCollector(opts, broker, metrics)  # fails (an unusable dataset) before it looks ready
    metrics.serve(opts.metrics_port, opts.metrics_host, opts.metrics_port_file)
    stop = stop_event_on_signals()
    return collector.run(stop, opts.duration)
