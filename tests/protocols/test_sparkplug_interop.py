"""Sparkplug B through real Mosquitto, against an independent implementation: Eclipse Tahu's
payload codec (npm `sparkplug-payload`) with the `mqtt` npm client.

- the simulator's edge node, as Tahu reads it: NBIRTH/DBIRTH with every metric, DDATA by alias,
  DDEATH on a site outage, seq 0..255, NDEATH with the session's bdSeq (Last Will or goodbye);
- the collector stores exactly what the simulator published (no loss, no duplicate), and what a
  Tahu-encoded edge node publishes.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from sensorfleet.signals import SignalModel, device_index
from sensorfleet.spec import load_fleet
from sensorfleet.testing import wait_until

from tests.protocols.conftest import published_of, started

FLEET = "spb"


def write_fleet(tmp_path: Path, **mqtt) -> Path:
    doc = {
        "apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": FLEET},
        "spec": {
            "protocols": {"mqtt": {"enabled": True, "devices": 12, "interval": 0.1, "payloadFormat": "sparkplugB", **mqtt}, "coap": {"enabled": False}, "opcua": {"enabled": False}},
            "collector": {"flushInterval": 0.5},
            # stuck-at and dropouts often, and site outages (every device of a site silent) long enough to see DDEATH and DBIRTH
            "anomalies": {"stuckProbability": 0.1, "stuckDuration": 4, "dropoutProbability": 0.1, "dropoutDuration": 3},
            "realism": {"devicesPerSite": 3, "siteOutageProbability": 0.2, "siteOutageDuration": 6},
        },
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_edge_node_as_tahu_reads_it_and_the_collector_stores_it_all(procs, tmp_path, mosquitto, tahu_listener):
    fleet_path = write_fleet(tmp_path)
    fleet = load_fleet(fleet_path)
    data = tmp_path / "data"
    collector = started(procs, "collect", "mqtt", fleet_path, tmp_path, "--data", str(data), "--broker", mosquitto.url, "--client-id", "spb-collector")
    wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 15, message="collector connected")
    listener = tahu_listener(mosquitto.url, 300, tmp_path)
    simulator = started(procs, "simulate", "mqtt", fleet_path, tmp_path, "--broker", mosquitto.url, "--duration", "5")
    assert simulator.wait(60) == 0, simulator.log()[-3000:]
    published = published_of(simulator)
    listener.stop()
    messages = listener.messages()
    wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= published, 30, message=f"{published} readings stored")
    lost = collector.metric("sensorfleet_readings_lost_total") - collector.metric("sensorfleet_readings_late_total")
    duplicates, malformed = collector.metric("sensorfleet_readings_duplicate_total"), collector.metric("sensorfleet_readings_malformed_total")
    assert collector.stop() == 0

    # --- what Tahu saw ----------------------------------------------------------------------
    kinds = [m["topic"].split("/")[2] for m in messages]
    assert kinds[0] == "NBIRTH" and kinds[-1] == "NDEATH", kinds[:3] + kinds[-3:]
    assert {m["topic"] for m in messages if m["topic"].split("/")[2] in ("NBIRTH", "NDEATH")} == {f"spBv1.0/{FLEET}/NBIRTH/sim-0", f"spBv1.0/{FLEET}/NDEATH/sim-0"}
    nbirth = {m["name"]: m for m in messages[0]["tahu"]["metrics"]}
    assert nbirth["Node Control/Rebirth"]["value"] is False and nbirth["bdSeq"]["type"] == "UInt64"
    assert messages[-1]["tahu"]["metrics"][0] == {"name": "bdSeq", "type": "UInt64", "value": nbirth["bdSeq"]["value"]}
    seqs = [m["tahu"]["seq"] for m in messages if "seq" in m["tahu"]]
    assert seqs[0] == 0 and all(b == (a + 1) % 256 for a, b in zip(seqs, seqs[1:])), "seq must count 0..255 without gaps"
    assert len(seqs) > 256, "a run long enough to see seq wrap"
    assert "DDEATH" in kinds, "a site outage sends DDEATH"

    model = SignalModel(fleet.spec, FLEET, "mqtt")
    units = {s.name: s.unit for s in fleet.spec.sensors}
    births = [m for m in messages if m["topic"].split("/")[2] == "DBIRTH"]
    assert {m["topic"].rsplit("/", 1)[1] for m in births} == {f"mqtt-{i:05d}" for i in range(12)}
    aliases: dict[str, dict[int, str]] = {}
    checked = 0
    for m in messages:
        kind, device = m["topic"].split("/")[2], m["topic"].split("/")[-1]
        if kind == "DBIRTH":
            metrics = {x["name"]: x for x in m["tahu"]["metrics"]}
            assert set(metrics) == {"sensorfleet/seq", *units}
            for name, unit in units.items():
                assert metrics[name]["type"] == "Double" and metrics[name]["properties"]["engUnit"]["value"] == unit
            aliases[device] = {x["alias"]: x["name"] for x in m["tahu"]["metrics"]}
        if kind not in ("DBIRTH", "DDATA", "DDEATH"):
            continue
        by_name = {aliases[device][x["alias"]]: x for x in m["raw"]["metrics"]}
        tick = by_name.pop("sensorfleet/seq")["longValue"]
        block = model.block(np.array([device_index(device)]), np.array([tick]))
        for s, sensor in enumerate(model.sensors):
            raw = by_name[sensor.name]
            assert raw["timestamp"] == int(block.times[0] * 1000)
            if block.quality[0, s] == 2:
                assert raw.get("isNull") is True and "doubleValue" not in raw
            else:
                assert raw["doubleValue"] == float(block.values[0, s]), (device, tick, sensor.name)
            checked += 1
    assert checked == published, "every published reading is in a message Tahu read"

    # --- what the collector stored ----------------------------------------------------------
    df = pd.read_parquet(data)
    assert len(df) == published and lost == 0 and duplicates == 0 and malformed == 0
    assert not df.duplicated(["device", "sensor", "seq"]).any()
    assert set(df["quality"]) >= {"good", "bad"} and "dropout" in set(df["anomaly"].dropna())


def test_collector_stores_what_a_tahu_edge_node_publishes(procs, tmp_path, mosquitto, sparkplug_peer):
    fleet_path = write_fleet(tmp_path)
    data = tmp_path / "data"
    collector = started(procs, "collect", "mqtt", fleet_path, tmp_path, "--data", str(data), "--broker", mosquitto.url, "--client-id", "spb-collector")
    wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 15, message="collector connected")
    argv, env = sparkplug_peer
    began = time.time()
    done = subprocess.run([*argv, "publish", mosquitto.url, FLEET, "tahu-node", "boiler-1", "5"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= 12, 20, message="12 readings stored")
    lost, malformed = collector.metric("sensorfleet_readings_lost_total"), collector.metric("sensorfleet_readings_malformed_total")
    assert collector.stop() == 0
    assert lost == 0 and malformed == 0
    df = pd.read_parquet(data).sort_values(["seq", "sensor"])
    assert list(df["device"].unique()) == ["boiler-1"]
    assert list(df["seq"]) == [s for s in range(1000, 1006) for _ in range(2)]
    temperature = df[df["sensor"] == "temperature"]
    assert list(temperature["value"]) == [20.5 + i for i in range(6)] and set(temperature["unit"]) == {"degC"}
    humidity = df[df["sensor"] == "humidity"].set_index("seq")
    assert humidity.loc[1003, "quality"] == "bad" and pd.isna(humidity.loc[1003, "value"])
    assert humidity.loc[1004, "value"] == 44.25 and humidity.loc[1004, "unit"] == "%"
    ts = pd.to_datetime(df["ts"], utc=True)
    assert (ts >= pd.Timestamp(began - 1, unit="s", tz="UTC")).all() and (ts <= pd.Timestamp.now(tz="UTC")).all()
