"""The simulator's MQTT 5 publishing session: asyncio I/O, every packet encoded and decoded by the
`mqtt5` library (a sans-I/O MQTT 5 codec written in Rust).

Why not paho here: profiled at ~6,000 QoS 1 messages/s, paho spends most of a message's cost on
per-packet work around the codec — a wake-up byte through a socket pair per publish, a
`threading.Condition` per message, three `recv` calls per PUBACK, and a scan of every queued
message on every PUBACK once the queue is longer than the in-flight window. Here one scheduler
pass becomes one `transport.write` of all its PUBLISH packets, and one `recv` carries many PUBACKs.

What it keeps from the paho path: QoS 1 (a message leaves the queue when its PUBACK arrives), a
bounded in-flight window (`maxInflight`, and never more than the broker's Receive Maximum), a
bounded queue (`maxQueued`; what does not fit is dropped and counted, never blocked on), reconnect
with back-off from 1 s up to 30 s, and unacknowledged messages sent again after a reconnect (the
collector recognises the repeats as duplicates).

A broker that does not speak MQTT 5 (the embedded amqtt broker) answers CONNECT with the MQTT 3.1.1
refusal "unacceptable protocol version"; the session then reports `refused` and the simulator
publishes through paho at MQTT 3.1.1 instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque

import mqtt5

from sensorfleet.metrics import FleetMetrics
from sensorfleet.runtime import BrokerAddress

log = logging.getLogger(__name__)

Message = tuple[str, bytes, int]  # (topic, payload, readings in it)

# MQTT 5 §3.1.4: a server that does not support the protocol level may answer with an MQTT 3.1.1
# CONNACK, return code 0x01 "unacceptable protocol version", and close. mqtt5 only reads MQTT 5
# packets, so that one 3.1.1 answer is recognised by its four bytes.
MQTT311_UNACCEPTABLE_PROTOCOL = b"\x20\x02\x00\x01"
CONNACK_TIMEOUT = 10.0
MAX_PACKET_ID = 65535


class BrokerRefusedMqtt5(ConnectionError):
    """The broker answered CONNECT saying it does not speak MQTT 5."""


class BrokerRefusedConnection(ConnectionError):
    """The broker answered CONNECT with a refusal (bad credentials, not authorised, ...)."""


class Mqtt5Publisher(asyncio.Protocol):
    """Publishes (topic, payload, count) messages; `publish` never blocks, the network is driven by
    the event loop. Counters: `published` readings handed over, `dropped` readings not queued."""

    def __init__(self, broker: BrokerAddress, client_id: str, metrics: FleetMetrics, *, qos: int, max_inflight: int, max_queued: int, keepalive: int = 30, min_delay: float = 1.0, max_delay: float = 30.0):
        self.broker = broker
        self.client_id = client_id
        self.metrics = metrics
        self.qos = qos
        self.max_inflight = min(max_inflight, MAX_PACKET_ID)
        self.max_queued = max_queued
        self.keepalive = keepalive
        self.min_delay, self.max_delay = min_delay, max_delay
        self.queue: deque[Message] = deque()
        self.inflight: dict[int, Message] = {}  # packet id -> message, in the order sent
        self.window = self.max_inflight
        self.dropped = 0
        self.refused: BrokerRefusedMqtt5 | None = None
        self._next_id = 0
        self._transport: asyncio.Transport | None = None
        self._connected = False
        self._writable = True
        self._buffer = bytearray()
        self._connack: asyncio.Future[bool] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._last_write = 0.0

    # -- the caller's side ------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep_connected(), name="mqtt5-connection"), asyncio.create_task(self._keep_alive(), name="mqtt5-keepalive")]

    def publish(self, messages: list[Message]) -> int:
        """Queue messages for sending; returns the readings accepted (the rest are dropped, counted)."""
        room = self.max_queued - len(self.queue) - len(self.inflight)
        accepted = messages if len(messages) <= room else messages[: max(0, room)]
        self.queue.extend(accepted)
        if len(accepted) < len(messages):
            lost = sum(count for _, _, count in messages[len(accepted) :])
            self.metrics.dropped("queue_full").inc(lost)
            self.dropped += lost
        self._send_queued()
        return sum(count for _, _, count in accepted)

    def backlog(self) -> int:
        """Messages not yet acknowledged (queued or in flight)."""
        return len(self.queue) + len(self.inflight)

    def take_backlog(self) -> list[Message]:
        """Everything not yet acknowledged, oldest first, removed from this session (to hand to another)."""
        pending = [*self.inflight.values(), *self.queue]
        self.inflight.clear()
        self.queue.clear()
        return pending

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for every queued message to be acknowledged; returns how many are left."""
        deadline = time.monotonic() + timeout
        while self.backlog() and time.monotonic() < deadline and self.refused is None:
            await asyncio.sleep(0.05)
        return self.backlog()

    async def close(self) -> None:
        self._closing = True
        if self._transport is not None and self._connected:
            self._transport.write(mqtt5.DisconnectPacket().write())
            self._transport.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- sending -----------------------------------------------------------------------------
    def _packet_id(self) -> int:
        while True:  # the window is below the id space, so a free id is always near
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in self.inflight:
                return self._next_id

    def _send_queued(self) -> None:
        """Everything the window allows, as one write."""
        if not (self._connected and self._writable and self.queue):
            return
        queue, inflight, chunks = self.queue, self.inflight, []
        if self.qos == 0:
            while queue:
                topic, payload, _ = queue.popleft()
                chunks.append(mqtt5.PublishPacket(topic, payload).write())
        else:
            qos = mqtt5.QoS.AT_LEAST_ONCE
            room = self.window - len(inflight)
            while queue and room > 0:
                message = queue.popleft()
                packet_id = self._packet_id()
                inflight[packet_id] = message
                chunks.append(mqtt5.PublishPacket(message[0], message[1], qos=qos, packet_id=packet_id).write())
                room -= 1
        if chunks:
            self._write(b"".join(chunks))

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)
        self._last_write = time.monotonic()

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._buffer.clear()
        self._writable = True
        password = self.broker.password.encode() if self.broker.password is not None else None
        connect = mqtt5.ConnectPacket(self.client_id, username=self.broker.username, password=password, clean_start=True, keep_alive=self.keepalive)
        self._write(connect.write())

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._connack is not None and not self._connack.done() and buffer.startswith(MQTT311_UNACCEPTABLE_PROTOCOL):
            self._connack.set_exception(BrokerRefusedMqtt5(f"broker {self.broker.url} does not speak MQTT 5"))
            return
        view, offset, acked = memoryview(buffer), 0, False
        try:
            while offset < len(buffer):
                try:
                    packet, size = mqtt5.read(view[offset:])
                except IndexError:  # an incomplete packet: wait for the rest
                    break
                offset += size
                if type(packet) is mqtt5.PubAckPacket:
                    self._on_puback(packet)
                    acked = True
                else:
                    self._on_control_packet(packet)
        except ValueError as exc:  # the broker sent something that is not MQTT 5: drop the connection
            log.error("malformed packet from broker %s: %s", self.broker.url, exc)
            self.metrics.error("protocol_error").inc()
            if self._transport is not None:
                self._transport.close()
        finally:
            view.release()
        del buffer[:offset]
        if acked:
            self._send_queued()

    def _on_puback(self, packet: mqtt5.PubAckPacket) -> None:
        message = self.inflight.pop(packet.packet_id, None)
        if message is not None and packet.reason_code.value >= 0x80:  # refused by the broker (e.g. not authorised)
            self.metrics.dropped("broker_refused").inc(message[2])
            self.dropped += message[2]

    def _on_control_packet(self, packet: object) -> None:
        if isinstance(packet, mqtt5.ConnAckPacket):
            if packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                error: Exception = BrokerRefusedMqtt5(f"broker {self.broker.url} does not speak MQTT 5") if packet.reason_code == mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION else BrokerRefusedConnection(f"broker {self.broker.url} refused the connection: {packet.reason_code.name}")
                if self._connack is not None and not self._connack.done():
                    self._connack.set_exception(error)
                return
            self.window = min(self.max_inflight, packet.receive_max)
            self._connected = True
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(True)
            self._send_queued()
        elif isinstance(packet, mqtt5.DisconnectPacket):
            log.warning("broker %s disconnected us: %s", self.broker.url, packet.reason_code.name)
        # PINGRESP needs nothing; the simulator subscribes to nothing, so no PUBLISH arrives.

    def connection_lost(self, exc: Exception | None) -> None:
        self._connected = False
        self._transport = None
        # Unacknowledged messages go back to the front of the queue, in the order they were sent:
        # sent again after the reconnect (a clean session: the broker forgot their packet ids).
        self.queue.extendleft(reversed(self.inflight.values()))
        self.inflight.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(exc or ConnectionResetError("connection closed before CONNACK"))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._send_queued()

    # -- connection management ---------------------------------------------------------------
    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if self.broker.tls else None
        delay = self.min_delay
        while not self._closing:
            self._connack, self._lost = loop.create_future(), loop.create_future()
            try:
                await loop.create_connection(lambda: self, self.broker.host, self.broker.port, ssl=context)
                await asyncio.wait_for(asyncio.shield(self._connack), CONNACK_TIMEOUT)
            except BrokerRefusedMqtt5 as exc:
                self.refused = exc
                if self._transport is not None:
                    self._transport.close()
                return
            except (OSError, asyncio.TimeoutError) as exc:
                if isinstance(exc, BrokerRefusedConnection):
                    log.error("%s; retrying in %.0f s", exc, delay)
                    self.metrics.error("connect_refused").inc()
                else:
                    log.warning("cannot reach broker %s (%s); retrying in %.0f s", self.broker.url, exc or type(exc).__name__, delay)
                if self._transport is not None:
                    self._transport.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            delay = self.min_delay
            log.info("connected to broker %s (MQTT 5, window %d)", self.broker.url, self.window)
            self.metrics.connected.set(1)
            await self._lost
            self.metrics.connected.set(0)
            if not self._closing:
                log.warning("lost the broker %s; reconnecting with back-off", self.broker.url)
                self.metrics.error("connection_lost").inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)

    async def _keep_alive(self) -> None:
        """A PINGREQ when nothing was written for half the keep-alive, so an idle link stays up."""
        while True:
            await asyncio.sleep(self.keepalive / 4)
            if self._connected and self._transport is not None and time.monotonic() - self._last_write > self.keepalive / 2:
                self._write(mqtt5.PingReqPacket().write())
