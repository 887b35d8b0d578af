"""The pods' commands are real: every container the builders emit runs here as a local process,
with exactly its command, args and environment. Only what a cluster provides is substituted:
Service names become 127.0.0.1 with free ports, /data and /mosquitto/* become temp folders,
/etc/sensorfleet/fleet.yaml a temp file holding the ConfigMap's content, and Secret references
the Secret's values. kwok fakes the kubelet in the e2e tests; here nothing is faked."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest

from sensorfleet.operator import broker_builders, builders, child_meta, pod_builders, sizing, storage_builders
from sensorfleet.operator.broker_builders import BrokerCredentials
from sensorfleet.operator.child_meta import BuildOptions, Owner
from sensorfleet.spec import SensorFleet

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
FLEET = "cmdtest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_fleet() -> SensorFleet:
    return SensorFleet.model_validate({"metadata": {"name": FLEET, "namespace": "default"}, "spec": {
        "protocols": {"mqtt": {"devices": 3, "interval": 0.2},
                      "coap": {"enabled": True, "devices": 2, "interval": 0.2},
                      "opcua": {"enabled": True, "devices": 2, "interval": 0.2}},
        "collector": {"flushInterval": 0.5},
        "forecasting": {"horizon": 30, "frequency": "1min"},
    }})


class Pods:
    """The fleet's manifests, turned into local processes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.fleet = make_fleet()
        self.children = {(c["kind"], c["metadata"]["name"]): c for c in builders.build_children(
            self.fleet, Owner(FLEET, "default", "uid"), BuildOptions(), BrokerCredentials("sensorfleet", "pw-" + "x" * 20))}
        self.data = tmp / "data"
        self.data.mkdir()
        self.fleet_file = tmp / "fleet.yaml"
        self.fleet_file.write_text(self.children[("ConfigMap", f"{FLEET}-fleet")]["data"]["fleet.yaml"])
        # Debian's mosquitto, started as root, drops to the `mosquitto` user: its folders must be
        # reachable by that user (pytest's tmp_path is private to root).
        self.mosquitto_root = Path(tempfile.mkdtemp(prefix="sf-pods-mosquitto-"))
        self.mosquitto_root.chmod(0o755)
        self.mosquitto = {d: self.mosquitto_root / d for d in ("config", "data", "auth")}
        for d in self.mosquitto.values():
            d.mkdir()
        self.ports = {"broker": free_port()}
        for protocol in ("coap", "opcua"):
            for i in range(self.fleet.spec.protocol(protocol).replicas):
                self.ports[child_meta.simulator_name(FLEET, protocol, i)] = free_port()
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def localize(self, value: str) -> str:
        """Cluster addresses and mount paths -> this machine."""
        value = value.replace(pod_builders.FLEET_FILE, str(self.fleet_file))
        value = value.replace(pod_builders.HOME_DIR, str(self.tmp / "home"))  # the pod's home emptyDir
        for name, path in self.mosquitto.items():
            value = value.replace(f"/mosquitto/{name}", str(path))
        value = value.replace(f"{child_meta.broker_name(FLEET)}:{broker_builders.MQTT_PORT}", f"127.0.0.1:{self.ports['broker']}")
        for name, port in self.ports.items():
            value = re.sub(rf"\b{re.escape(name)}:\d+", f"127.0.0.1:{port}", value)
        if value == storage_builders.DATA_DIR or value.startswith(storage_builders.DATA_DIR + "/"):
            value = str(self.data) + value[len(storage_builders.DATA_DIR):]
        return value

    def argv(self, container: dict[str, Any], server: str | None = None) -> list[str]:
        args = [self.localize(a) for a in container.get("command", []) + container.get("args", [])]
        for i, a in enumerate(args):
            if a == "--metrics-port":
                args[i + 1] = str(free_port())
            if a == "--host" and args[i + 1] == "0.0.0.0":
                args[i + 1] = "127.0.0.1"  # the pod listens on every interface; here only loopback
            if a == "--port" and server:
                args[i + 1] = str(self.ports[server])
        binary = shutil.which(args[0], path=f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin")
        assert binary, f"{args[0]} not found (the image provides it; here: the venv or Debian's mosquitto)"
        return [binary, *args[1:]]

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = self.localize(item["value"])
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                secret = self.children[("Secret", ref["name"])]
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    @staticmethod
    def expand(argv: list[str], env: dict[str, str]) -> list[str]:
        """The kubelet's $(VAR) expansion of command and args."""
        return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]

    def start(self, name: str, container: dict[str, Any], server: str | None = None) -> subprocess.Popen[bytes]:
        env = self.env(container)
        argv = self.expand(self.argv(container, server), env)
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    def run(self, name: str, container: dict[str, Any], timeout: float) -> subprocess.CompletedProcess[str]:
        env = self.env(container)
        argv = self.expand(self.argv(container), env)
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)

    def pod(self, kind: str, name: str) -> dict[str, Any]:
        manifest = self.children[(kind, name)]
        spec = manifest["spec"]
        return spec["jobTemplate"]["spec"]["template"]["spec"] if kind == "CronJob" else spec["template"]["spec"]

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def logs(self) -> str:
        return "\n".join(f"--- {n} (exit {p.poll()}) ---\n{l.read_text(errors='replace')[-1500:]}" for n, p, l in self.procs)


