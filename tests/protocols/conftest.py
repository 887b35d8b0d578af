"""Fixtures for the CoAP and OPC UA tests: small fleets, simulator/collector processes started
through the real `sensorfleet simulate|collect` entry points, and dataset checks."""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sensorfleet.dataset import read_dataset
from sensorfleet.runtime import free_port
from sensorfleet.signals import SignalModel, device_index
from sensorfleet.spec import load_fleet
from sensorfleet.testing import Component, component, wait_until

FLEET_NAME = "proto"


def started(procs: list, *args: str):
    """(Sparkplug tests) a `sensorfleet` component, started and registered with `procs` (killed if the test fails)."""
    c = component(*args).start()
    procs.append(c)
    return c


def published_of(simulator) -> int:
    line = next(line for line in simulator.log().splitlines() if "readings, dropped" in line)
    return int(line.split("published ")[1].split(" readings")[0])


@pytest.fixture
def write_fleet(tmp_path):
    """A fleet manifest with only `protocol` enabled (few devices, a fast interval)."""

    def write(protocol: str, devices: int = 4, interval: float = 0.25, anomalies: dict | None = None, **extra) -> Path:
        protocols = {p: {"enabled": False} for p in ("mqtt", "coap", "opcua")}
        protocols[protocol] = {"enabled": True, "devices": devices, "interval": interval, **extra}
        doc = {
            "apiVersion": "sensorfleet.io/v1alpha1",
            "kind": "SensorFleet",
            "metadata": {"name": FLEET_NAME},
            # Anomalies often enough that stuck-at and dropouts cross the wire in a short run.
            "spec": {"protocols": protocols, "collector": {"flushInterval": 0.5},
                     "anomalies": anomalies if anomalies is not None else {"stuckProbability": 0.2, "stuckDuration": 4, "dropoutProbability": 0.2, "dropoutDuration": 3}},
        }
        path = tmp_path / f"{protocol}-fleet.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return write


@pytest.fixture
def procs():
    """Started components, stopped (SIGKILL if need be) at the end of the test."""
    started: list[Component] = []
    yield started
    for c in started:
        if c.process and c.process.poll() is None:
            c.signal(signal.SIGKILL)
            c.wait(10)


def start_simulator(procs: list, protocol: str, fleet: Path, workdir: Path, port: int) -> Component:
    sim = component("simulate", protocol, fleet, workdir, "--port", str(port)).start()
    procs.append(sim)
    wait_until(lambda: "simulator of fleet" in sim.log(), 60, message=f"{protocol} simulator serving; log:\n{sim.log()[-2000:]}")
    return sim


def start_collector(procs: list, protocol: str, fleet: Path, workdir: Path, data: Path, *targets: str) -> Component:
    args = [a for t in targets for a in ("--target", t)]
    col = component("collect", protocol, fleet, workdir, "--data", str(data), *args).start()
    procs.append(col)
    return col


def summary(c: Component) -> dict:
    """The SUMMARY line a simulator or collector logs when it stops."""
    lines = re.findall(r"SUMMARY (\{.*\})", c.log())
    assert lines, f"no SUMMARY in log:\n{c.log()[-3000:]}"
    return json.loads(lines[-1])


def stop(c: Component) -> dict:
    code = c.stop()
    assert code == 0, f"exit code {code}; log:\n{c.log()[-3000:]}"
    return summary(c)


