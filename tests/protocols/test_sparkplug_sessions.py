"""Sparkplug B sessions through real Mosquitto: a rebirth on request, the Last Will when an edge
node dies, and a primary host whose STATE gates publishing — none of them loses a reading.
Messages are read with Eclipse Tahu's codec (npm), as in test_sparkplug_interop.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pandas as pd
import yaml

from sensorfleet.runtime import free_port
from sensorfleet.sparkplug.payload import rebirth_request
from sensorfleet.testing import wait_until

from tests.protocols.conftest import published_of, started

FLEET = "spb"


def write_fleet(tmp_path: Path, **sparkplug) -> Path:
    doc = {
        "apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": FLEET},
        "spec": {
            "protocols": {"mqtt": {"enabled": True, "devices": 8, "interval": 0.1, "payloadFormat": "sparkplugB", "sparkplug": sparkplug}, "coap": {"enabled": False}, "opcua": {"enabled": False}},
            "collector": {"flushInterval": 0.5},
        },
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def heard(listener) -> list[tuple[str, dict]]:
    """(topic after the group, Tahu's decoding) of every message the listener got so far."""
    return [(m["topic"].split("/", 2)[2], m["tahu"]) for m in listener.messages()]


def totals(collector) -> dict[str, float]:
    t = {m: collector.metric(f"sensorfleet_readings_{m}_total") for m in ("stored", "lost", "late", "duplicate", "malformed")}
    t["lost"] -= t.pop("late")
    return t


def assert_complete(data: Path, published: int) -> None:
    df = pd.read_parquet(data)
    assert len(df) == published, f"stored {len(df)} of {published} published"
    assert not df.duplicated(["device", "sensor", "seq"]).any()
    holes = df.groupby(["device", "sensor"])["seq"].agg(lambda s: s.max() - s.min() + 1 - s.nunique())
    assert holes.sum() == 0, "sequence gaps in the dataset"


def test_rebirth_on_request_is_neither_loss_nor_duplicate(procs, tmp_path, mosquitto, tahu_listener):
    fleet = write_fleet(tmp_path)
    data = tmp_path / "data"
    collector = started(procs, "collect", "mqtt", fleet, tmp_path, "--data", str(data), "--broker", mosquitto.url, "--client-id", "spb-host")
    wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 15, message="collector connected")
    listener = tahu_listener(mosquitto.url, 300, tmp_path)
    simulator = started(procs, "simulate", "mqtt", fleet, tmp_path, "--broker", mosquitto.url, "--duration", "5")
    wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") > 100, 20, message="first readings stored")
    host = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-host", protocol=mqtt.MQTTv311)
    host.connect("127.0.0.1", mosquitto.port)
    host.loop_start()
    host.publish(f"spBv1.0/{FLEET}/NCMD/sim-0", rebirth_request(int(time.time() * 1000)), qos=1).wait_for_publish(5)
    host.disconnect()
    host.loop_stop()
    assert simulator.wait(60) == 0, simulator.log()[-3000:]
    published = published_of(simulator)
    wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= published, 30, message=f"{published} stored")
    counts = totals(collector)
    assert collector.stop() == 0
    listener.stop()
    messages = heard(listener)
    kinds = [topic.split("/")[0] for topic, _ in messages]
    assert kinds.count("NBIRTH") == 2, "one NBIRTH on connect, one for the rebirth"
    second = kinds.index("NBIRTH", 1)
    assert messages[second][1]["seq"] == 0
    reborn = {topic.rsplit("/", 1)[1] for topic, _ in messages[second:] if topic.startswith("DBIRTH/")}
    assert reborn == {f"mqtt-{i:05d}" for i in range(8)}, "every device is born again"
    assert "rebirth requested" in simulator.log()
    assert counts == {"stored": published, "lost": 0, "duplicate": 0, "malformed": 0}
    assert_complete(data, published)


def test_last_will_is_the_ndeath_of_the_session(procs, tmp_path, mosquitto, tahu_listener):
    fleet = write_fleet(tmp_path)
    data = tmp_path / "data"
    collector = started(procs, "collect", "mqtt", fleet, tmp_path, "--data", str(data), "--broker", mosquitto.url, "--client-id", "spb-host")
    wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 15, message="collector connected")
    listener = tahu_listener(mosquitto.url, 300, tmp_path)
    simulator = started(procs, "simulate", "mqtt", fleet, tmp_path, "--broker", mosquitto.url)
    wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") > 100, 20, message="readings stored")
    simulator.signal(signal.SIGKILL)  # no goodbye: the broker publishes the Last Will
    simulator.wait(10)
    listener.stop()
    collector_log_ready = lambda: collector.metric("sensorfleet_readings_stored_total") > 0  # noqa: E731
    assert collector_log_ready()
    assert collector.stop() == 0
    messages = heard(listener)
    births = [m for topic, m in messages if topic == "NBIRTH/sim-0"]
    deaths = [m for topic, m in messages if topic == "NDEATH/sim-0"]
    assert len(births) == 1 and len(deaths) == 1, [topic for topic, _ in messages if topic.startswith("N")]
    bdseq = {m["name"]: m["value"] for m in births[0]["metrics"]}["bdSeq"]
    assert deaths[0]["metrics"] == [{"name": "bdSeq", "type": "UInt64", "value": bdseq}]
    summary = json.loads(collector.log().split("SUMMARY ")[-1].splitlines()[0])
    sparkplug = json.loads(collector.log().split("SPARKPLUG ")[-1].splitlines()[0])
    assert sparkplug["messages"].get("ndeath") == 1 and summary["lost"] == 0


