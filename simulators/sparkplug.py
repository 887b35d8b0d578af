"""The MQTT simulator as a Sparkplug B edge node (`payloadFormat: sparkplugB`, Eclipse Sparkplug 3.0).

Each simulator replica is the edge node `sim-<replica>` of the group `<fleet>`; each of its
devices is a Sparkplug device. What goes on the wire (payloads: sensorfleet.sparkplug):
  - CONNECT carries the Last Will NDEATH with this connection's bdSeq (0..255, one more per connect);
  - after CONNECT (and, with a primary host, only once its STATE says online): NBIRTH (seq 0,
    bdSeq, `Node Control/Rebirth`); then each device's next due tick goes out as its DBIRTH;
  - every later tick is a DDATA by alias; `seq` counts the node's messages 0..255;
  - a device whose every sensor drops out (its site's outage) sends one DDEATH and stays silent
    until a sensor reports again, which it does with a new DBIRTH;
  - an NCMD `Node Control/Rebirth` = true: a new NBIRTH and DBIRTHs, as on connect;
  - the primary host's STATE going offline: the node sends NDEATH, disconnects and publishes
    nothing until the host is back (due ticks wait and go out late, so none is lost).

Messages already queued when a new NBIRTH is made stay ahead of it (the node's QoS 1 backlog of a
lost connection included): nothing is dropped, and the host keeps the aliases of the last DBIRTH.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import mqtt5
import numpy as np

from sensorfleet.metrics import FleetMetrics
from sensorfleet.runtime import BrokerAddress
from sensorfleet.signals import ANOMALY_NAMES, QUALITY_BAD, QUALITY_NAMES, SignalModel, TickBlock, device_id
from sensorfleet.simulators.mqtt_session import Message, Mqtt5Publisher
from sensorfleet.sparkplug.device import DeviceMessages, SensorValue
from sensorfleet.sparkplug.payload import NAMESPACE, decode, node_birth, node_death, state_topic, wants_rebirth

log = logging.getLogger(__name__)
BIRTH_DUE, ALIVE, SILENT = 0, 1, 2


class SparkplugEncoder:
    """TickBlocks -> DBIRTH/DDATA/DDEATH messages, keeping each device's Sparkplug state and the
    node's message counter. `node_birth` starts a new birth round."""

    def __init__(self, model: SignalModel, edge_node: str, devices: np.ndarray):
        self.model = model
        self.edge_node = edge_node
        base = f"{NAMESPACE}/{model.fleet}"
        self.node_topics = {kind: f"{base}/{kind}/{edge_node}" for kind in ("NBIRTH", "NDEATH", "NCMD")}
        sensors = [(s.name, s.unit) for s in model.sensors]
        self.slot = {int(d): i for i, d in enumerate(devices.tolist())}
        self.messages_of = [DeviceMessages(i, sensors) for i in range(len(devices))]
        names = [device_id("mqtt", int(d)) for d in devices.tolist()]
        self.topics = [{kind: f"{base}/{kind}/{edge_node}/{n}" for kind in ("DBIRTH", "DDATA", "DDEATH")} for n in names]
        self.state = np.full(len(devices), BIRTH_DUE, dtype=np.int8)
        self.n_sensors = len(sensors)
        self.seq = 0
        self.bdseq = 0

    def _next_seq(self) -> int:
        seq = self.seq
        self.seq = (seq + 1) % 256
        return seq

    def node_birth(self, now: float) -> Message:
        self.seq = 1  # the NBIRTH is seq 0
        self.state[:] = BIRTH_DUE
        return (self.node_topics["NBIRTH"], node_birth(self.bdseq, int(now * 1000)), 0)

    def messages(self, block: TickBlock) -> list[Message]:
        out: list[Message] = []
        values, quality, anomaly = block.values.tolist(), block.quality.tolist(), block.anomaly.tolist()
        for i, (d, k, t) in enumerate(zip(block.devices.tolist(), block.ticks.tolist(), block.times.tolist())):
            slot = self.slot[d]
            q = quality[i]
            readings = [SensorValue(None if q[s] == QUALITY_BAD else values[i][s], QUALITY_NAMES[q[s]], ANOMALY_NAMES[anomaly[i][s]]) for s in range(self.n_sensors)]
            silent = all(code == QUALITY_BAD for code in q)
            state, device, topics, ms = self.state[slot], self.messages_of[slot], self.topics[slot], int(t * 1000)
            if state == BIRTH_DUE or (state == SILENT and not silent):
                out.append((topics["DBIRTH"], device.birth(self._next_seq(), k, ms, readings), self.n_sensors))
                self.state[slot] = ALIVE
            elif state == ALIVE and silent:
                out.append((topics["DDEATH"], device.death(self._next_seq(), k, ms, readings), self.n_sensors))
                self.state[slot] = SILENT
            elif state == ALIVE:
                out.append((topics["DDATA"], device.data(self._next_seq(), k, ms, readings), self.n_sensors))
            # SILENT and still silent: nothing to say
        return out


