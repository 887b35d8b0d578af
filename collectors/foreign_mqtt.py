"""Collector of one third-party MQTT source (`spec.sources.mqtt[]`): subscribe to the topic
patterns of its mappings on the devices' broker, read every JSON message with the mappings
(collectors/foreign.py) and store the readings, `seq` null.

Delivery is at least once with `qos: 1`: the session is persistent (a stable client id) and a
message is acknowledged only once its readings are written, so a collector killed before writing
gets it again from the broker. Third-party payloads carry no sequence number, so such a redelivery
is stored again (no de-duplication), and nothing can tell a lost message from one never sent:
the collector counts what it received, stored and refused (by reason), not gaps.

Threads as in collectors/mqtt.py: paho's network loop only appends to a deque (and waits there at
the buffer bound: nothing more is read or acknowledged, the broker keeps it); the writer thread
maps, batches, writes and acknowledges.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from datetime import datetime, timezone

import paho.mqtt.client as mqtt

from sensorfleet.collectors.base import CollectorSink, drain_into_sink
from sensorfleet.collectors.foreign import MqttMapper
from sensorfleet.metrics import FleetMetrics
from sensorfleet.runtime import BrokerAddress, CollectorOptions, mqtt_client, parse_broker_url, stop_event_on_signals
from sensorfleet.sources import MqttSource

log = logging.getLogger(__name__)


def source_client_id(fleet: str, source: str) -> str:
    return f"{fleet}-src-{source}"


class ForeignMqttCollector:
    def __init__(self, opts: CollectorOptions, source: MqttSource, broker: BrokerAddress, metrics: FleetMetrics):
        fleet = opts.fleet
        self.source = source
        self.broker = broker
        self.metrics = metrics
        self.mapper = MqttMapper(fleet.name, source)
        self.topics = self.mapper.subscriptions()
        self.client_id = opts.client_id or source_client_id(fleet.name, source.name)
        self.sink = CollectorSink(
            fleet.name, "mqtt", opts.data_url, metrics,
            batch_size=fleet.spec.collector.batch_size, flush_interval=fleet.spec.collector.flush_interval,
            writer_id=self.client_id, buffer_limit=fleet.spec.storage.max_buffered_readings, redelivered=source.qos == 1,
        )
        self.intake: collections.deque = collections.deque()
        self._unacked: list[tuple[int, int, int]] = []
        self._connection = 0
        self._stop = threading.Event()
        self.client = mqtt_client(broker, self.client_id, clean_session=source.qos == 0, manual_ack=source.qos == 1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _on_connect(self, client, _userdata, flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self.broker.url, reason_code)
            self.metrics.error("connect_refused").inc()
            return
        self._connection += 1
        # On every connect: a broker restarted without persistence forgot the subscriptions.
        client.subscribe([(topic, self.source.qos) for topic in self.topics])
        self.metrics.connected.set(1)
        log.info("source %s: connected to %s (session present: %s), subscribed to %s", self.source.name, self.broker.url, flags.session_present, ", ".join(self.topics))

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        self.metrics.connected.set(0)
        self._connection += 1  # acks of what was received so far would name the wrong packets
        if reason_code != 0:
            log.warning("source %s: lost the broker %s (%s); reconnecting with back-off", self.source.name, self.broker.url, reason_code)
            self.metrics.error("connection_lost").inc()

    def _on_message(self, _client, _userdata, message: mqtt.MQTTMessage) -> None:
        """paho's network thread: nothing here may raise; it waits only at the buffer bound."""
        while len(self.intake) + self.sink.buffered() >= self.sink.buffer_limit:
            if self._stop.wait(0.05):
                return  # stopping: neither taken nor acknowledged; the broker redelivers it
        self.intake.append((message.payload, message.topic, message.mid, message.qos, self._connection, datetime.now(timezone.utc)))

    # --- writer thread --------------------------------------------------------------------------
    def handle(self, item: tuple) -> None:
        payload, topic, mid, qos, connection, received_at = item
        self.sink.accept_decoded(self.mapper.map(topic, payload, received_at), received_at, where=f"topic {topic}: ")
        self._unacked.append((mid, qos, connection))
        if not self.sink.pending():
            acks, self._unacked = self._unacked, []  # nothing of theirs waits in the open batch
            self.sink.when_written(lambda: self._ack(acks))
        elif self.sink.pending() >= self.sink.batch_size:
            self.flush_and_ack()

    def flush_and_ack(self) -> None:
        acks, self._unacked = self._unacked, []
        self.sink.flush(on_written=lambda: self._ack(acks))

    def _ack(self, acks: list[tuple[int, int, int]]) -> None:
        current = self._connection
        for mid, qos, connection in acks:
            if qos and connection == current:  # an earlier connection's message is redelivered
                self.client.ack(mid, qos)

    def run(self, stop: threading.Event, duration: float | None) -> int:
        self.sink.start_storage_thread()
        done = threading.Event()
        writer = self.metrics.watch(threading.Thread(
            target=drain_into_sink, args=(self.sink, self.intake, done, self.handle), kwargs={"flush": self.flush_and_ack},
            name="source-mqtt-writer", daemon=True))
        writer.start()
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        deadline = time.monotonic() + duration if duration else None
        code = 0
        try:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                stop.wait(0.1)
                dead = self.metrics.dead_workers()
                if dead:
                    log.error("thread(s) %s ended unexpectedly; exiting so the collector is restarted", ", ".join(dead))
                    self.metrics.error("worker_died").inc()
                    code = 1
                    break
        finally:
            self._stop.set()
            done.set()
            writer.join(timeout=60)  # written and acknowledged before the disconnect
            time.sleep(0.1)
            self.client.disconnect()
            self.client.loop_stop()
            log.info("SUMMARY %s", json.dumps({**self.sink.summary(), "source": self.source.name}))
        return code


def run(opts: CollectorOptions) -> int:
    source = opts.fleet.spec.sources.named(opts.source or "")
    assert isinstance(source, MqttSource)  # the CLI checked the source's protocol
    broker = parse_broker_url(source.url)
    metrics = FleetMetrics(opts.fleet.name, "mqtt", "collector")
    collector = ForeignMqttCollector(opts, source, broker, metrics)
    metrics.serve(opts.metrics_port, opts.metrics_host, opts.metrics_port_file)
    stop = stop_event_on_signals()
    return collector.run(stop, opts.duration)