def labelled(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics endpoint keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def malformed_by_reason(port: int) -> dict[str, float]:
    counts: dict[str, float] = defaultdict(float)
    for (name, labels), value in labelled(port).items():
        if name == "sensorfleet_payloads_malformed_total":
            counts[dict(labels)["reason"]] += value
    return dict(counts)


def stored_frame(data: Path, protocol: str) -> pd.DataFrame:
    df = read_dataset(str(data), protocols=[protocol])
    assert len(df), "nothing stored"
    return df


def assert_values_match_model(df: pd.DataFrame, fleet_path: Path, protocol: str) -> None:
    """Every stored value, quality and timestamp is exactly what the signal model says for it."""
    fleet = load_fleet(fleet_path)
    model = SignalModel(fleet.spec, fleet.name, protocol)
    names = [s.name for s in fleet.spec.sensors]
    sample = df.sample(min(len(df), 400), random_state=1)
    devices = np.array([device_index(d) for d in sample["device"]])
    block = model.block(devices, sample["seq"].to_numpy())
    readings = model.readings(block)
    for i, (_, row) in enumerate(sample.iterrows()):
        expected = readings[i * len(names) + names.index(row["sensor"])]
        assert row["quality"] == expected.quality
        assert row["anomaly"] == expected.anomaly or (protocol == "opcua" and expected.anomaly == "spike" and row["anomaly"] is None)
        if expected.value is None:
            assert pd.isna(row["value"])
        else:
            assert row["value"] == pytest.approx(expected.value, rel=1e-12, abs=1e-9)
        assert abs(row["ts"].timestamp() - expected.ts.timestamp()) < 1e-5
        assert row["unit"] == expected.unit


def seq_accounting(df: pd.DataFrame) -> tuple[int, int]:
    """(sum over series of max-min+1, rows): their difference is the readings missing inside series."""
    spans = df.groupby(["device", "sensor"])["seq"].agg(["min", "max", "count"])
    return int((spans["max"] - spans["min"] + 1).sum()), int(spans["count"].sum())


def stop_both_and_check_nothing_lost(sim: Component, col: Component, data: Path, protocol: str) -> pd.DataFrame:
    """Stop the source, then the collector once in-flight values arrived; every reading produced
    is stored exactly once (the tail complete), and the only holes are the ticks the simulator
    itself skipped when it fell behind schedule on a loaded machine (its `dropped`), each counted
    lost once. Returns the stored frame."""
    import time

    produced = stop(sim)
    time.sleep(1.5)
    collected = stop(col)
    df = stored_frame(data, protocol)
    both = f"simulator {produced}, collector {collected}"
    assert collected["duplicates"] == 0 and collected["malformed"] == 0, both
    span, rows = seq_accounting(df)
    assert span - rows == collected["lost"] == produced["dropped"], f"holes {span - rows}; {both}"
    assert last_tick_sum(df) == produced["last_tick_sum"], "the last readings produced are stored"
    return df


def last_tick_sum(df: pd.DataFrame) -> int:
    """Sum over devices of the last stored seq (all sensors of a device share their ticks)."""
    return int(df.groupby("device")["seq"].max().sum())


@pytest.fixture
def udp_port() -> int:
    return free_port(udp=True)


@pytest.fixture
def tcp_port() -> int:
    return free_port()


@pytest.fixture
def h():
    """The helpers above, for test modules (importlib mode: test files cannot import conftest)."""
    import types

    return types.SimpleNamespace(
        start_simulator=start_simulator, start_collector=start_collector, summary=summary, stop=stop,
        labelled=labelled, malformed_by_reason=malformed_by_reason, stored_frame=stored_frame,
        assert_values_match_model=assert_values_match_model, seq_accounting=seq_accounting,
        last_tick_sum=last_tick_sum, wait_until=wait_until, stop_both_and_check_nothing_lost=stop_both_and_check_nothing_lost,
    )


# --- Sparkplug B interop (issue 13): Eclipse Tahu's codec and the mqtt client from npm ----------
SPARKPLUG_PEER = Path(__file__).parent / "sparkplug_node"


@pytest.fixture(scope="session")
def sparkplug_peer():
    """argv prefix running tests/protocols/sparkplug_node/peer.js with its npm packages (installed
    once into ~/.cache/sensorfleet/npm by hack/node-modules.sh), and the environment for it."""
    import os
    import subprocess

    script = Path(__file__).parents[2] / "hack" / "node-modules.sh"
    done = subprocess.run([str(script), str(SPARKPLUG_PEER)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"hack/node-modules.sh failed:\n{done.stderr[-3000:]}"
    env = {**os.environ, "NODE_PATH": done.stdout.strip().splitlines()[-1]}
    return ["node", str(SPARKPLUG_PEER / "peer.js")], env


# --- two-way OPC UA interop (issue 13): node-opcua's client from npm ---------------------------
OPCUA_PEER = Path(__file__).parent / "opcua_node"


@pytest.fixture(scope="session")
def opcua_peer():
    """argv prefix running tests/protocols/opcua_node/client.js with node-opcua (installed once into
    ~/.cache/sensorfleet/npm by hack/node-modules.sh), and the environment for it."""
    import os
    import subprocess

    script = Path(__file__).parents[2] / "hack" / "node-modules.sh"
    done = subprocess.run([str(script), str(OPCUA_PEER)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"hack/node-modules.sh failed:\n{done.stderr[-3000:]}"
    env = {**os.environ, "NODE_PATH": done.stdout.strip().splitlines()[-1]}
    return ["node", str(OPCUA_PEER / "client.js")], env


@pytest.fixture
def mosquitto(tmp_path):
    from sensorfleet.testing import mosquitto_broker

    with mosquitto_broker(tmp_path / "mosquitto") as server:
        yield server


class TahuListener:
    """`peer.js listen`: every Sparkplug message on the broker (STATE aside) as Tahu decodes it,
    one JSON a line: {topic, tahu (Tahu's decoding), raw (every protobuf field)}."""

    def __init__(self, peer, url: str, seconds: float, workdir: Path):
        import subprocess

        argv, env = peer
        self.out, self.err = workdir / "tahu-listen.jsonl", workdir / "tahu-listen.log"
        self.process = subprocess.Popen([*argv, "listen", url, "spBv1.0/#", str(seconds)], stdout=open(self.out, "w"), stderr=open(self.err, "w"), env=env)
        wait_until(lambda: "subscribed" in self.err.read_text(), 20, message="Tahu listener subscribed")

    def stop(self, settle: float = 1.0) -> None:
        """Stop listening once what was published had `settle` seconds to arrive."""
        import signal
        import time

        time.sleep(settle)
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(30) == 0, self.err.read_text()

    def messages(self) -> list[dict]:
        return [json.loads(line) for line in self.out.read_text().splitlines()]


@pytest.fixture
def tahu_listener(sparkplug_peer):
    started: list[TahuListener] = []

    def start(url: str, seconds: float, workdir: Path) -> TahuListener:
        started.append(TahuListener(sparkplug_peer, url, seconds, workdir))
        return started[-1]

    yield start
    for listener in started:
        if listener.process.poll() is None:
            listener.process.kill()
            listener.process.wait(10)


# --- third-party OPC UA server (issue 13 part 5): node-opcua's server from npm -------------------
OPCUA_SERVER_PEER = Path(__file__).parent / "opcua_node_server"


@pytest.fixture(scope="session")
def opcua_server_peer():
    """argv prefix running tests/protocols/opcua_node_server/server.js with node-opcua's server
    (installed once into ~/.cache/sensorfleet/npm by hack/node-modules.sh), and its environment."""
    import os
    import subprocess

    script = Path(__file__).parents[2] / "hack" / "node-modules.sh"
    done = subprocess.run([str(script), str(OPCUA_SERVER_PEER)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"hack/node-modules.sh failed:\n{done.stderr[-3000:]}"
    env = {**os.environ, "NODE_PATH": done.stdout.strip().splitlines()[-1]}
    return ["node", str(OPCUA_SERVER_PEER / "server.js")], env
