"""MQTT simulator: one process publishes the readings of many devices through a broker (MQTT 5
through `mqtt_session.Mqtt5Publisher`; paho at MQTT 3.1.1 for a broker that refuses MQTT 5).

Schedule: device d's tick k is due at `epoch + (k + phase_d) * interval` (see signals.py), so the
fleet's messages are spread evenly over each interval. A simulator that falls behind publishes
every tick late rather than skipping it (the lag is a metric); a broker that goes away is retried
with back-off while QoS 1 messages wait in the publisher's queue, bounded by `maxQueued`; what does not fit
is dropped and counted, never blocked on.

Topics (`topicPrefix` defaults to `sensorfleet`):
  perDevice:  <prefix>/<fleet>/<device>            payload: JSON array of the device's readings
  perReading: <prefix>/<fleet>/<device>/<sensor>   payload: one JSON reading document
  gateway:    <prefix>/<fleet>/gateway/<replica>    payload: JSON array of up to gatewayBatch
              readings of many devices (the simulator acting as an edge gateway)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid

import numpy as np
import paho.mqtt.client as mqtt

from sensorfleet.internals import paho_unacknowledged
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import Reading
from sensorfleet.replay import ReplaySource
from sensorfleet.runtime import BrokerAddress, SimulatorOptions, mqtt_client, broker_address
from sensorfleet.simulators.mqtt_devices import DeviceConnections
from sensorfleet.simulators.mqtt_session import Mqtt5Publisher
from sensorfleet.signals import ANOMALY_NAMES, QUALITY_BAD, QUALITY_NAMES, SignalModel, TickBlock, device_id, shard_devices

log = logging.getLogger(__name__)
SCHEDULER_PERIOD = 0.02  # seconds between two looks at the schedule
MAX_TICKS_PER_PASS = 20_000  # bound one pass's work so a far-behind simulator stays responsive


def format_ts_fast(t: float) -> str:
    """`Reading.to_wire`'s timestamp format, without building a datetime (hot path)."""
    seconds = int(t)
    micros = int(round((t - seconds) * 1_000_000))
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


class PayloadEncoder:
    """Encodes a TickBlock straight into wire documents. Must produce exactly what
    `Reading.to_wire()` produces for the same readings (a test holds it to that)."""

    def __init__(self, model: SignalModel, topic_prefix: str, mode: str, gateway: str = "0", gateway_batch: int = 500, user_properties: bool = False):
        self.model = model
        self.mode = mode
        self.user_properties = user_properties  # MQTT 5: seq and ts of the reading(s) as a 4th element
        self.base = f"{topic_prefix}/{model.fleet}"
        self.gateway_topic = f"{self.base}/gateway/{gateway}"
        self.gateway_batch = gateway_batch
        fleet = json.dumps(model.fleet)
        self.heads = [f'{{"fleet":{fleet},"protocol":"mqtt","device":"' for _ in model.sensors]
        self.tails = [(f'","sensor":{json.dumps(s.name)},"unit":{json.dumps(s.unit)},"value":', s.name) for s in model.sensors]

    def messages(self, block: TickBlock) -> list[tuple]:
        """(topic, payload, readings in it) for every device in the block; with user properties
        (topic, payload, readings, [("seq", …), ("ts", …)])."""
        out: list[tuple] = []
        props = self.user_properties
        values = block.values.tolist()
        quality = block.quality.tolist()
        anomaly = block.anomaly.tolist()
        per_device = self.mode == "perDevice"
        gateway = self.mode == "gateway"
        pending: list[str] = []
        for i, (d, k, t) in enumerate(zip(block.devices.tolist(), block.ticks.tolist(), block.times.tolist())):
            dev = device_id("mqtt", d)
            ts = format_ts_fast(t)
            docs = []
            for s, (tail, sensor_name) in enumerate(self.tails):
                q = quality[i][s]
                value = "null" if q == QUALITY_BAD else repr(values[i][s])
                a = ANOMALY_NAMES[anomaly[i][s]]
                doc = f'{self.heads[s]}{dev}{tail}{value},"ts":"{ts}","seq":{k},"quality":"{QUALITY_NAMES[q]}","anomaly":{"null" if a is None else chr(34) + a + chr(34)}}}'
                if per_device:
                    docs.append(doc)
                elif gateway:
                    pending.append(doc)
                elif props:
                    out.append((f"{self.base}/{dev}/{sensor_name}", doc.encode(), 1, [("seq", str(k)), ("ts", ts)]))
                else:
                    out.append((f"{self.base}/{dev}/{sensor_name}", doc.encode(), 1))
            if per_device and props:  # the readings of one device and tick share seq and ts
                out.append((f"{self.base}/{dev}", ("[" + ",".join(docs) + "]").encode(), len(docs), [("seq", str(k)), ("ts", ts)]))
            elif per_device:
                out.append((f"{self.base}/{dev}", ("[" + ",".join(docs) + "]").encode(), len(docs)))
            elif gateway and len(pending) >= self.gateway_batch:
                out.append((self.gateway_topic, ("[" + ",".join(pending) + "]").encode(), len(pending)))
                pending = []
        if pending:
            out.append((self.gateway_topic, ("[" + ",".join(pending) + "]").encode(), len(pending)))
        return out


