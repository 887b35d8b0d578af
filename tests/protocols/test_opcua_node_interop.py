"""Two-way OPC UA with an independent client: node-opcua (npm) writes a setpoint, calls
InjectFault and Reset on the running simulator (the OPC UA collector stores what followed, the
events included, with exact accounting) and backfills with HistoryRead."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd

from sensorfleet.events import read_events
from sensorfleet.signals import SignalModel
from sensorfleet.spec import load_fleet

SENSORS = 3
STORED = "sensorfleet_readings_stored_total"
NS_URI = "urn:sensorfleet:proto"
QUIET = {"spikeProbability": 0, "stuckProbability": 0, "dropoutProbability": 0}


def node_client(peer, url: str, steps: list[dict], timeout: float = 120) -> list[dict]:
    argv, env = peer
    done = subprocess.run([*argv, url, NS_URI, json.dumps(steps)], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"node-opcua client failed:\n{done.stderr[-3000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line from the node-opcua client:\n{done.stdout[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_node_opcua_writes_a_setpoint_and_calls_the_methods(opcua_peer, write_fleet, procs, h, tmp_path, tcp_port):
    devices = 2
    fleet = write_fleet("opcua", devices=devices, interval=0.25, writable=True, setpointLagSeconds=1.0, anomalies=QUIET)
    data = tmp_path / "data"
    url = f"opc.tcp://127.0.0.1:{tcp_port}/"
    sim = h.start_simulator(procs, "opcua", fleet, tmp_path, tcp_port)
    col = h.start_collector(procs, "opcua", fleet, tmp_path, data, url)
    h.wait_until(lambda: col.metric(STORED) >= 8 * devices * SENSORS, 60, message="readings stored before the client acts")
    sp = "opcua-00001/PressureSetpoint"
    results = node_client(opcua_peer, url, [
        {"op": "read", "node": sp},
        {"op": "write", "node": sp, "value": 5000.0},  # above the sensor's max (1085 hPa)
        {"op": "write", "node": sp, "value": 1020.5},
        {"op": "read", "node": sp},
        {"op": "call", "object": "opcua-00001", "method": "opcua-00001/InjectFault", "args": [["String", "stuck"], ["Double", 2.0]]},
        {"op": "call", "object": "opcua-00001", "method": "opcua-00001/InjectFault", "args": [["String", "meltdown"], ["Double", 2.0]]},
        {"op": "sleep", "seconds": 2.5},
        {"op": "call", "object": "opcua-00001", "method": "opcua-00001/Reset", "args": []},
        {"op": "read", "node": sp},
    ])
    nominal = results[0]["value"]
    assert results[1]["status"] == "BadOutOfRange" and results[2]["status"] == "Good"
    assert results[3]["value"] == 1020.5 and results[3]["status"] == "Good"
    assert results[4]["status"] == "Good"
    assert results[5]["status"] == "BadInvalidArgument" and results[5]["inputArgumentResults"] == ["BadInvalidArgument", "Good"]
    assert results[7]["status"] == "Good" and results[8]["value"] == nominal
    stored_then = col.metric(STORED)
    h.wait_until(lambda: col.metric(STORED) >= stored_then + 6 * devices * SENSORS, 60, message="readings after the reset")
    df = h.stop_both_and_check_nothing_lost(sim, col, data, "opcua")
    events = read_events(str(data))
    assert [(e.device, e.action, e.sensor, None if pd.isna(e.value) else e.value, e.fault) for e in events.itertuples()] == [
        ("opcua-00001", "setpoint", "pressure", 1020.5, None), ("opcua-00001", "fault", None, None, "stuck"), ("opcua-00001", "reset", None, None, None)]
    # The injected stuck-at: quality uncertain on every sensor of the device for 2 s (8 ticks).
    start = events["ts"].iloc[1]
    mine = df[(df["device"] == "opcua-00001") & (df["ts"] > start) & (df["ts"] <= start + pd.Timedelta(seconds=2.0))]
    assert len(mine) == 8 * SENSORS and (mine["quality"] == "uncertain").all() and (mine["anomaly"] == "stuck").all()
    assert mine.groupby("sensor")["value"].nunique().max() == 1, "a stuck sensor repeats its value"


def test_node_opcua_backfills_from_history_read_with_continuation_points(opcua_peer, write_fleet, procs, h, tmp_path, tcp_port):
    """A historian's backfill: node-opcua HistoryRead (raw) of the last seconds, 5 values per
    page; the pages join into one value per tick, each exactly what the signal model gives."""
    fleet = write_fleet("opcua", devices=2, interval=0.25, historyHours=1)
    url = f"opc.tcp://127.0.0.1:{tcp_port}/"
    h.start_simulator(procs, "opcua", fleet, tmp_path, tcp_port)
    time.sleep(6)  # ticks served to read back
    end = datetime.now(timezone.utc) - timedelta(seconds=1)  # every tick of the window served
    start = end - timedelta(seconds=4)
    iso = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
    result = node_client(opcua_peer, url, [{"op": "history", "node": "opcua-00000/humidity", "start": iso(start), "end": iso(end), "numValuesPerNode": 5}])[0]
    pages, values = result["pages"], result["values"]
    assert len(pages) >= 3 and all(p["status"] == "Good" and p["values"] <= 5 for p in pages), pages
    times = np.array([datetime.fromisoformat(v["sourceTimestamp"].replace("Z", "+00:00")).timestamp() for v in values])
    assert len(values) == 16 and np.allclose(np.diff(times), 0.25, atol=2e-3), "one value per tick, none twice"
    spec = load_fleet(fleet)
    model = SignalModel(spec.spec, spec.name, "opcua")
    ticks = np.round((times - model.epoch) / 0.25 - model.phase(np.array([0]))[0]).astype(np.int64)
    block = model.block(np.zeros(len(ticks), dtype=np.int64), ticks)
    for v, value, quality in zip(values, block.values[:, 1], block.quality[:, 1]):
        assert v["status"] == ("BadNoCommunication" if quality == 2 else "Good" if quality == 0 else "UncertainLastUsableValue")
        assert (v["value"] is None) if quality == 2 else (v["value"] == value)
