"""MQTT end to end through real brokers: every published reading is stored exactly once,
across broker restarts and collector crashes."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pandas as pd
import paho.mqtt.client as mqtt
import pytest

from sensorfleet.reading import reading_from_wire
from sensorfleet.signals import SignalModel
from sensorfleet.spec import load_fleet
from sensorfleet.testing import component, wait_until

# Short intervals so a few seconds carry thousands of readings.
FAST = {"protocols": {"mqtt": {"devices": 40, "interval": 0.1}}, "collector": {"flushInterval": 0.5}}


def stored(data) -> pd.DataFrame:
    return pd.read_parquet(data) if data.exists() else pd.DataFrame(columns=["device", "sensor", "seq"])


def assert_complete(df: pd.DataFrame, published: float) -> None:
    assert len(df) == published, f"stored {len(df)} of {published:.0f} published"
    assert not df.duplicated(["device", "sensor", "seq"]).any(), "duplicates stored"
    gaps = df.groupby(["device", "sensor"])["seq"].agg(lambda s: s.max() - s.min() + 1 - s.nunique())
    assert gaps.sum() == 0, "sequence gaps in the dataset"


def run_pair(fleet_path, tmp_path, broker, seconds: float, *, during=None):
    data = tmp_path / "data"
    collector = component("collect", "mqtt", fleet_path, tmp_path, "--data", str(data), "--broker", broker.url, "--client-id", "test-collector").start()
    wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 15, message="collector connected")
    simulator = component("simulate", "mqtt", fleet_path, tmp_path, "--broker", broker.url, "--duration", str(seconds)).start()
    if during:
        during(simulator, collector)
    assert simulator.wait(seconds + 60) == 0, simulator.log()
    published = None
    for line in simulator.log().splitlines():
        if "published" in line and "readings, dropped" in line:
            published = int(line.split("published ")[1].split(" readings")[0])
    assert published, simulator.log()
    wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= published, 30, message=f"{published} readings stored")
    totals = {m: collector.metric(f"sensorfleet_readings_{m}_total") for m in ("received", "stored", "lost", "late", "duplicate")}
    # paho may reorder QoS 1 messages under load: a reading first counted lost then arriving is "late"
    totals["lost"] -= totals.pop("late")
    assert collector.stop() == 0
    return data, published, totals, collector


def test_every_published_reading_is_stored_once(write_fleet, tmp_path, any_broker):
    fleet = write_fleet(FAST)
    data, published, totals, _ = run_pair(fleet, tmp_path, any_broker, 4)
    assert published > 1000
    assert totals["lost"] == 0 and totals["duplicate"] == 0
    assert totals["stored"] == published
    assert_complete(stored(data), published)


def test_gateway_batches_are_delivered(write_fleet, tmp_path, mosquitto):
    fleet = write_fleet({**FAST, "protocols": {"mqtt": {"devices": 40, "interval": 0.1, "messageMode": "gateway", "gatewayBatch": 100}}})
    data, published, totals, _ = run_pair(fleet, tmp_path, mosquitto, 3)
    assert_complete(stored(data), published)


def test_per_reading_topics_and_qos0_are_delivered(write_fleet, tmp_path, mosquitto):
    fleet = write_fleet({**FAST, "protocols": {"mqtt": {"devices": 20, "interval": 0.2, "messageMode": "perReading", "qos": 0}}})
    data, published, totals, _ = run_pair(fleet, tmp_path, mosquitto, 3)
    assert_complete(stored(data), published)
    assert set(stored(data)["sensor"]) == {"temperature", "humidity", "pressure"}


def test_broker_restart_with_qos1_loses_nothing(write_fleet, tmp_path, mosquitto):
    fleet = write_fleet(FAST)

    def restart_broker(simulator, collector):
        time.sleep(1.5)
        mosquitto.restart(down_for=1.0)

    data, published, totals, collector = run_pair(fleet, tmp_path, mosquitto, 6, during=restart_broker)
    assert totals["lost"] == 0
    assert_complete(stored(data), published)
    assert "lost the broker" in collector.log()


def test_collector_killed_and_restarted_loses_nothing(write_fleet, tmp_path, mosquitto):
    fleet = write_fleet(FAST)
    data = tmp_path / "data"
    args = ("--data", str(data), "--broker", mosquitto.url, "--client-id", "crashy-collector")
    first = component("collect", "mqtt", fleet, tmp_path, *args).start()
    wait_until(lambda: first.metric("sensorfleet_connected") == 1, 15, message="collector connected")
    simulator = component("simulate", "mqtt", fleet, tmp_path, "--broker", mosquitto.url, "--duration", "6").start()
    wait_until(lambda: first.metric("sensorfleet_readings_stored_total") > 200, 20, message="first batches stored")
    first.signal(signal.SIGKILL)  # no flush, no goodbye: unacknowledged messages stay with the broker
    first.wait(10)
    time.sleep(1.0)
    second = component("collect", "mqtt", fleet, tmp_path, *args).start()
    assert simulator.wait(60) == 0
    published = int(simulator.log().split("published ")[1].split(" readings")[0])
    wait_until(lambda: len(stored(data)) >= published, 30, message="every reading stored")
    assert second.metric("sensorfleet_readings_lost_total") == second.metric("sensorfleet_readings_late_total")
    assert second.stop() == 0
    assert_complete(stored(data), published)


@pytest.mark.parametrize("mode", ["perDevice", "gateway"])
def test_encoder_matches_the_reading_schema(write_fleet, mode):
    from sensorfleet.simulators.mqtt import PayloadEncoder

    fleet = load_fleet(write_fleet({"anomalies": {"spikeProbability": 0.2, "stuckProbability": 0.2, "dropoutProbability": 0.2}}))
    m = SignalModel(fleet.spec, fleet.name, "mqtt")
    block = m.block(np.arange(50), np.arange(1000, 1050))
    expected = [r.to_wire() for r in m.readings(block)]
    encoded = [doc for _, payload, _ in PayloadEncoder(m, "sensorfleet", mode, "0", 40).messages(block) for doc in json.loads(payload)]
    assert encoded == expected
    assert all(reading_from_wire(doc) for doc in encoded)
    assert {d["anomaly"] for d in encoded} >= {"spike", "stuck", "dropout"}


def test_replayed_csv_is_published_and_stored(write_fleet, tmp_path, mosquitto):
    rows = ["timestamp,device,sensor,value"]
    for i in range(20):
        for device in ("pump-1", "pump-2"):
            rows.append(f"2025-01-01T00:00:{i:02d}Z,{device},temperature,{20 + i * 0.1:.1f}")
    csv = tmp_path / "recording.csv"
    csv.write_text("\n".join(rows) + "\n")
    fleet = write_fleet({"replay": {"csv": str(csv), "speed": 10.0, "loop": True}, "collector": {"flushInterval": 0.5}})
    data, published, totals, _ = run_pair(fleet, tmp_path, mosquitto, 4.5)
    df = stored(data)
    assert_complete(df, published)
    assert published > 40, "the 2-second recording at speed 10 loops"
    assert set(df["device"]) == {"pump-1", "pump-2"}
    first_loop = df[df["seq"] < 20].sort_values(["device", "seq"])
    assert first_loop[first_loop["device"] == "pump-1"]["value"].round(1).tolist() == [round(20 + i * 0.1, 1) for i in range(20)]


def test_scaling_collector_replicas_up_and_down_stores_each_reading_once(write_fleet, tmp_path, mosquitto, monkeypatch):
    """collectorReplicas 1 -> 3 -> 1 while publishing: replica 0 drops its plain subscription when
    it joins the shared one (else every reading is stored twice), and after the scale-down it
    collects what the removed replicas' sessions still hold (older than what it stored already:
    the resume keeps those seqs open), then deletes those sessions. The simulator runs 40 s: at
    load 16 each collector takes seconds to start."""
    monkeypatch.setenv("SENSORFLEET_MQTT_RETIRE_AFTER_SECONDS", "2")  # the removed replicas are gone already
    one = write_fleet(FAST, name="demo")
    three = write_fleet({**FAST, "protocols": {"mqtt": {**FAST["protocols"]["mqtt"], "collectorReplicas": 3}}}, name="demo3")
    three.write_text(three.read_text().replace("name: demo3", "name: demo"))
    data = tmp_path / "data"

    def collector(fleet, replica):
        c = component("collect", "mqtt", fleet, tmp_path, "--data", str(data), "--broker", mosquitto.url, "--client-id", f"demo-mqtt-collector-{replica}").start()
        wait_until(lambda: c.metric("sensorfleet_connected") == 1, 30, message=f"collector {replica} connected")
        return c

    first = collector(one, 0)
    simulator = component("simulate", "mqtt", one, tmp_path, "--broker", mosquitto.url, "--duration", "40").start()
    wait_until(lambda: first.metric("sensorfleet_readings_stored_total") > 300, 30, message="first batches stored")
    assert first.stop() == 0
    scaled = [collector(three, r) for r in range(3)]
    wait_until(lambda: all(c.metric("sensorfleet_readings_stored_total") > 50 for c in scaled), 30, message="three replicas storing")
    for c in reversed(scaled):  # scale down: replicas 2 and 1 go, then 0 restarts with the new spec
        assert c.stop() == 0
    time.sleep(1.0)  # readings published now are queued in the sessions of all three
    last = collector(one, 0)
    assert simulator.wait(150) == 0, simulator.log()
    published = int(simulator.log().split("published ")[1].split(" readings")[0])
    wait_until(lambda: len(stored(data)) >= published, 60, message="every reading stored")
    wait_until(lambda: "left in the session of removed replica demo-mqtt-collector-2" in last.log(), 30, message="replica 2's session retired")
    assert last.stop() == 0
    assert_complete(stored(data), published)
    probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-mqtt-collector-1", protocol=mqtt.MQTTv311, clean_session=False)
    present = {}
    probe.on_connect = lambda _c, _u, flags, _rc, _p: present.update(value=flags.session_present)
    probe.connect("127.0.0.1", mosquitto.port)
    probe.loop_start()
    wait_until(lambda: "value" in present, 15, message="probe connected")
    probe.disconnect()
    probe.loop_stop()
    assert present["value"] is False, "the removed replica's session was left on the broker"