class PahoPublisher:
    """MQTT 3.1.1 through paho, for brokers that do not speak MQTT 5 (the embedded amqtt broker).
    The same face as `Mqtt5Publisher`: publish, backlog, drain, close."""

    def __init__(self, broker: BrokerAddress, client_id: str, metrics: FleetMetrics, *, qos: int, max_inflight: int, max_queued: int):
        self.broker = broker
        self.metrics = metrics
        self.qos = qos
        self.dropped = 0
        self.client = mqtt_client(broker, client_id, clean_session=True)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(max_queued)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect

    def start(self) -> None:
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self.broker.url, reason_code)
            self.metrics.error("connect_refused").inc()
            return
        log.info("connected to broker %s (MQTT 3.1.1 through paho)", self.broker.url)
        self.metrics.connected.set(1)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        self.metrics.connected.set(0)
        if reason_code != 0:
            log.warning("lost the broker %s (%s); reconnecting with back-off", self.broker.url, reason_code)
            self.metrics.error("connection_lost").inc()

    def publish(self, messages: list[tuple]) -> int:
        handed = 0
        for topic, payload, count, *_properties in messages:  # MQTT 3.1.1 has no properties
            info = self.client.publish(topic, payload, qos=self.qos)
            if info.rc == mqtt.MQTT_ERR_SUCCESS or (self.qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN):
                handed += count  # QoS 1 while disconnected: queued in paho, resent on reconnect
            else:
                reason = "queue_full" if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE else "disconnected"
                self.metrics.dropped(reason).inc(count)
                self.dropped += count
        return handed

    def backlog(self) -> int:
        return paho_unacknowledged(self.client)

    async def drain(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.backlog() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.backlog()

    async def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MqttSimulator:
    def __init__(self, opts: SimulatorOptions, broker: BrokerAddress, metrics: FleetMetrics):
        fleet = opts.fleet
        self.fleet = fleet
        self.replica = opts.replica
        self.spec = fleet.spec.protocols.mqtt
        self.model = SignalModel(fleet.spec, fleet.name, "mqtt")
        self.devices = np.array(shard_devices(self.spec.devices, self.spec.replicas, opts.replica), dtype=np.int64)
        self.encoder = PayloadEncoder(self.model, self.spec.topic_prefix, self.spec.message_mode, str(opts.replica), self.spec.gateway_batch, self.spec.user_properties)
        self.metrics = metrics
        self.broker = broker
        self.published = 0
        self._dropped_before_fallback = 0
        self.client_id = f"{fleet.name}-mqtt-sim-{opts.replica}-{uuid.uuid4().hex[:6]}"
        self.publisher: Mqtt5Publisher | PahoPublisher | DeviceConnections = (
            PahoPublisher(broker, self.client_id, metrics, **self._limits()) if self.spec.mqtt_version == "3.1.1"
            else Mqtt5Publisher(broker, self.client_id, metrics, **self._limits(), message_expiry=self.spec.message_expiry, topic_aliases=self.spec.topic_aliases))
        if self.spec.connection_per_device:  # every device its own client: simulators/mqtt_devices.py
            names = [device_id("mqtt", int(d)) for d in self.devices]
            self.publisher = DeviceConnections(broker, metrics, fleet.name, self.encoder.base, names, qos=self.spec.qos, max_queued=self.spec.max_queued, connect_rate=self.spec.connect_rate, keepalive=self.spec.keepalive, max_delay=self.spec.reconnect_max_delay,
                                             message_expiry=self.spec.message_expiry)
        if self.spec.payload_format == "sparkplugB":  # an edge node: simulators/sparkplug.py
            from sensorfleet.simulators.sparkplug import sparkplug_edge_node

            self.encoder, self.publisher = sparkplug_edge_node(self.model, self.devices, opts.replica, broker, self.client_id, metrics, self.spec.sparkplug.primary_host_id, self._limits())  # type: ignore[assignment]
        metrics.devices.set(len(self.devices))

    def _limits(self) -> dict[str, int]:
        return {"qos": self.spec.qos, "max_inflight": self.spec.max_inflight, "max_queued": self.spec.max_queued}

    @property
    def dropped(self) -> int:
        return self.publisher.dropped + self._dropped_before_fallback

    def _fall_back_if_refused(self) -> None:
        """The broker refused MQTT 5: carry on at MQTT 3.1.1 through paho, with the backlog."""
        if isinstance(self.publisher, DeviceConnections) and self.publisher.refused is not None:
            raise RuntimeError(f"spec.protocols.mqtt.connectionPerDevice needs a broker that speaks MQTT 5 ({self.publisher.refused}); use broker.mode mosquitto")
        if not isinstance(self.publisher, Mqtt5Publisher) or self.publisher.refused is None:
            return
        if self.spec.payload_format == "sparkplugB":
            raise RuntimeError(f"spec.protocols.mqtt.payloadFormat: sparkplugB needs a broker that speaks MQTT 5 ({self.publisher.refused}); use broker.mode mosquitto")
        log.warning("%s; publishing through paho at MQTT 3.1.1 instead%s", self.publisher.refused,
                    " (without the MQTT 5 user properties, message expiry and topic aliases of the spec)" if self.spec.user_properties or self.spec.message_expiry or self.spec.topic_aliases else "")
        backlog = self.publisher.take_backlog()
        self._dropped_before_fallback = self.publisher.dropped
        self.publisher = PahoPublisher(self.broker, self.client_id, self.metrics, **self._limits())
        self.publisher.start()
        self.publisher.publish(backlog)  # already counted as published when first handed over

    async def _drain(self, timeout: float) -> int:
        """Wait for the backlog to be acknowledged, falling back to paho if the refusal comes late."""
        deadline = time.monotonic() + timeout
        while True:
            self._fall_back_if_refused()
            left = await self.publisher.drain(max(0.0, deadline - time.monotonic()))
            if not left or time.monotonic() >= deadline or not isinstance(self.publisher, Mqtt5Publisher) or self.publisher.refused is None:
                return left

    def publish_due(self, next_tick: np.ndarray, now: float) -> int:
        """Publish every device whose next tick is due; returns how many readings were handed over."""
        due_times = self.model.tick_times(self.devices, next_tick)
        due = np.flatnonzero(due_times <= now)[:MAX_TICKS_PER_PASS]
        self.metrics.schedule_lag.set(max(0.0, now - float(due_times.min())) if len(due) else 0.0)
        if not len(due):
            return 0
        block = self.model.block(self.devices[due], next_tick[due])
        handed = self._publish_messages(self.encoder.messages(block), now)
        next_tick[due] += 1
        return handed

    def _publish_messages(self, messages: list[tuple], now: float) -> int:
        handed = self.publisher.publish(messages)
        self.published += handed
        self.metrics.published.inc(handed)
        self.metrics.last_activity.set(now)
        self.metrics.queue.set(self.publisher.backlog())
        return handed

    def publish_readings(self, readings: list[Reading]) -> int:
        """The general path (replay): Reading objects, grouped per device in perDevice mode."""
        if not readings:
            return 0
        base = self.encoder.base
        if self.spec.message_mode == "gateway":
            size = self.spec.gateway_batch
            messages = [(self.encoder.gateway_topic, json.dumps([r.to_wire() for r in readings[i : i + size]], separators=(",", ":")).encode(), len(readings[i : i + size])) for i in range(0, len(readings), size)]
        elif self.spec.message_mode == "perDevice":
            by_device: dict[str, list[Reading]] = {}
            for r in readings:
                by_device.setdefault(r.device, []).append(r)
            messages = [(f"{base}/{d}", json.dumps([r.to_wire() for r in rs], separators=(",", ":")).encode(), len(rs)) for d, rs in by_device.items()]
        else:
            messages = [(f"{base}/{r.device}/{r.sensor}", r.to_json(), 1) for r in readings]
        return self._publish_messages(messages, time.time())

    def run(self, stop: threading.Event, duration: float | None, pause: threading.Event | None = None) -> None:
        asyncio.run(self.run_async(stop, duration, pause))

    async def run_async(self, stop: threading.Event, duration: float | None, pause: threading.Event | None = None) -> None:
        """The schedule and the network share one event loop: a pass's messages go out as one write."""
        self.publisher.start()
        try:
            # Start with the tick after now: ticks before the process existed were never "due".
            next_tick = self.model.current_tick(self.devices, time.time()) + 1
            replay = self._replay_source()
            deadline = time.monotonic() + duration if duration else None
            log.info("simulating %d MQTT devices (%s, QoS %d)", len(self.devices), self.spec.message_mode, self.spec.qos)
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                started = time.monotonic()
                self._fall_back_if_refused()
                if (pause is not None and pause.is_set()) or not getattr(self.publisher, "ready", True):
                    # paused, or a Sparkplug node not born yet / its primary host offline: due ticks wait
                    self.metrics.queue.set(self.publisher.backlog())
                elif replay is not None:
                    self.publish_readings([r for r in replay.due(time.time()) if r.device in self._replay_devices])
                else:
                    self.publish_due(next_tick, time.time())
                await asyncio.sleep(max(0.0, SCHEDULER_PERIOD - (time.monotonic() - started)))
            left = await self._drain(timeout=10.0)
            if left:
                log.warning("%d messages still unacknowledged at shutdown", left)
        finally:
            await self.publisher.close()
            log.info("published %d readings, dropped %d", self.published, self.dropped)

    def _replay_source(self) -> ReplaySource | None:
        if self.fleet.spec.replay is None:
            return None
        source = ReplaySource.from_spec(self.fleet.spec, self.fleet.name, "mqtt", time.time())
        mine = shard_devices(len(source.devices), self.spec.replicas, self.replica)
        self._replay_devices = {source.devices[i] for i in mine}
        self.metrics.devices.set(len(self._replay_devices))
        return source


def run(opts: SimulatorOptions) -> int:
    from sensorfleet.runtime import pause_event_on_sigusr1, stop_event_on_signals

    broker = broker_address(opts.broker_url, opts.fleet, opts.tls_ca, opts.tls_cert, opts.tls_key)
    metrics = FleetMetrics(opts.fleet.name, "mqtt", "simulator")
    metrics.serve(opts.metrics_port, opts.metrics_host, opts.metrics_port_file)
    stop = stop_event_on_signals()
    pause = pause_event_on_sigusr1()
    MqttSimulator(opts, broker, metrics).run(stop, opts.duration, pause)
    return 0
