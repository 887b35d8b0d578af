"""A third-party OPC UA server (spec.sources.opcua): node-opcua's server from npm, with variables
SensorFleet did not define, collected by node id (string, numeric, by namespace URI) and browse
path into the dataset; `seq` null, statuses kept as quality, non-numbers refused and counted."""

from __future__ import annotations

import subprocess

import pandas as pd
import yaml

from sensorfleet.dataset import read_dataset
from sensorfleet.testing import component, wait_for_port

STEPS = 8


def test_node_opcua_server_variables_land_in_the_dataset(opcua_server_peer, procs, h, tmp_path, tcp_port):
    argv, env = opcua_server_peer
    server = subprocess.Popen([*argv, str(tcp_port), str(STEPS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for_port(tcp_port, timeout=60)
        source = {"name": "plc", "endpoint": f"opc.tcp://127.0.0.1:{tcp_port}/", "publishingInterval": 0.2, "nodes": [
            {"nodeId": "ns=1;s=Boiler.Temperature", "device": "boiler-1", "sensor": "temperature", "unit": "degC"},
            {"browsePath": "1:Boiler/1:Pressure", "device": "boiler-1", "sensor": "pressure", "unit": "kPa"},
            {"nodeId": "nsu=urn:foreign:plant;s=Pump.Running", "device": "pump-1", "sensor": "running"},
            {"nodeId": "ns=1;s=Boiler.Label", "device": "boiler-1", "sensor": "label"},
            {"browsePath": "1:Boiler/1:NoSuchVariable", "device": "boiler-1", "sensor": "missing"},
        ]}
        fleet = tmp_path / "fleet.yaml"
        fleet.write_text(yaml.safe_dump({"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "proto"},
                                         "spec": {"protocols": {"mqtt": {"enabled": False}}, "collector": {"flushInterval": 0.3},
                                                  "sources": {"opcua": [source]}}}))
        data = tmp_path / "data"
        col = component("collect", "opcua", fleet, tmp_path, "--data", str(data), "--source", "plc").start()
        procs.append(col)
        h.wait_until(lambda: "subscribed to 4 of 5 variables" in col.log(), 60, message="the collector subscribed to the four variables that exist")
        assert "cannot resolve 1:Boiler/1:NoSuchVariable" in col.log()
        # The initial value of each numeric variable arrives on subscription.
        h.wait_until(lambda: col.metric("sensorfleet_readings_stored_total") >= 3, 30, message="the initial values stored")
        server.stdin.write("go\n")
        server.stdin.flush()
        h.wait_until(lambda: col.metric("sensorfleet_readings_stored_total") >= 3 * (STEPS + 1), 60, message="every change stored")
        summary = h.stop(col)
    finally:
        server.terminate()
        server.wait(30)

    df = read_dataset(str(data))
    assert (df["protocol"] == "opcua").all() and df["seq"].isna().all()
    at = lambda k: pd.Timestamp("2026-12-02T10:00:00Z") + pd.Timedelta(seconds=k)  # noqa: E731 - the server's source timestamps
    series = {key: part.sort_values("ts") for key, part in df.groupby(["device", "sensor"])}
    assert sorted(series) == [("boiler-1", "pressure"), ("boiler-1", "temperature"), ("pump-1", "running")]
    temperature = series[("boiler-1", "temperature")]
    assert list(temperature["ts"]) == [at(k) for k in range(STEPS + 1)]
    assert [None if pd.isna(v) else v for v in temperature["value"]] == [20.0 + 0.5 * k if k != 4 else None for k in range(STEPS + 1)]
    assert list(temperature["quality"]) == ["bad" if k == 4 else "uncertain" if k == 5 else "good" for k in range(STEPS + 1)]
    assert (temperature["unit"] == "degC").all()
    pressure = series[("boiler-1", "pressure")]
    assert list(pressure["value"]) == [1000.0 + k for k in range(STEPS + 1)] and list(pressure["ts"]) == [at(k) for k in range(STEPS + 1)]
    assert list(series[("pump-1", "running")]["value"]) == [float(k % 2) for k in range(STEPS + 1)], "a Boolean is stored as 0 / 1"

    assert summary["source"] == "plc"
    assert (summary["received"], summary["stored"], summary["unsequenced"], summary["bad_quality"]) == (27, 27, 27, 1)
    assert (summary["lost"], summary["duplicates"]) == (0, 0)
    assert summary["malformed_by_reason"] == {"wrong_type": STEPS + 1}, "the String variable: every value refused, counted"


def test_the_collector_resubscribes_after_the_server_restarts(opcua_server_peer, procs, h, tmp_path, tcp_port):
    argv, env = opcua_server_peer

    def start_server() -> subprocess.Popen:
        server = subprocess.Popen([*argv, str(tcp_port), "3"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=env)
        wait_for_port(tcp_port, timeout=60)
        return server

    source = {"name": "plc", "endpoint": f"opc.tcp://127.0.0.1:{tcp_port}/", "publishingInterval": 0.2,
              "nodes": [{"browsePath": "1:Boiler/1:Pressure", "device": "boiler-1", "sensor": "pressure"}]}
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "proto"},
                                     "spec": {"protocols": {"mqtt": {"enabled": False}}, "collector": {"flushInterval": 0.3}, "sources": {"opcua": [source]}}}))
    data = tmp_path / "data"
    server = start_server()
    try:
        col = component("collect", "opcua", fleet, tmp_path, "--data", str(data), "--source", "plc").start()
        procs.append(col)
        h.wait_until(lambda: col.metric("sensorfleet_readings_stored_total") >= 1, 60, message="the initial value stored")
        server.terminate()
        server.wait(30)
        h.wait_until(lambda: col.metric("sensorfleet_connected") == 0, 30, message="the collector noticed the server gone")
        server = start_server()
        h.wait_until(lambda: col.log().count("subscribed to 1 of 1 variables") >= 2, 60, message="resubscribed after the restart")
        server.stdin.write("go\n")
        server.stdin.flush()
        h.wait_until(lambda: col.metric("sensorfleet_readings_stored_total") >= 2 + 3, 60, message="the new server's changes stored")
        summary = h.stop(col)
    finally:
        server.terminate()
        server.wait(30)
    df = read_dataset(str(data)).sort_values("received_at")
    # The first server's initial value, the second's (the same source timestamp: stored again,
    # no seq to tell), then its three changes.
    assert list(df["value"]) == [1000.0, 1000.0, 1001.0, 1002.0, 1003.0]
    assert summary["stored"] == 5 and summary["malformed"] == 0