class SparkplugPublisher(Mqtt5Publisher):
    """Mqtt5Publisher plus the edge node's session: Last Will, births, NCMD and STATE."""

    def __init__(self, broker: BrokerAddress, client_id: str, metrics: FleetMetrics, encoder: SparkplugEncoder, *, primary_host: str | None, **limits: int):
        super().__init__(broker, client_id, metrics, **limits)
        self.encoder = encoder
        self.primary_host = primary_host
        self.host_online = primary_host is None
        self.connects = 0
        self.births = 0

    @property
    def ready(self) -> bool:
        """Whether the node may publish: connected and born (with a primary host: while it is online)."""
        return self.connected and self.host_online

    def _will(self) -> mqtt5.Will:
        self.encoder.bdseq = self.connects % 256
        self.connects += 1
        return mqtt5.Will(self.encoder.node_topics["NDEATH"], payload=node_death(self.encoder.bdseq), qos=mqtt5.QoS.AT_LEAST_ONCE)

    def _on_connected(self, connack: mqtt5.ConnAckPacket) -> None:
        filters = [mqtt5.TopicFilter(self.encoder.node_topics["NCMD"], max_qos=mqtt5.QoS.AT_LEAST_ONCE)]
        if self.primary_host is not None:
            self.host_online = False  # until its (retained) STATE says otherwise
            filters.append(mqtt5.TopicFilter(state_topic(self.primary_host), max_qos=mqtt5.QoS.AT_LEAST_ONCE))
        self.write(mqtt5.SubscribePacket(1, filters).write())
        if self.host_online:
            self._birth("connected")
        super()._on_connected(connack)

    def _birth(self, why: str) -> None:
        """A new NBIRTH behind what is queued; the devices' births follow with their next ticks."""
        self.queue.append(self.encoder.node_birth(time.time()))
        self.births += 1
        log.info("edge node %s: NBIRTH (bdSeq %d, %s)", self.encoder.edge_node, self.encoder.bdseq, why)
        self._send_queued()

    def _on_packet(self, packet: object) -> None:
        if type(packet) is not mqtt5.PublishPacket:
            super()._on_packet(packet)
            return
        if packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
            self.write(mqtt5.PubAckPacket(packet.packet_id).write())
        if packet.topic == self.encoder.node_topics["NCMD"]:
            try:
                rebirth = wants_rebirth(decode(packet.payload, packet.topic))
            except ValueError as exc:
                log.warning("edge node %s: unreadable NCMD ignored: %s", self.encoder.edge_node, exc)
                self.metrics.error("sparkplug_bad_ncmd").inc()
                return
            if rebirth and self.host_online:
                self._birth("rebirth requested")
        elif self.primary_host is not None and packet.topic == state_topic(self.primary_host):
            self._on_state(packet.payload)

    def _on_state(self, payload: bytes) -> None:
        try:
            online = json.loads(payload).get("online") is True
        except (ValueError, AttributeError):
            online = payload.strip().upper() == b"ONLINE"  # Sparkplug 2.x hosts
        if online and not self.host_online:
            self.host_online = True
            self._birth(f"primary host {self.primary_host} online")
        elif not online and self.host_online:
            self.host_online = False  # nothing new goes out from here on
            self._tasks.append(asyncio.get_running_loop().create_task(self._end_session(), name=f"{self.client_id}-end-session"))

    async def _end_session(self, timeout: float = 5.0) -> None:
        """Sparkplug 3.0: with its primary host offline the node ends its session (NDEATH,
        disconnect) and waits for the host. Messages in flight are acknowledged first, so none
        is sent twice after the reconnect."""
        deadline = time.monotonic() + timeout
        while self.inflight and self.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not self.connected or self.host_online:
            return
        log.info("edge node %s: primary host %s offline; NDEATH and disconnect", self.encoder.edge_node, self.primary_host)
        self.write(mqtt5.PublishPacket(self.encoder.node_topics["NDEATH"], node_death(self.encoder.bdseq, int(time.time() * 1000))).write())
        self.write(mqtt5.DisconnectPacket().write())
        if self._transport is not None:
            self._transport.close()

    def _send_queued(self) -> None:
        if self.host_online:
            super()._send_queued()

    async def close(self) -> None:
        if self.connected and self.host_online:  # a clean DISCONNECT does not fire the Last Will
            self.write(mqtt5.PublishPacket(self.encoder.node_topics["NDEATH"], node_death(self.encoder.bdseq, int(time.time() * 1000))).write())
        await super().close()


def sparkplug_edge_node(model: SignalModel, devices: np.ndarray, replica: int, broker: BrokerAddress, client_id: str, metrics: FleetMetrics, primary_host: str | None, limits: dict[str, int]) -> tuple[SparkplugEncoder, SparkplugPublisher]:
    encoder = SparkplugEncoder(model, f"sim-{replica}", devices)
    return encoder, SparkplugPublisher(broker, client_id, metrics, encoder, primary_host=primary_host, **limits)
