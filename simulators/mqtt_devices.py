"""`connectionPerDevice`: every simulated device is its own MQTT client (docs/protocols.md).

Each device holds one MQTT 5 connection (`Mqtt5Publisher`, the simulator's publisher, one per
device) with its own client id `<fleet>-<device>`, its own keep-alive, a retained Last Will
`offline` and a retained birth `online` on `<prefix>/<fleet>/<device>/status`. The readings are the
perDevice messages the scheduler already encodes, routed by topic to the device's connection, so
the collector and its loss accounting see exactly what they see from a shared connection.

Why asyncio and not one paho client per device: paho runs a thread per client; 10,000 threads on
two cores spend their time switching. Here all connections of a process are protocols on one
event loop. Connects are paced by one `ConnectPacer` per process (`connectRate`), reconnects too,
after a back-off drawn uniformly from 0 to the exponential delay (full jitter), so a broker
restart is followed by a spread-out wave rather than every device at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import mqtt5

from sensorfleet.metrics import FleetMetrics
from sensorfleet.mqtt5_session import MAX_PACKET_ID
from sensorfleet.runtime import BrokerAddress
from sensorfleet.simulators.mqtt_session import Message, Mqtt5Publisher

log = logging.getLogger(__name__)
BIRTH_PACKET_ID = MAX_PACKET_ID  # reserved for the birth message; readings use 1..65534
DEVICE_MAX_INFLIGHT = 20  # at one message per interval a device rarely has more than one in flight
DEVICE_MIN_QUEUE = 100  # a device's due readings wait here until its turn in the connect ramp


class ConnectPacer:
    """At most `rate` connection attempts per second across every device of the process: each
    attempt reserves the next free slot on a grid of 1/rate seconds and sleeps until it."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


class DeviceConnection(Mqtt5Publisher):
    def __init__(self, pool: DeviceConnections, device: str, topic: str, client_id: str, *, qos: int, max_queued: int, keepalive: int, max_delay: float,
                 message_expiry: int = 0):
        super().__init__(pool.broker, client_id, pool.metrics, qos=qos, max_inflight=DEVICE_MAX_INFLIGHT, max_queued=max_queued, keepalive=keepalive,
                         message_expiry=message_expiry)
        self.pool = pool
        self.device = device
        self.topic = topic
        self.status_topic = f"{topic}/status"
        self.min_delay, self.max_delay = 1.0, max_delay
        self.log_level = logging.DEBUG  # thousands of these: the pool logs the totals

    def _packet_id(self) -> int:
        while True:
            self._next_id = self._next_id % (MAX_PACKET_ID - 1) + 1
            if self._next_id not in self.inflight:
                return self._next_id

    def _will(self) -> mqtt5.Will:
        return mqtt5.Will(self.status_topic, payload=b"offline", qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True)

    def _goodbye(self) -> bytes:
        # A device that is switched off says so: the broker publishes its Will (`offline`).
        return mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.DISCONNECT_WITH_WILL_MESSAGE).write()

    async def _before_connect(self) -> None:
        await self.pool.pacer.wait()

    def _retry_delay(self, delay: float) -> float:
        return random.uniform(0.0, delay)  # full jitter: no thundering herd after a broker restart

    def _report_up(self, up: bool) -> None:
        self.pool.report(self, up)

    def _on_connected(self, connack: mqtt5.ConnAckPacket) -> None:
        # The birth goes out before the queued readings, in the same write.
        birth = mqtt5.PublishPacket(self.status_topic, b"online", qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True, packet_id=BIRTH_PACKET_ID)
        self.write(birth.write())
        super()._on_connected(connack)

    def drop(self) -> None:
        """Cut the connection without a DISCONNECT, as a network failure would: the broker
        publishes the Last Will; the device reconnects after its back-off."""
        if self._transport is not None:
            self._transport.abort()


class DeviceConnections:
    """The simulator's publisher face (start, publish, backlog, drain, close, dropped) over one
    connection per device. Messages are routed by their topic (`<prefix>/<fleet>/<device>`)."""

    def __init__(self, broker: BrokerAddress, metrics: FleetMetrics, fleet: str, base: str, devices: list[str], *, qos: int, max_queued: int, connect_rate: float, keepalive: int, max_delay: float,
                 message_expiry: int = 0):
        self.broker = broker
        self.metrics = metrics
        self.pacer = ConnectPacer(connect_rate)
        per_device_queue = max(DEVICE_MIN_QUEUE, max_queued // max(1, len(devices)))
        self.by_topic: dict[str, DeviceConnection] = {}
        for device in devices:
            topic = f"{base}/{device}"
            self.by_topic[topic] = DeviceConnection(self, device, topic, f"{fleet}-{device}", qos=qos, max_queued=per_device_queue, keepalive=keepalive, max_delay=max_delay,
                                                  message_expiry=message_expiry)
        self.up = 0
        self.connects: list[float] = []  # monotonic time of every CONNACK, in order (tests, bench)
        self._unrouted = 0
        self._backlog, self._backlog_at = 0, 0.0

    @property
    def connections(self) -> list[DeviceConnection]:
        return list(self.by_topic.values())

    @property
    def dropped(self) -> int:
        return self._unrouted + sum(c.dropped for c in self.by_topic.values())

    @property
    def refused(self) -> Exception | None:
        return next((c.refused for c in self.by_topic.values() if c.refused is not None), None)

    def report(self, connection: DeviceConnection, up: bool) -> None:
        self.up += 1 if up else -1
        if up:
            self.connects.append(time.monotonic())
        total = len(self.by_topic)
        self.metrics.connected.set(1 if self.up == total else 0)
        if up and self.up == total:
            took = time.monotonic() - self._started
            log.info("all %d device connections up in %.2f s (%.0f connections/s; broker %s)", total, took, total / max(took, 1e-6), self.broker.url)
            self._started = time.monotonic()  # the next wave (after a broker restart) is timed from here
        elif not up and self.up == total - 1:
            log.warning("device connections to %s going down; reconnecting with jittered back-off", self.broker.url)

    def start(self) -> None:
        log.info("opening %d device connections at up to %.0f/s", len(self.by_topic), 1.0 / self.pacer.interval)
        self._started = time.monotonic()
        for connection in self.by_topic.values():
            connection.start()

    def publish(self, messages: list[Message]) -> int:
        handed = 0
        for message in messages:
            connection = self.by_topic.get(message[0])
            if connection is None:  # not a device of this process: a bug upstream, counted
                self.metrics.dropped("unrouted").inc(message[2])
                self._unrouted += message[2]
                continue
            handed += connection.publish([message])
        return handed

    def backlog(self) -> int:
        """Messages not yet acknowledged, summed at most twice a second (the scheduler asks on every
        pass, and a sum over 10,000 connections 50 times a second is a tenth of a core)."""
        now = time.monotonic()
        if now - self._backlog_at > 0.5:
            self._backlog, self._backlog_at = self._exact_backlog(), now
        return self._backlog

    def _exact_backlog(self) -> int:
        return sum(c.backlog() for c in self.by_topic.values())

    async def drain(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self._exact_backlog() and time.monotonic() < deadline and self.refused is None:
            await asyncio.sleep(0.05)
        return self._exact_backlog()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.by_topic.values()))
