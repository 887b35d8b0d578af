"""The simulator's MQTT publishing session: MQTT 5 where the broker speaks it, paho at MQTT 3.1.1
where it does not, and a bounded queue whose overflow is dropped and counted, never blocked on."""

from __future__ import annotations

import re

import time

from sensorfleet.runner import scrape
from sensorfleet.runtime import free_port
from sensorfleet.testing import component

FAST = {"protocols": {"mqtt": {"devices": 40, "interval": 0.1}}}


def published_and_dropped(log: str) -> tuple[int, int]:
    match = re.search(r"published (\d+) readings, dropped (\d+)", log)
    assert match, log
    return int(match[1]), int(match[2])


def test_simulator_speaks_mqtt5_to_mosquitto_and_mqtt311_to_amqtt(write_fleet, tmp_path, any_broker):
    fleet = write_fleet(FAST)
    simulator = component("simulate", "mqtt", fleet, tmp_path, "--broker", any_broker.url, "--duration", "2").start()
    assert simulator.wait(60) == 0, simulator.log()
    log = simulator.log()
    if "amqtt" in str(any_broker.log_path):
        assert "does not speak MQTT 5; publishing through paho at MQTT 3.1.1" in log, log
    else:
        assert "(MQTT 5, session present: False" in log and "paho" not in log, log
    published, dropped = published_and_dropped(log)
    assert published > 300 and dropped == 0
    assert "still unacknowledged" not in log, "every message was acknowledged before the simulator left"


def test_unreachable_broker_fills_the_bounded_queue_and_counts_what_it_drops(write_fleet, tmp_path):
    fleet = write_fleet({"protocols": {"mqtt": {"devices": 40, "interval": 0.1, "maxQueued": 100}}})
    nothing_listens = f"mqtt://127.0.0.1:{free_port()}"
    simulator = component("simulate", "mqtt", fleet, tmp_path, "--broker", nothing_listens, "--duration", "2").start()
    samples: dict = {}
    while simulator.process.poll() is None:  # read the counters while the process is there
        samples = scrape(simulator.metrics_port) or samples
        time.sleep(0.2)
    assert simulator.wait(60) == 0, simulator.log()
    log = simulator.log()
    published, dropped = published_and_dropped(log)
    assert published == 100 * 3, "exactly maxQueued messages of 3 readings are kept"
    assert dropped > 300, "about 2 s of 400 messages/s did not fit"
    assert samples["sensorfleet_readings_published_total"] == published
    assert samples["sensorfleet_readings_dropped_total"] == dropped, "the metric counts every dropped reading"
    assert "100 messages still unacknowledged at shutdown" in log
    assert "cannot reach broker" in log and "retrying in 2 s" in log, "reconnects with a growing back-off"