def test_a_secured_server_is_collected_over_basic256sha256_with_a_username(opcua_server_peer, procs, h, tmp_path, tcp_port, monkeypatch):
    """node-opcua's server offering only Basic256Sha256 and only a named user: a source asking for
    security None is refused with the reason in its log; with Basic256Sha256 (its own certificate,
    made under SENSORFLEET_OPCUA_PKI) and the credentials from the environment, every value lands."""
    argv, env = opcua_server_peer
    monkeypatch.setenv("SENSORFLEET_OPCUA_PKI", str(tmp_path / "client-pki"))
    monkeypatch.setenv("SENSORFLEET_OPCUA_USERNAME", "operator")
    monkeypatch.setenv("SENSORFLEET_OPCUA_PASSWORD", "s3cret")
    server = subprocess.Popen([*argv, str(tcp_port), "3", "secure", str(tmp_path / "server-pki")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def collector(name: str, **security: str):
        source = {"name": name, "endpoint": f"opc.tcp://127.0.0.1:{tcp_port}/", "publishingInterval": 0.2, "authentication": "username", **security,
                  "nodes": [{"browsePath": "1:Boiler/1:Pressure", "device": "boiler-1", "sensor": "pressure"}]}
        fleet = tmp_path / f"{name}.yaml"
        fleet.write_text(yaml.safe_dump({"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "proto"},
                                         "spec": {"protocols": {"mqtt": {"enabled": False}}, "collector": {"flushInterval": 0.3},
                                                  "sources": {"opcua": [source]}}}))
        col = component("collect", "opcua", fleet, tmp_path, "--data", str(tmp_path / name), "--source", name).start()
        procs.append(col)
        return col

    try:
        wait_for_port(tcp_port, timeout=60)
        plain = collector("plain")
        h.wait_until(lambda: "reconnecting" in plain.log(), 60, message="the plain connection refused")
        assert "BadSecurityModeRejected" in plain.log() and "the server refused security None; try security: Basic256Sha256" in plain.log(), plain.log()[-2000:]
        assert plain.metric("sensorfleet_connected") == 0 and not plain.metric("sensorfleet_readings_stored_total")
        h.stop(plain)
        secured = collector("secured", security="Basic256Sha256", securityMode="SignAndEncrypt")
        h.wait_until(lambda: "subscribed to 1 of 1 variables" in secured.log(), 60, message=f"subscribed over Basic256Sha256; log:\n{secured.log()[-2000:]}")
        h.wait_until(lambda: secured.metric("sensorfleet_readings_stored_total") >= 1, 30, message="the initial value stored")
        server.stdin.write("go\n")
        server.stdin.flush()
        h.wait_until(lambda: secured.metric("sensorfleet_readings_stored_total") >= 4, 60, message="every change stored")
        summary = h.stop(secured)
    finally:
        server.terminate()
        server.wait(30)
    assert (tmp_path / "client-pki" / "proto" / "source-secured-cert.der").exists()
    df = read_dataset(str(tmp_path / "secured"))
    assert sorted(df["value"]) == [1000.0 + k for k in range(4)]
    assert (summary["stored"], summary["lost"], summary["duplicates"]) == (4, 0, 0)
