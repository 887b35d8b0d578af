"""MQTT 5 options and MQTT 3.1.1, through the real Debian Mosquitto: user properties carrying seq
and source timestamp, message expiry and topic aliases as an independent MQTT 5 client (paho's own
MQTT 5 codec) sees them; the simulator's byte stream shows the aliases; `mqttVersion: "3.1.1"`
makes both sides speak 3.1.1 (the broker's log says so); and the collector stores every reading
once either way."""

from __future__ import annotations

import json
import re
import socket
import threading

import mqtt5
import paho.mqtt.client as mqtt
import pandas as pd

from sensorfleet.runtime import free_port
from sensorfleet.testing import component, mosquitto_broker, wait_until

from .conftest import published_of

PREFIX = "sensorfleet/proto"


class RecordingProxy:
    """A TCP relay on 127.0.0.1 that keeps every byte the client sent (to decode its packets)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.sent = bytearray()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if record:
                    self.sent.extend(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def publishes(self) -> list[mqtt5.PublishPacket]:
        data, packets, at = bytes(self.sent), [], 0
        while at < len(data):
            try:
                packet, size = mqtt5.read(data[at:])
            except Exception:  # a packet cut off by the end of the recording
                break
            at += size
            if isinstance(packet, mqtt5.PublishPacket):
                packets.append(packet)
        return packets

    def close(self) -> None:
        self._server.close()


def independent_subscriber(port: int) -> tuple[mqtt.Client, list]:
    got: list = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="independent-v5", protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(f"{PREFIX}/#", qos=1)
    client.on_message = lambda _c, _u, m: got.append((m.topic, m.payload, getattr(m.properties, "UserProperty", None),
                                                      getattr(m.properties, "MessageExpiryInterval", None)))
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client, got


def test_user_properties_expiry_and_topic_aliases_as_an_independent_mqtt5_client_sees_them(write_fleet, tmp_path):
    fleet = write_fleet("mqtt", devices=20, interval=0.1, userProperties=True, messageExpiry=600, topicAliases=True)
    with mosquitto_broker(tmp_path / "broker") as broker:
        proxy = RecordingProxy(broker.port)
        subscriber, got = independent_subscriber(broker.port)
        data = tmp_path / "data"
        collector = component("collect", "mqtt", fleet, tmp_path, "--data", str(data), "--broker", broker.url, "--client-id", "v5-collector").start()
        try:
            wait_until(lambda: collector.metric("sensorfleet_connected") == 1 and subscriber.is_connected(), 30, message="both subscribers connected")
            simulator = component("simulate", "mqtt", fleet, tmp_path, "--duration", "4", "--broker", f"mqtt://127.0.0.1:{proxy.port}").start()
            assert simulator.wait(60) == 0, simulator.log()
            published = published_of(simulator)
            wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= published, 30, message=f"{published} readings stored")
            assert collector.metric("sensorfleet_readings_lost_total") == 0 and collector.metric("sensorfleet_readings_duplicate_total") == 0
            wait_until(lambda: sum(len(json.loads(p)) for _, p, _, _ in got) >= published, 30, message="the independent client got every reading")
        finally:
            assert collector.stop() == 0, collector.log()
            subscriber.loop_stop()
            subscriber.disconnect()
            proxy.close()
        broker_log = broker.log_path.read_text()

    # What the independent client sees: full topic names, seq and ts as in the payload, the expiry.
    assert {t for t, _, _, _ in got} == {f"{PREFIX}/mqtt-{d:05d}" for d in range(20)}
    for topic, payload, properties, expiry in got:
        docs = json.loads(payload)
        assert properties == [("seq", str(docs[0]["seq"])), ("ts", docs[0]["ts"])], (topic, properties)
        assert {(d["seq"], d["ts"]) for d in docs} == {(docs[0]["seq"], docs[0]["ts"])}
        assert expiry is not None and 590 <= expiry <= 600  # what is left of it when the broker forwards
    # What the simulator sent: each of the broker's 10 aliases set once with its topic, then the
    # alias alone; the other topics in full.
    sent = proxy.publishes()
    assert len(sent) * 3 >= published
    first: dict[int, str] = {}
    for packet in sent:
        assert packet.message_expiry_interval == 600
        if packet.topic_alias is None:
            assert packet.topic.startswith(PREFIX)
        elif packet.topic:
            assert packet.topic_alias not in first, "an alias is set once a connection"
            first[packet.topic_alias] = packet.topic
        else:
            assert packet.topic_alias in first, "an alias used before it was set"
    assert sorted(first) == list(range(1, 11)) and len(set(first.values())) == 10
    assert sum(1 for p in sent if p.topic == "") > len(sent) / 3, "most messages travel as an alias"
    assert re.search(r"as proto-mqtt-sim-0-\w+ \(p5,", broker_log) and "as v5-collector (p5," in broker_log

    df = pd.read_parquet(data)
    assert len(df) == published and not df.duplicated(["device", "sensor", "seq"]).any()


def test_mqtt_version_3_1_1_on_both_sides_stores_every_reading_once(write_fleet, tmp_path):
    fleet = write_fleet("mqtt", devices=20, interval=0.1, mqttVersion="3.1.1")
    with mosquitto_broker(tmp_path / "broker") as broker:
        data = tmp_path / "data"
        collector = component("collect", "mqtt", fleet, tmp_path, "--data", str(data), "--broker", broker.url, "--client-id", "v311-collector").start()
        try:
            wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 30, message="collector connected")
            simulator = component("simulate", "mqtt", fleet, tmp_path, "--duration", "4", "--broker", broker.url).start()
            assert simulator.wait(60) == 0, simulator.log()
            published = published_of(simulator)
            assert published > 1000
            wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= published, 30, message=f"{published} readings stored")
            assert collector.metric("sensorfleet_readings_lost_total") == 0 and collector.metric("sensorfleet_readings_duplicate_total") == 0
        finally:
            assert collector.stop() == 0, collector.log()
        broker_log = broker.log_path.read_text()
    # Mosquitto logs each client's protocol: p2 is MQTT 3.1.1, p5 MQTT 5.
    assert re.search(r"as proto-mqtt-sim-0-\w+ \(p2,", broker_log), broker_log[-2000:]
    assert "as v311-collector (p2," in broker_log, broker_log[-2000:]
    df = pd.read_parquet(data)
    assert len(df) == published and not df.duplicated(["device", "sensor", "seq"]).any()
