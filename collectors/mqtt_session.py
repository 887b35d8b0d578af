"""The collector's MQTT 5 subscriber: a persistent session on one `Mqtt5Connection`, run by an
asyncio loop in the collector's network thread.

Kept from the paho path: a persistent session (clean start off, the session outlives a disconnect
by `SESSION_EXPIRY`), a QoS 1 subscription renewed on every connect (a broker restarted without
persistence forgot it), and acknowledgement only after a batch is written: `ack` (from the writer
thread) sends the PUBACKs of a written batch, all in one write, and only on the connection the
messages came in on — after a reconnect the broker sends them again and the tracker drops the copies.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

import mqtt5

from sensorfleet.metrics import FleetMetrics
from sensorfleet.mqtt5_session import BrokerRefusedMqtt5, Mqtt5Connection, broker_speaks_mqtt5
from sensorfleet.runtime import BrokerAddress
from sensorfleet.tls import describe_tls_failure

log = logging.getLogger(__name__)

# Seconds the broker keeps a disconnected collector's session and queued messages (Mosquitto's
# `persistent_client_expiration` is the broker's own bound, 7 days in our configuration).
SESSION_EXPIRY = 7 * 24 * 3600

# (payload, topic, packet id, qos, connection generation, received at)
Delivery = tuple[bytes, str, int, int, int, datetime]


class Mqtt5Subscriber(Mqtt5Connection):
    def __init__(self, broker: BrokerAddress, client_id: str, metrics: FleetMetrics, topic: str, deliver: Callable[[Delivery], None], *, stale_topic: str | None = None, keepalive: int = 30):
        super().__init__(broker, client_id, metrics, clean_start=False, session_expiry=SESSION_EXPIRY, keepalive=keepalive)
        self.topic = topic
        self.stale_topic = stale_topic
        self.deliver = deliver
        self.loop: asyncio.AbstractEventLoop | None = None

    def _on_connected(self, connack: mqtt5.ConnAckPacket) -> None:
        # Subscribe on every connect: a broker restarted without persistence forgot the session.
        # The broker handles the packets in order, so no reading finds neither subscription.
        subscribe = mqtt5.SubscribePacket(1, [mqtt5.TopicFilter(self.topic, max_qos=mqtt5.QoS.AT_LEAST_ONCE)]).write()
        unsubscribe = mqtt5.UnsubscribePacket(2, [self.stale_topic]).write() if self.stale_topic else b""
        self.write(subscribe + unsubscribe)
        log.info("subscribed to %s", self.topic)

    def _on_packet(self, packet: object) -> None:
        if type(packet) is mqtt5.PublishPacket:
            self.deliver((packet.payload, packet.topic, packet.packet_id or 0, int(packet.qos.value), self.generation, datetime.now(timezone.utc)))
        elif isinstance(packet, mqtt5.SubAckPacket):
            refused = [code for code in packet.reason_codes if code.value >= 0x80]
            if refused:
                self.metrics.error("subscribe_refused").inc()
                raise ValueError(f"broker refused the subscription to {self.topic}: {refused[0].name}")

    def ack(self, packet_ids: Iterable[int], generation: int) -> None:
        """PUBACK these messages (from any thread); ignored if they came in on an earlier connection."""
        ids = list(packet_ids)
        if ids and self.loop is not None:
            self.loop.call_soon_threadsafe(self._ack, ids, generation)

    def _ack(self, ids: list[int], generation: int) -> None:
        if generation == self.generation and self.connected:
            self.write(b"".join(mqtt5.PubAckPacket(packet_id).write() for packet_id in ids))

    def run_forever(self, stop: threading.Event) -> None:
        """The network thread's body: connect, receive and acknowledge until `stop`."""
        asyncio.run(self._serve(stop))

    async def _serve(self, stop: threading.Event) -> None:
        self.loop = asyncio.get_running_loop()
        delay = self.min_delay
        while not stop.is_set():
            try:
                if not await broker_speaks_mqtt5(self.broker, f"{self.client_id}-probe"):
                    self.refused = BrokerRefusedMqtt5(f"broker {self.broker.url} does not speak MQTT 5")
                    return
                break
            except (OSError, asyncio.TimeoutError, ValueError) as exc:
                tls_failure = describe_tls_failure(exc, self.broker.url)
                if tls_failure:
                    self.tls_failure = tls_failure
                    log.error("%s; retrying in %.0f s", tls_failure, delay)
                    self.metrics.error("tls_handshake").inc()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_delay)
                    continue
                log.warning("cannot reach broker %s (%s); retrying in %.0f s", self.broker.url, exc or type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
        self.start()
        try:
            while not stop.is_set() and self.refused is None:
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.2)  # the last acknowledgements are on their way
        finally:
            await self.close()
