"""Simulator -> collector -> dataset, per protocol: every reading arrives once, with exactly the
value the signal model gives, and a server restart mid-run loses only what it had to -- counted."""

from __future__ import annotations

import time

import numpy as np
import pytest

SENSORS = 3
STORED = "sensorfleet_readings_stored_total"


def _url(protocol: str, port: int) -> str:
    return f"coap://127.0.0.1:{port}" if protocol == "coap" else f"opc.tcp://127.0.0.1:{port}/"


def _port(protocol: str, udp_port: int, tcp_port: int) -> int:
    return udp_port if protocol == "coap" else tcp_port


@pytest.mark.parametrize("protocol", ["coap", "opcua"])
def test_every_published_reading_is_stored_once_with_the_model_value(protocol, write_fleet, procs, h, tmp_path, udp_port, tcp_port):
    devices = 4
    fleet = write_fleet(protocol, devices=devices, interval=0.25)
    port = _port(protocol, udp_port, tcp_port)
    data = tmp_path / "data"
    sim = h.start_simulator(procs, protocol, fleet, tmp_path, port)
    col = h.start_collector(procs, protocol, fleet, tmp_path, data, _url(protocol, port))
    # A dozen rounds of every sensor stored, then stop the source first so nothing is in flight.
    h.wait_until(lambda: col.metric(STORED) >= 12 * devices * SENSORS, 60, message="readings stored")
    produced = h.stop(sim)
    time.sleep(1.5)
    collected = h.stop(col)

    df = h.stored_frame(data, protocol)
    assert collected["lost"] == 0 and collected["duplicates"] == 0 and collected["malformed"] == 0, collected
    assert collected["stored"] == collected["received"] == len(df)
    span, rows = h.seq_accounting(df)
    assert span == rows, "a series has a hole"
    # The tail: each device's last reading the simulator produced is in the dataset.
    assert h.last_tick_sum(df) == produced["last_tick_sum"]
    if protocol == "coap":
        # CoAP counts what it sent (responses and notifications): all of it was stored.
        assert produced["published"] == collected["stored"]
    assert set(df["protocol"]) == {protocol} and set(df["fleet"]) == {"proto"}
    assert df["device"].nunique() == devices and df["sensor"].nunique() == SENSORS
    assert {"good", "uncertain", "bad"} <= set(df["quality"]), "anomalies (stuck-at, dropout) crossed the wire"
    h.assert_values_match_model(df, fleet, protocol)


@pytest.mark.parametrize("protocol", ["coap", "opcua"])
def test_server_restart_mid_run_is_recovered_and_the_gap_counted_lost(protocol, write_fleet, procs, h, tmp_path, udp_port, tcp_port):
    devices = 3
    fleet = write_fleet(protocol, devices=devices, interval=0.25)
    port = _port(protocol, udp_port, tcp_port)
    data = tmp_path / "data"
    sim = h.start_simulator(procs, protocol, fleet, tmp_path, port)
    col = h.start_collector(procs, protocol, fleet, tmp_path, data, _url(protocol, port))
    h.wait_until(lambda: col.metric(STORED) >= 4 * devices * SENSORS, 60, message="readings stored before the restart")
    h.stop(sim)
    time.sleep(2.0)  # down for ~8 ticks of every device
    before = col.metric("sensorfleet_readings_received_total")
    sim2 = h.start_simulator(procs, protocol, fleet, tmp_path, port)
    # Recovered: many rounds of every sensor received from the new server process.
    h.wait_until(lambda: col.metric("sensorfleet_readings_received_total") >= before + 12 * devices * SENSORS, 90, message="readings after the restart")
    produced = h.stop(sim2)
    time.sleep(1.5)
    collected = h.stop(col)

    df = h.stored_frame(data, protocol)
    span, rows = h.seq_accounting(df)
    assert collected["lost"] > 0, "readings missed while the server was down must be counted"
    assert span - rows == collected["lost"], "every missing reading is counted lost, and only those"
    assert h.last_tick_sum(df) == produced["last_tick_sum"], "everything produced after recovery is stored"
    for (device, sensor), seqs in df.groupby(["device", "sensor"])["seq"]:
        gaps = int(np.sum(np.diff(np.sort(seqs.to_numpy())) > 1))
        assert gaps <= 1, f"{device}/{sensor}: {gaps} holes; only the restart may leave one"
    assert collected["malformed"] == 0
