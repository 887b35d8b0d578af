"""The simulator's MQTT 5 publisher: a bounded queue in front of one `Mqtt5Connection`.

Kept from the paho path: QoS 1 (a message leaves the queue when its PUBACK arrives), a bounded
in-flight window (`maxInflight`, never more than the broker's Receive Maximum), a bounded queue
(`maxQueued`; what does not fit is dropped and counted, never blocked on), reconnect with back-off,
and unacknowledged messages sent again after a reconnect (a clean session: the broker forgot
their packet ids; the collector recognises the repeats as duplicates). One scheduler pass becomes
one `transport.write` of all the PUBLISH packets the window allows.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import mqtt5

from sensorfleet.metrics import FleetMetrics
from sensorfleet.mqtt5_session import MAX_PACKET_ID, Mqtt5Connection
from sensorfleet.runtime import BrokerAddress

# (topic, payload, readings in it), or with MQTT 5 user properties a 4th element [(name, value), ...]
Message = tuple


class Mqtt5Publisher(Mqtt5Connection):
    """`publish` never blocks; the event loop drives the network. `dropped` counts readings not queued."""

    def __init__(self, broker: BrokerAddress, client_id: str, metrics: FleetMetrics, *, qos: int, max_inflight: int, max_queued: int, keepalive: int = 30,
                 message_expiry: int = 0, topic_aliases: bool = False):
        super().__init__(broker, client_id, metrics, clean_start=True, keepalive=keepalive)
        self.qos = qos
        self.message_expiry = message_expiry or None  # seconds; None: the property is left out
        self.topic_aliases = topic_aliases
        self._aliases: dict[str, int] = {}  # topic -> alias, for this connection only
        self._alias_max = 0  # the broker's Topic Alias Maximum (CONNACK), when topic_aliases
        self.max_inflight = min(max_inflight, MAX_PACKET_ID)
        self.max_queued = max_queued
        self.queue: deque[Message] = deque()
        self.inflight: dict[int, Message] = {}  # packet id -> message, in the order sent
        self.window = self.max_inflight
        self.dropped = 0
        self._next_id = 0
        self._acked = False

    # -- the simulator's side ----------------------------------------------------------------
    def publish(self, messages: list[Message]) -> int:
        """Queue messages for sending; returns the readings accepted (the rest are dropped, counted)."""
        room = self.max_queued - len(self.queue) - len(self.inflight)
        accepted = messages if len(messages) <= room else messages[: max(0, room)]
        self.queue.extend(accepted)
        if len(accepted) < len(messages):
            lost = sum(m[2] for m in messages[len(accepted) :])
            self.metrics.dropped("queue_full").inc(lost)
            self.dropped += lost
        self._send_queued()
        return sum(m[2] for m in accepted)

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

    # -- sending -----------------------------------------------------------------------------
    def _packet_id(self) -> int:
        while True:  # the window is below the id space, so a free id is always near
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in self.inflight:
                return self._next_id

    def _send_queued(self) -> None:
        """Everything the window allows, as one write."""
        if not (self.writable and self.queue):
            return
        queue, inflight, chunks = self.queue, self.inflight, []
        plain = self.message_expiry is None and not self._alias_max  # the hot path: no properties but the messages' own
        if self.qos == 0:
            while queue:
                message = queue.popleft()
                chunks.append(mqtt5.PublishPacket(message[0], message[1], user_properties=message[3] if len(message) > 3 else None).write()
                              if plain else self._packet(message))
        else:
            qos = mqtt5.QoS.AT_LEAST_ONCE
            room = self.window - len(inflight)
            while queue and room > 0:
                message = queue.popleft()
                packet_id = self._packet_id()
                inflight[packet_id] = message
                if plain and len(message) == 3:
                    chunks.append(mqtt5.PublishPacket(message[0], message[1], qos=qos, packet_id=packet_id).write())
                else:
                    chunks.append(self._packet(message, qos=qos, packet_id=packet_id))
                room -= 1
        if chunks:
            self.write(b"".join(chunks))

    def _packet(self, message: Message, **packet_id_and_qos) -> bytes:
        """One PUBLISH with the MQTT 5 properties of the spec: message expiry, topic alias, user properties."""
        topic, alias = message[0], None
        if self._alias_max:
            alias = self._aliases.get(topic)
            if alias is not None:
                topic = ""  # MQTT 5 §3.3.2.3.4: a known alias stands for the topic name
            elif len(self._aliases) < self._alias_max:
                alias = self._aliases[topic] = len(self._aliases) + 1  # sent with its topic once: the broker learns it
        return mqtt5.PublishPacket(topic, message[1], message_expiry_interval=self.message_expiry, topic_alias=alias,
                                   user_properties=message[3] if len(message) > 3 else None, **packet_id_and_qos).write()

    # -- Mqtt5Connection hooks ---------------------------------------------------------------
    def _on_connected(self, connack: mqtt5.ConnAckPacket) -> None:
        self.window = min(self.max_inflight, connack.receive_max)
        # Aliases live as long as a connection: a new one starts with none.
        self._aliases.clear()
        self._alias_max = connack.topic_alias_max if self.topic_aliases else 0
        self._send_queued()

    def _on_packet(self, packet: object) -> None:
        if type(packet) is mqtt5.PubAckPacket:
            message = self.inflight.pop(packet.packet_id, None)
            self._acked = True
            if message is not None and packet.reason_code.value >= 0x80:  # refused by the broker (e.g. not authorised)
                self.metrics.dropped("broker_refused").inc(message[2])
                self.dropped += message[2]
        # The simulator subscribes to nothing: no PUBLISH arrives.

    def _after_packets(self) -> None:
        if self._acked:
            self._acked = False
            self._send_queued()

    def _on_writable(self) -> None:
        self._send_queued()

    def _on_lost(self) -> None:
        # Unacknowledged messages go back to the front of the queue, in the order they were sent.
        self.queue.extendleft(reversed(self.inflight.values()))
        self.inflight.clear()
