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
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

import paho.mqtt.client as mqtt

from sensorfleet.collectors.base import CollectorSink, SequenceSpace
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import MalformedReading, decode_json_payload
from sensorfleet.runtime import BrokerAddress, CollectorOptions, mqtt_client, parse_broker_url, stop_event_on_signals

log = logging.getLogger(__name__)


def subscription_topic(prefix: str, fleet: str, shared_group: str | None) -> str:
    topic = f"{prefix}/{fleet}/#"
    return f"$share/{shared_group}/{topic}" if shared_group else topic


class MqttCollector:
    def __init__(self, opts: CollectorOptions, broker: BrokerAddress, metrics: FleetMetrics):
        fleet = opts.fleet
        spec = fleet.spec
        self.broker = broker
        self.metrics = metrics
        shared = spec.protocols.mqtt.collector_replicas > 1
        self.topic = subscription_topic(spec.protocols.mqtt.topic_prefix, fleet.name, f"{fleet.name}-collectors" if shared else None)
        self.client_id = opts.client_id or f"{fleet.name}-mqtt-collector-0"
        self.sink = CollectorSink(
            fleet.name, "mqtt", opts.data_url, metrics,
            batch_size=spec.collector.batch_size, flush_interval=spec.collector.flush_interval,
            writer_id=self.client_id, count_gaps=not shared,
            buffer_limit=spec.storage.max_buffered_readings, redelivered=True,
        )
        self.sequence_space = SequenceSpace.of(spec, "mqtt")
        self._unacked: list[tuple[int, int, int]] = []  # (mid, qos, connection) of messages in the current batch
        self._lock = threading.Lock()
        # Packet ids are per connection: a message received on an earlier one is redelivered by
        # the broker and must not be acknowledged on this one (the tracker drops the copy).
        self._connection = 0
        self._stop = threading.Event()
        self.client = mqtt_client(broker, self.client_id, clean_session=False, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _on_connect(self, client, _userdata, flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self.broker.url, reason_code)
            self.metrics.error("connect_refused").inc()
            return
        # Subscribe on every connect: a broker restarted without persistence forgot the session.
        client.subscribe(self.topic, qos=1)
        self.metrics.connected.set(1)
        log.info("connected to %s (session present: %s), subscribed to %s", self.broker.url, flags.session_present, self.topic)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        self.metrics.connected.set(0)
        # Unacknowledged messages will be redelivered by the broker; acking them on a new
        # connection would acknowledge the wrong packet ids, so forget them (the tracker
        # recognises the redeliveries as duplicates).
        with self._lock:
            self._connection += 1
            self._unacked.clear()
        if reason_code != 0:
            log.warning("lost the broker %s (%s); reconnecting with back-off", self.broker.url, reason_code)
            self.metrics.error("connection_lost").inc()

    def _on_message(self, _client, _userdata, message: mqtt.MQTTMessage) -> None:
        if not self.sink.wait_for_room(self._stop):
            return  # stopping: not taken, not acknowledged; the broker redelivers it
        received_at = datetime.now(timezone.utc)
        try:
            documents = decode_json_payload(message.payload)
        except MalformedReading as exc:
            self.sink.reject(exc.kind, f"topic {message.topic}: {exc}")
            documents = []
        self.sink.accept_documents(documents, received_at)
        with self._lock:
            self._unacked.append((message.mid, message.qos, self._connection))
        if self.sink.pending() >= self.sink.batch_size:
            self.flush_and_ack()

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
                if self.sink.due():
                    self.flush_and_ack()
        finally:
            # Flush before disconnecting, so the final acks still reach the broker.
            self._stop.set()
            self.flush_and_ack()
            self.sink.close()
            time.sleep(0.1)
            self.client.disconnect()
            self.client.loop_stop()
            t = self.sink.totals
            log.info("stored %d readings (received %d, lost %d, duplicates %d, malformed %d)", t["stored"], t["received"], t["lost"], t["duplicates"], t["malformed"])


def run(opts: CollectorOptions) -> int:
    if opts.fleet.spec.protocols.mqtt.payload_format == "sparkplugB":  # a Sparkplug B host: collectors/sparkplug.py
        from sensorfleet.collectors.sparkplug import run as run_sparkplug

        return run_sparkplug(opts)
    broker = parse_broker_url(opts.broker_url or "mqtt://127.0.0.1:1883")
    metrics = FleetMetrics(opts.fleet.name, "mqtt", "collector")
    metrics.serve(opts.metrics_port, opts.metrics_host)
    stop = stop_event_on_signals()
    MqttCollector(opts, broker, metrics).run(stop, opts.duration)
    return 0
