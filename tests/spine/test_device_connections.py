"""`connectionPerDevice`: every simulated device is its own MQTT client on a real Mosquitto — its
own client id, a birth and a Last Will on `<prefix>/<fleet>/<device>/status`, paced connects, and
jittered reconnects after a broker restart with loss accounting that stays exact."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict

import paho.mqtt.client as mqtt
import pandas as pd
import pytest

from sensorfleet.metrics import FleetMetrics
from sensorfleet.runtime import SimulatorOptions, parse_broker_url
from sensorfleet.simulators.mqtt import MqttSimulator
from sensorfleet.simulators.mqtt_devices import DeviceConnections
from sensorfleet.spec import FleetSpecError, load_fleet, parse_fleet
from sensorfleet.testing import component, wait_until

from .test_mqtt_delivery import assert_complete, stored


def per_device(devices: int, **mqtt_fields) -> dict:
    return {"protocols": {"mqtt": {"devices": devices, "interval": 0.2, "connectionPerDevice": True, **mqtt_fields}}, "collector": {"flushInterval": 0.5}}


class StatusWatcher:
    """A paho client of our own, outside the simulator, recording every status message."""

    def __init__(self, broker_url: str):
        address = parse_broker_url(broker_url)
        self.seen: dict[str, list[bytes]] = defaultdict(list)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="status-watcher")
        self.client.on_connect = lambda c, *_: c.subscribe("sensorfleet/demo/+/status", qos=1)
        self.client.on_message = lambda _c, _u, m: self.seen[m.topic.split("/")[2]].append(m.payload)
        self.client.connect(address.host, address.port)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def simulator(fleet_path, broker) -> MqttSimulator:
    fleet = load_fleet(fleet_path)
    return MqttSimulator(SimulatorOptions(fleet, broker_url=broker.url), parse_broker_url(broker.url), FleetMetrics(fleet.name, "mqtt", "simulator"))


def devices_of(sim: MqttSimulator) -> DeviceConnections:
    assert isinstance(sim.publisher, DeviceConnections)
    return sim.publisher


def test_each_device_connects_with_its_own_client_id_and_announces_itself(write_fleet, tmp_path, mosquitto):
    watcher = StatusWatcher(mosquitto.url)
    sim = simulator(write_fleet(per_device(25, connectRate=500)), mosquitto)
    sim.run(threading.Event(), 2.0)
    # The broker publishes each Will as it handles the device's DISCONNECT: give it a moment.
    wait_until(lambda: sum(p[-1:] == [b"offline"] for p in list(watcher.seen.values())) == 25, 10, message="25 Wills")
    watcher.stop()
    clients = re.findall(r"New client connected from \S+ as (\S+)", mosquitto.log_path.read_text())
    devices = {f"demo-mqtt-{d:05d}" for d in range(25)}
    assert devices <= set(clients) and len([c for c in clients if c in devices]) == 25, "one connection per device, each with its own id"
    assert set(watcher.seen) == {f"mqtt-{d:05d}" for d in range(25)}
    for device, payloads in watcher.seen.items():
        assert payloads[0] == b"online", f"{device}: birth first"
        assert payloads[-1] == b"offline", f"{device}: a device switched off says so (its Will)"
    assert sim.published > 25 * 5 and sim.dropped == 0


def test_a_cut_connection_publishes_the_last_will_and_the_device_comes_back(write_fleet, tmp_path, mosquitto):
    watcher = StatusWatcher(mosquitto.url)
    sim = simulator(write_fleet(per_device(5, connectRate=100)), mosquitto)
    pool = devices_of(sim)

    async def scenario() -> None:
        stop = threading.Event()
        run = asyncio.create_task(sim.run_async(stop, None))
        await asyncio.to_thread(wait_until, lambda: pool.up == 5, 15, message="5 devices up")
        await asyncio.to_thread(wait_until, lambda: len(watcher.seen.get("mqtt-00003", [])) >= 1, 5, message="birth of mqtt-00003")
        pool.by_topic["sensorfleet/demo/mqtt-00003"].drop()  # a network cut: no DISCONNECT
        await asyncio.to_thread(wait_until, lambda: watcher.seen["mqtt-00003"][1:2] == [b"offline"], 10, message="Last Will of mqtt-00003")
        assert all(watcher.seen[f"mqtt-0000{d}"] == [b"online"] for d in (0, 1, 2, 4)), "the other devices stay online"
        await asyncio.to_thread(wait_until, lambda: watcher.seen["mqtt-00003"][2:3] == [b"online"], 10, message="mqtt-00003 back")
        stop.set()
        await run

    asyncio.run(scenario())
    watcher.stop()


def test_connect_rate_paces_the_ramp_up(write_fleet, tmp_path, mosquitto):
    sim = simulator(write_fleet(per_device(60, connectRate=30)), mosquitto)
    sim.run(threading.Event(), 3.5)
    connects = devices_of(sim).connects
    assert len(connects) == 60
    took = connects[-1] - connects[0]
    assert 59 / 30 * 0.8 <= took <= 59 / 30 * 1.5, f"60 connects at 30/s took {took:.2f} s"
    busiest = max(sum(1 for t in connects if start <= t < start + 1.0) for start in connects)
    # Attempts are paced; a CONNACK's latency on a busy machine may bunch a few of them.
    assert busiest <= 30 * 1.3, f"{busiest} connects in one second at connectRate 30"


def test_broker_restart_reconnects_spread_out_and_stores_everything_once(write_fleet, tmp_path, mosquitto):
    fleet_path = write_fleet(per_device(40, connectRate=2000))
    data = tmp_path / "data"
    collector = component("collect", "mqtt", fleet_path, tmp_path, "--data", str(data), "--broker", mosquitto.url, "--client-id", "test-collector").start()
    wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 15, message="collector connected")
    sim = simulator(fleet_path, mosquitto)
    pool = devices_of(sim)

    async def scenario() -> float:
        stop = threading.Event()
        run = asyncio.create_task(sim.run_async(stop, None))
        await asyncio.to_thread(wait_until, lambda: pool.up == 40, 15, message="40 devices up")
        await asyncio.sleep(1.0)
        restarted = time.monotonic()
        await asyncio.to_thread(mosquitto.restart, 0.5)
        await asyncio.to_thread(wait_until, lambda: pool.up == 40 and len(pool.connects) >= 80, 30, message="every device reconnected")
        await asyncio.sleep(1.0)
        stop.set()
        await run
        return restarted

    restarted = asyncio.run(scenario())
    again = [t for t in pool.connects if t > restarted]
    assert len(again) == 40, "each device reconnected once"
    spread = max(again) - min(again)
    assert spread > 0.25, f"40 reconnects within {spread * 1000:.0f} ms: a thundering herd"
    gaps = sorted(b - a for a, b in zip(again, again[1:]))
    assert gaps[len(gaps) // 2] > 0.002, "reconnects are not bunched together"
    published = sim.published
    assert sim.dropped == 0 and published > 40 * 15
    wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= published, 30, message=f"{published} readings stored")
    lost, late = collector.metric("sensorfleet_readings_lost_total"), collector.metric("sensorfleet_readings_late_total")
    stored_total = collector.metric("sensorfleet_readings_stored_total")
    assert collector.stop() == 0
    assert lost - late == 0 and stored_total == published, "QoS 1 through the restart: nothing lost, nothing stored twice"
    assert_complete(stored(data), published)


def test_sensorfleet_run_with_a_connection_per_device_stores_everything(write_fleet, tmp_path):
    from .test_sensorfleet_run import start_run, summary_row

    fleet = write_fleet({"broker": {"port": 0, "mode": "mosquitto"}, **per_device(30)})
    run = start_run(fleet, tmp_path, "--duration", "5")
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 0, output
    row = summary_row(output, "mqtt")
    published, stored_total, lost, duplicates = (int(row[i].replace(",", "")) for i in (3, 4, 5, 6))
    assert published > 300 and stored_total == published and lost == 0 and duplicates == 0, row
    df = pd.read_parquet(tmp_path / "data")
    assert len(df) == published and df["device"].nunique() == 30


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"connectRate": 0}, "spec.protocols.mqtt.connectRate: Input should be greater than 0"),
        ({"keepalive": 1}, "spec.protocols.mqtt.keepalive"),
        ({"messageMode": "gateway"}, "connectionPerDevice: each device publishes its own perDevice JSON messages"),
        ({"payloadFormat": "sparkplugB"}, "connectionPerDevice"),
    ],
)
def test_spec_refuses_bad_connection_settings_naming_the_field(fields, named):
    document = {"metadata": {"name": "demo"}, "spec": {"protocols": {"mqtt": {"connectionPerDevice": True, **fields}}}}
    with pytest.raises(FleetSpecError) as error:
        parse_fleet(document)
    assert named in str(error.value), str(error.value)


def test_validate_command_accepts_a_connection_per_device_fleet(write_fleet):
    result = subprocess.run([sys.executable, "-m", "sensorfleet.cli", "validate", str(write_fleet(per_device(100, connectRate=250)))], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
