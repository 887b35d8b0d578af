"""One MQTT 5 connection on asyncio, every packet encoded and decoded by the `mqtt5` library (a
sans-I/O MQTT 5 codec written in Rust): the common part of the simulator's publisher and the
collector's subscriber.

Why not paho on the hot path: profiled at ~6,000 QoS 1 messages/s, paho spends most of a message's
cost on per-packet work around its codec — a wake-up byte through a socket pair per publish, a
`threading.Condition` per message, several `recv` calls per packet, an acknowledgement queued and
sent one by one, and a scan of every queued message on every PUBACK once the queue is longer than
the in-flight window. Here many packets go out in one `transport.write` and one `recv` carries many.

What this part does: connect (clean or persistent session), reconnect with back-off from 1 s up to
30 s, keep-alive, split the byte stream into packets and hand each to the subclass. A broker that
does not speak MQTT 5 (the embedded amqtt broker) answers CONNECT with the MQTT 3.1.1 refusal
"unacceptable protocol version"; `refused` is then set, and the caller falls back to paho.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import mqtt5

from sensorfleet.metrics import FleetMetrics
from sensorfleet.runtime import BrokerAddress
from sensorfleet.tls import describe_tls_failure

log = logging.getLogger(__name__)

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


async def broker_speaks_mqtt5(broker: BrokerAddress, client_id: str) -> bool:
    """Ask with a minimal CONNECT (clean start, no properties) whether the broker speaks MQTT 5.
    Needed before a CONNECT with properties: amqtt reads those as MQTT 3.1.1 fields and waits for
    bytes that never come instead of refusing. Raises OSError/TimeoutError if there is no answer."""
    context = broker.ssl_context()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(broker.host, broker.port, ssl=context), CONNACK_TIMEOUT)
    try:
        password = broker.password.encode() if broker.password is not None else None
        writer.write(mqtt5.ConnectPacket(client_id, username=broker.username, password=password, clean_start=True).write())
        answer = await asyncio.wait_for(reader.read(64), CONNACK_TIMEOUT)
        if not answer:
            raise ConnectionResetError("connection closed before CONNACK")
        if answer.startswith(MQTT311_UNACCEPTABLE_PROTOCOL):
            return False
        packet, _ = mqtt5.read(memoryview(answer))
        if isinstance(packet, mqtt5.ConnAckPacket) and packet.reason_code == mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            return False
        writer.write(mqtt5.DisconnectPacket().write())
        return True
    finally:
        writer.close()


class Mqtt5Connection(asyncio.Protocol):
    """Subclasses handle `_on_connected`, `_on_packet` (anything but CONNACK/PINGRESP/DISCONNECT),
    `_after_packets` (once per chunk read) and `_on_lost`. `generation` counts connections: packet
    ids belong to one connection only."""

    def __init__(self, broker: BrokerAddress, client_id: str, metrics: FleetMetrics, *, clean_start: bool, session_expiry: int = 0, keepalive: int = 30, min_delay: float = 1.0, max_delay: float = 30.0):
        self.broker = broker
        self.client_id = client_id
        self.metrics = metrics
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.min_delay, self.max_delay = min_delay, max_delay
        self.refused: BrokerRefusedMqtt5 | None = None
        self.tls_failure: str | None = None  # the last failed TLS handshake, in words
        self.generation = 0
        self.connected = False
        self._writable = True
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._connack: asyncio.Future[mqtt5.ConnAckPacket] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._last_write = 0.0
        # One connection among thousands (a device) logs its connects and losses at DEBUG.
        self.log_level = logging.INFO

    # -- hooks -------------------------------------------------------------------------------
    def _on_connected(self, connack: mqtt5.ConnAckPacket) -> None: ...

    def _on_packet(self, packet: object) -> None: ...

    def _after_packets(self) -> None: ...

    def _on_lost(self) -> None: ...

    def _on_writable(self) -> None: ...

    async def _before_connect(self) -> None:
        """Awaited before every connection attempt (a device fleet paces its connects here)."""

    def _retry_delay(self, delay: float) -> float:
        """Seconds to wait before the next attempt, given the back-off `delay`."""
        return delay

    def _report_up(self, up: bool) -> None:
        self.metrics.connected.set(1 if up else 0)

    def _goodbye(self) -> bytes:
        """The DISCONNECT sent by `close`."""
        return mqtt5.DisconnectPacket().write()

    def _will(self) -> mqtt5.Will | None:
        """The Last Will of the next CONNECT (asked once per connection attempt)."""
        return None

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep_connected(), name=f"{self.client_id}-connection"), asyncio.create_task(self._keep_alive(), name=f"{self.client_id}-keepalive")]

    async def close(self) -> None:
        self._closing = True
        if self._transport is not None and self.connected:
            self._transport.write(self._goodbye())
            self._transport.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)
            self._last_write = time.monotonic()

    @property
    def writable(self) -> bool:
        return self.connected and self._writable

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._buffer.clear()
        self._writable = True
        password = self.broker.password.encode() if self.broker.password is not None else None
        connect = mqtt5.ConnectPacket(self.client_id, username=self.broker.username, password=password, clean_start=self.clean_start, keep_alive=self.keepalive, session_expiry_interval=self.session_expiry, will=self._will())
        self.write(connect.write())

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._connack is not None and not self._connack.done() and buffer.startswith(MQTT311_UNACCEPTABLE_PROTOCOL):
            self._connack.set_exception(BrokerRefusedMqtt5(f"broker {self.broker.url} does not speak MQTT 5"))
            return
        view, offset = memoryview(buffer), 0
        try:
            while offset < len(buffer):
                try:
                    packet, size = mqtt5.read(view[offset:])
                except IndexError:  # an incomplete packet: wait for the rest
                    break
                offset += size
                if isinstance(packet, mqtt5.ConnAckPacket):
                    self._on_connack(packet)
                elif isinstance(packet, mqtt5.DisconnectPacket):
                    log.warning("broker %s disconnected us: %s", self.broker.url, packet.reason_code.name)
                elif not isinstance(packet, mqtt5.PingRespPacket):
                    self._on_packet(packet)
        except ValueError as exc:  # the broker sent something that is not MQTT 5: drop the connection
            log.error("malformed packet from broker %s: %s", self.broker.url, exc)
            self.metrics.error("protocol_error").inc()
            if self._transport is not None:
                self._transport.close()
        finally:
            view.release()
        del buffer[:offset]
        if self.connected:
            self._after_packets()

    def _on_connack(self, packet: mqtt5.ConnAckPacket) -> None:
        if self._connack is None or self._connack.done():
            return
        if packet.reason_code == mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            self._connack.set_exception(BrokerRefusedMqtt5(f"broker {self.broker.url} does not speak MQTT 5"))
        elif packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            self._connack.set_exception(BrokerRefusedConnection(f"broker {self.broker.url} refused the connection: {packet.reason_code.name}"))
        else:
            self.generation += 1
            self.connected = True
            self._connack.set_result(packet)
            self._on_connected(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        was_connected = self.connected
        self.connected = False
        self._transport = None
        if was_connected:
            self._on_lost()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(exc or ConnectionResetError("connection closed before CONNACK"))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._on_writable()

    # -- connection management ---------------------------------------------------------------
    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        context = self.broker.ssl_context()
        delay = self.min_delay
        while not self._closing:
            self._connack, self._lost = loop.create_future(), loop.create_future()
            # An answer that comes after its wait timed out is dropped without a "never retrieved" warning.
            self._connack.add_done_callback(lambda f: f.cancelled() or f.exception())
            await self._before_connect()
            try:
                await loop.create_connection(lambda: self, self.broker.host, self.broker.port, ssl=context)
                connack = await asyncio.wait_for(asyncio.shield(self._connack), CONNACK_TIMEOUT)
            except BrokerRefusedMqtt5 as exc:
                self.refused = exc
                if self._transport is not None:
                    self._transport.close()
                return
            except (OSError, asyncio.TimeoutError) as exc:
                tls_failure = describe_tls_failure(exc, self.broker.url)
                if isinstance(exc, BrokerRefusedConnection):
                    log.error("%s; retrying in %.0f s", exc, delay)
                    self.metrics.error("connect_refused").inc()
                elif tls_failure:
                    # A configuration fault, not a network one; retried all the same (a Secret
                    # or the broker's certificate may be replaced while we wait).
                    self.tls_failure = tls_failure
                    log.error("%s; retrying in %.0f s", tls_failure, delay)
                    self.metrics.error("tls_handshake").inc()
                else:
                    log.log(logging.WARNING if self.log_level >= logging.INFO else self.log_level, "cannot reach broker %s (%s); retrying in %.0f s", self.broker.url, exc or type(exc).__name__, delay)
                if self._transport is not None:
                    self._transport.close()
                await asyncio.sleep(self._retry_delay(delay))
                delay = min(delay * 2, self.max_delay)
                continue
            delay = self.min_delay
            log.log(self.log_level, "connected to broker %s (MQTT 5, session present: %s, receive maximum %d)", self.broker.url, connack.session_present, connack.receive_max)
            self._report_up(True)
            await self._lost
            self._report_up(False)
            if not self._closing:
                log.log(logging.WARNING if self.log_level >= logging.INFO else self.log_level, "lost the broker %s; reconnecting with back-off", self.broker.url)
                self.metrics.error("connection_lost").inc()
                await asyncio.sleep(self._retry_delay(delay))
                delay = min(delay * 2, self.max_delay)

    async def _keep_alive(self) -> None:
        """A PINGREQ when nothing was written for half the keep-alive, so an idle link stays up."""
        while True:
            await asyncio.sleep(self.keepalive / 4)
            if self.connected and time.monotonic() - self._last_write > self.keepalive / 2:
                self.write(mqtt5.PingReqPacket().write())