def wait_port(port: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def ran_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pods]:
    """Broker, every simulator and every collector run from their manifests until all three
    protocols have readings stored; then stopped (SIGTERM, as the kubelet does)."""
    import pandas as pd

    pods = Pods(tmp_path_factory.mktemp("pods"))
    try:
        # broker: the init container hashes the Secret's credentials, then Mosquitto runs the ConfigMap's config
        broker = pods.pod("Deployment", child_meta.broker_name(FLEET))
        conf = pods.children[("ConfigMap", child_meta.broker_config_name(FLEET))]["data"]["mosquitto.conf"]
        conf = pods.localize(conf).replace(f"listener {broker_builders.MQTT_PORT}", f"listener {pods.ports['broker']} 127.0.0.1")
        (pods.mosquitto["config"] / "mosquitto.conf").write_text(conf)
        init = broker["initContainers"][0]
        hashed = pods.run("hash-credentials", init, timeout=30)
        assert hashed.returncode == 0, hashed.stderr
        passwd = (pods.mosquitto["auth"] / "passwd").read_text()
        assert passwd.startswith("sensorfleet:$") and "pw-" not in passwd
        os.chmod(pods.mosquitto["auth"] / "passwd", 0o644)
        for d in pods.mosquitto.values():  # Debian's mosquitto drops root for the `mosquitto` user
            os.chmod(d, 0o777)
        pods.start("broker", broker["containers"][0])
        assert wait_port(pods.ports["broker"]), pods.logs()

        for protocol in ("mqtt", "coap", "opcua"):
            for i in range(pods.fleet.spec.protocol(protocol).replicas):
                name = child_meta.simulator_name(FLEET, protocol, i)
                pods.start(name, pods.pod("Deployment", name)["containers"][0], server=name if protocol != "mqtt" else None)
        for protocol in ("coap", "opcua"):
            if protocol == "opcua":
                assert wait_port(pods.ports[child_meta.simulator_name(FLEET, "opcua", 0)], 30), pods.logs()
        time.sleep(1.0)
        for protocol in ("mqtt", "coap", "opcua"):
            for i in range(sizing.collector_count(pods.fleet, protocol)):
                name = child_meta.collector_name(FLEET, protocol, i)
                pods.start(name, pods.pod("Deployment", name)["containers"][0])

        def stored() -> set[str]:
            try:
                frame = pd.read_parquet(pods.data)
            except (OSError, ValueError):
                return set()
            return set(frame["protocol"].astype(str)) if len(frame) else set()

        deadline = time.monotonic() + 60
        while stored() != {"mqtt", "coap", "opcua"} and time.monotonic() < deadline:
            dead = [(n, p.returncode) for n, p, _ in pods.procs if p.poll() is not None]
            assert not dead, f"processes exited: {dead}\n{pods.logs()}"
            time.sleep(1)
        assert stored() == {"mqtt", "coap", "opcua"}, f"readings stored for {stored()}\n{pods.logs()}"
        pods.stop_all()
        yield pods
    finally:
        pods.stop_all()
        shutil.rmtree(pods.mosquitto_root, ignore_errors=True)


def test_broker_simulator_and_collector_commands_store_readings_of_every_protocol(ran_fleet: Pods) -> None:
    import pandas as pd

    frame = pd.read_parquet(ran_fleet.data)
    assert set(frame["fleet"].astype(str)) == {FLEET}
    assert frame.groupby("protocol", observed=True)["device"].nunique().to_dict() == {"coap": 2, "mqtt": 3, "opcua": 2}
    assert {n for n, p, _ in ran_fleet.procs} >= {"broker", f"{FLEET}-mqtt-simulator-0", f"{FLEET}-opcua-collector-0"}


def test_forecast_cronjob_command_writes_a_report_next_to_the_data(ran_fleet: Pods) -> None:
    # A live fleet needs days of history before a daily season can be fitted; users seed it with
    # `sensorfleet generate` (docs/forecasting.md) — two days up to now, then the live readings.
    from datetime import datetime, timedelta, timezone

    start = (datetime.now(timezone.utc) - timedelta(days=2)).replace(second=0, microsecond=0)
    seeded = subprocess.run([sys.executable, "-m", "sensorfleet.cli", "generate", str(ran_fleet.fleet_file), "--days", "1.99", "--interval", "60", "--start", start.isoformat(), "--data", str(ran_fleet.data), "--quiet"], capture_output=True, text=True, timeout=300)
    assert seeded.returncode == 0, seeded.stderr[-2000:]
    forecast = ran_fleet.pod("CronJob", child_meta.forecast_name(FLEET))["containers"][0]
    result = ran_fleet.run("forecast", forecast, timeout=300)
    assert result.returncode == 0, f"forecast command failed ({forecast['args']}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    reports = ran_fleet.data / "_reports"
    assert reports.is_dir() and any(reports.rglob("*")), "the forecast job wrote no report"
    import pandas as pd

    assert len(pd.read_parquet(ran_fleet.data)) > 0, "the report next to the data must not break plain pandas reads"