def test_primary_host_state_gates_the_edge_node(procs, tmp_path, mosquitto, tahu_listener):
    fleet = write_fleet(tmp_path, primaryHostId="scada")
    data = tmp_path / "data"
    args = ("--data", str(data), "--broker", mosquitto.url, "--client-id", "spb-primary")
    listener = tahu_listener(mosquitto.url, 300, tmp_path)
    simulator = started(procs, "simulate", "mqtt", fleet, tmp_path, "--broker", mosquitto.url)
    time.sleep(2.0)
    assert heard(listener) == [], "no STATE from the primary host yet: the edge node must not publish"
    first = started(procs, "collect", "mqtt", fleet, tmp_path, *args)  # the primary host comes online
    wait_until(lambda: first.metric("sensorfleet_readings_stored_total") > 100, 20, message="readings stored")
    assert first.stop() == 0  # STATE offline: the node sends NDEATH, disconnects and waits
    wait_until(lambda: "primary host scada offline" in simulator.log(), 10, message="the edge node saw the host go offline")
    time.sleep(1.0)
    second = started(procs, "collect", "mqtt", fleet, tmp_path, *args)
    wait_until(lambda: second.metric("sensorfleet_readings_stored_total") > 200, 20, message="the second host stores")
    simulator.signal(signal.SIGTERM)
    assert simulator.wait(60) == 0, simulator.log()[-3000:]
    published = published_of(simulator)
    wait_until(lambda: len(pd.read_parquet(data)) >= published, 30, message=f"{published} stored")
    counts = totals(second)
    assert second.stop() == 0
    listener.stop()
    kinds = [topic.split("/")[0] for topic, _ in heard(listener)]
    assert kinds[0] == "NBIRTH" and kinds.count("NBIRTH") >= 2 and "NDEATH" in kinds[1:]
    assert "primary host scada offline" in simulator.log()
    assert counts["lost"] == 0 and counts["duplicate"] == 0
    assert_complete(data, published)


def _run(fleet: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "sensorfleet.cli", "run", str(fleet), "--no-live", "--data", str(tmp_path / "data"), "--logs", str(tmp_path / "logs"), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "200"})


def test_sensorfleet_run_with_two_edge_nodes_and_a_primary_host(tmp_path):
    doc = yaml.safe_load(write_fleet(tmp_path, primaryHostId="scada").read_text())
    doc["spec"]["broker"] = {"port": 0}
    # metrics ports from a free one up, not 9100: other runs on the machine may hold those
    doc["spec"]["monitoring"] = {"port": free_port()}
    doc["spec"]["protocols"]["mqtt"].update(devices=30, interval=0.2, replicas=2)
    fleet = tmp_path / "run.yaml"
    fleet.write_text(yaml.safe_dump(doc))
    done = _run(fleet, tmp_path, "--duration", "8")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tail = done.stdout.split("final summary")[1]
    row = [c.strip() for c in next(line for line in tail.splitlines() if line.strip("│ ").startswith("mqtt")).strip("│").split("│")]
    published, stored, lost, duplicates = (int(row[i].replace(",", "")) for i in (3, 4, 5, 6))
    assert published > 500 and stored == published and lost == 0 and duplicates == 0, row
    df = pd.read_parquet(tmp_path / "data")
    assert len(df) == published and df["device"].nunique() == 30


def test_sparkplug_on_the_embedded_broker_is_a_clear_error(tmp_path):
    doc = yaml.safe_load(write_fleet(tmp_path).read_text())
    doc["spec"]["broker"] = {"port": 0, "mode": "embedded"}
    fleet = tmp_path / "embedded.yaml"
    fleet.write_text(yaml.safe_dump(doc))
    done = _run(fleet, tmp_path, "--duration", "3")
    assert done.returncode != 0
    assert "payloadFormat: sparkplugB needs an MQTT 5 broker" in done.stdout + done.stderr


def test_broker_restart_loses_nothing_and_starts_a_new_session(procs, tmp_path, mosquitto):
    fleet = write_fleet(tmp_path)
    data = tmp_path / "data"
    collector = started(procs, "collect", "mqtt", fleet, tmp_path, "--data", str(data), "--broker", mosquitto.url, "--client-id", "spb-host")
    wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 15, message="collector connected")
    simulator = started(procs, "simulate", "mqtt", fleet, tmp_path, "--broker", mosquitto.url, "--duration", "7")
    wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") > 100, 20, message="first readings stored")
    mosquitto.restart(down_for=1.0)  # persistence on: sessions and queued QoS 1 messages survive
    assert simulator.wait(60) == 0, simulator.log()[-3000:]
    published = published_of(simulator)
    wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= published, 40, message=f"{published} stored")
    counts = totals(collector)
    assert collector.stop() == 0
    assert "NBIRTH (bdSeq 1, connected)" in simulator.log(), "the reconnect is a new session with the next bdSeq"
    assert counts["lost"] == 0 and counts["stored"] == published
    assert_complete(data, published)
