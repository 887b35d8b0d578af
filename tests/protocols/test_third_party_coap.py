"""A third-party CoAP server (spec.sources.coap): libcoap's `coap-server` (Debian libcoap3-bin),
observed by the collector: its clock `/time?ticks` (a plain number, changing every second) and
its `/example_data`, which `coap-client` PUTs JSON documents to (read with JSON pointers)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pandas as pd
import yaml

from sensorfleet.dataset import read_dataset
from sensorfleet.testing import component

SERVER = shutil.which("coap-server-notls") or shutil.which("coap-server")
CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")


def coap_client(*args: str) -> subprocess.CompletedProcess:
    assert CLIENT, "libcoap's coap-client is not installed (apt-get install libcoap3-bin; hack/system-packages.txt)"
    return subprocess.run([CLIENT, *args], capture_output=True, text=True, timeout=15)


def put(port: int, document: str) -> None:
    done = coap_client("-m", "put", "-e", document, f"coap://127.0.0.1:{port}/example_data")
    assert done.returncode == 0, done.stderr


DOCUMENTS = [
    ('{"t": 21.5, "at": 1764669600}', 21.5, 0),
    ('{"t": 22.25, "at": 1764669601}', 22.25, 1),
    ("not json", None, None),  # not_json
    ('{"temp": 23}', None, None),  # missing_field: no /t
    ('{"t": "hot", "at": 1764669603}', None, None),  # wrong_type
    ('{"t": 24.0, "at": 1764669604}', 24.0, 4),
]


def test_libcoap_server_resources_are_observed_into_the_dataset(procs, h, tmp_path, udp_port):
    assert SERVER, "libcoap's coap-server is not installed (apt-get install libcoap3-bin; hack/system-packages.txt)"
    server = subprocess.Popen([SERVER, "-A", "127.0.0.1", "-p", str(udp_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        h.wait_until(lambda: coap_client("-m", "get", f"coap://127.0.0.1:{udp_port}/time?ticks").stdout.strip().isdigit(), 15, message="coap-server answering")
        put(udp_port, '{"t": 20.0, "at": 1764669599}')  # what the first GET of the observation reads
        source = {"name": "lab", "resources": [
            {"uri": f"coap://127.0.0.1:{udp_port}/time?ticks", "device": "clock-1", "sensor": "ticks", "unit": "s"},
            {"uri": f"coap://127.0.0.1:{udp_port}/example_data", "device": "lab-1", "sensor": "temperature", "unit": "degC",
             "format": "json", "value": "/t", "timestamp": "/at", "timestampFormat": "unixSeconds"},
        ]}
        fleet = tmp_path / "fleet.yaml"
        fleet.write_text(yaml.safe_dump({"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "proto"},
                                         "spec": {"protocols": {"mqtt": {"enabled": False}}, "collector": {"flushInterval": 0.3},
                                                  "sources": {"coap": [source]}}}))
        data = tmp_path / "data"
        col = component("collect", "coap", fleet, tmp_path, "--data", str(data), "--source", "lab").start()
        procs.append(col)
        h.wait_until(lambda: col.metric("sensorfleet_connected") == 1, 30, message="both resources observed")
        started = pd.Timestamp.now(tz="UTC")
        for document, *_ in DOCUMENTS:
            put(udp_port, document)
            time.sleep(0.5)  # one state at a time: a server may skip states that change faster (RFC 7641)
        h.wait_until(lambda: col.metric("sensorfleet_readings_stored_total") >= 4 + 3, 30, message="the documents and a few ticks stored")
        time.sleep(1.5)
        summary = h.stop(col)
    finally:
        server.terminate()
        server.wait(10)

    df = read_dataset(str(data))
    assert (df["protocol"] == "coap").all() and df["seq"].isna().all()
    lab = df[df["device"] == "lab-1"].sort_values("ts")
    assert list(lab["value"]) == [20.0] + [v for _, v, _ in DOCUMENTS if v is not None]
    assert list(lab["ts"]) == [pd.Timestamp(1764669599 + k, unit="s", tz="UTC") for k in (0, 1, 2, 5)], "the documents' own timestamps"
    assert (lab["unit"] == "degC").all() and (lab["sensor"] == "temperature").all()
    clock = df[df["device"] == "clock-1"].sort_values("received_at")
    assert len(clock) >= 3, "the clock notifies every second"
    ticks = clock["value"].to_numpy()
    assert (ticks[1:] > ticks[:-1]).all() and abs(ticks[-1] - time.time()) < 60, "Unix seconds of the server's clock, rising"
    assert (clock["ts"] == clock["received_at"]).all() and (clock["ts"] >= started - pd.Timedelta(seconds=30)).all(), "plain numbers are timestamped on receipt"

    assert summary["source"] == "lab"
    assert summary["stored"] == summary["received"] == summary["unsequenced"] == len(df)
    assert summary["malformed_by_reason"] == {"not_json": 1, "missing_field": 1, "wrong_type": 1}


def test_sensorfleet_run_observes_a_coap_source(tmp_path, udp_port):
    """The same source through `sensorfleet run` (the child binds its own metrics port and
    reports it): the server's clock lands in the dataset, the summary has its row."""
    import json
    import sys

    assert SERVER, "libcoap's coap-server is not installed (apt-get install libcoap3-bin)"
    server = subprocess.Popen([SERVER, "-A", "127.0.0.1", "-p", str(udp_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fleet = tmp_path / "fleet.yaml"
        fleet.write_text(yaml.safe_dump({"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "proto"},
                                         "spec": {"protocols": {"mqtt": {"enabled": False}}, "collector": {"flushInterval": 0.3},
                                                  "sources": {"coap": [{"name": "lab", "resources": [
                                                      {"uri": f"coap://127.0.0.1:{udp_port}/time?ticks", "device": "clock-1", "sensor": "ticks", "unit": "s"}]}]}}}))
        run = subprocess.run([sys.executable, "-m", "sensorfleet.cli", "run", str(fleet), "--duration", "6", "--no-live", "--data", str(tmp_path / "data"),
                              "--logs", str(tmp_path / "logs"), "--summary", str(tmp_path / "summary.json")], capture_output=True, text=True, timeout=120)
    finally:
        server.terminate()
        server.wait(10)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    row = json.loads((tmp_path / "summary.json").read_text())["protocols"]["source lab"]
    df = read_dataset(str(tmp_path / "data"))
    assert row["stored"] == len(df) >= 3 and row["malformed"] == 0
    assert (df["device"] == "clock-1").all() and df["seq"].isna().all()
