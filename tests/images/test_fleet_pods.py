"""Every spec feature in containers of the images, run from the very pod specs the operator's
builders emit (tests/images/conftest.py's `pods`): non-root, read-only root filesystem, writable
places only on the pod's emptyDirs, credentials only from Secret keys the spec references.

A feature that needs a writable home (OPC UA's PKI), a credential from a Secret, or the Mosquitto
image's layout fails here as it would in a pod; only the network is the host's (Service names are
host aliases of 127.0.0.1)."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sensorfleet.dataset import read_dataset
from sensorfleet.operator import broker_builders, builders, child_meta
from sensorfleet.runtime import free_port
from sensorfleet.spec import parse_fleet
from sensorfleet.testing import wait_for_port, wait_until

pytestmark = pytest.mark.slow

OWNER = child_meta.Owner(name="pods", namespace="default", uid="00000000-0000-0000-0000-000000000001")
DEVICES = 3


def _fleet(protocols: dict, **spec):
    enabled = {p: {"enabled": False} for p in ("mqtt", "coap", "opcua")}
    for name, section in protocols.items():
        enabled[name] = {"enabled": True, "devices": DEVICES, "interval": 0.2, **section}
    return parse_fleet({
        "apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "pods"},
        # one metrics port per pod would clash on the host's network: probes are tested in the cluster
        "spec": {"protocols": enabled, "collector": {"flushInterval": 0.5}, "monitoring": {"enabled": False},
                 "forecasting": {"enabled": False}, **spec},
    })


def _by_name(children: list[dict]) -> dict[str, dict]:
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in children}


def _run_fleet(pods, children: list[dict], protocol: str) -> Path:
    """Simulator then collector pods of `protocol`; returns the claim's folder once readings of
    every device are stored there."""
    pods.add_objects(children)
    named = _by_name(children)
    pods.run_pod(pods.pod_spec_of(named[f"Deployment/{child_meta.simulator_name('pods', protocol, 0)}"]))
    collector = pods.run_pod(pods.pod_spec_of(named[f"Deployment/{child_meta.collector_name('pods', protocol, 0)}"]))
    data = pods.claim_dir(child_meta.data_claim_name("pods"))

    def stored_every_device() -> bool:
        assert collector.running(), f"collector exited: {collector.logs()}"
        frame = read_dataset(str(data))
        return len(frame) > 0 and frame["device"].nunique() == DEVICES

    wait_until(stored_every_device, 240, interval=1.0, message="readings of every device in the claim")
    return data


def _no_duplicates(data: Path) -> None:
    frame = read_dataset(str(data))
    for (_device, _sensor), group in frame.groupby(["device", "sensor"]):
        assert group["seq"].is_unique
    assert len(frame) >= DEVICES


def test_mqtt_fleet_with_its_mosquitto_pod(pods):
    """The operator's broker pod (init container hashing the generated credentials into an
    emptyDir, Mosquitto reading them) from the Mosquitto image; simulator and collector from the app
    image authenticate with the generated Secret."""
    port = free_port()
    fleet = _fleet({"mqtt": {}}, broker={"port": port})
    credentials = broker_builders.BrokerCredentials(broker_builders.BROKER_USERNAME, "generated-" + "x" * 16)
    children = builders.build_children(fleet, OWNER, child_meta.BuildOptions(), credentials)
    pods.add_objects(children)
    broker = pods.run_pod(pods.pod_spec_of(_by_name(children)[f"Deployment/{child_meta.broker_name('pods')}"]))
    wait_for_port(port, timeout=120)
    assert broker.running(), broker.logs()
    data = _run_fleet(pods, children, "mqtt")
    _no_duplicates(data)
    # anonymous clients are refused: the credentials are what let the simulator in
    refused = subprocess.run(["mosquitto_pub", "-p", str(port), "-t", "x", "-m", "1", "-q", "1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0


def test_external_broker_credentials_come_from_the_users_secret(pods, tmp_path):
    port = free_port()
    (tmp_path / "passwd").write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(tmp_path / "passwd"), "plant-user", "plant-secret-42"], check=True)
    # `user`: as root Mosquitto would drop to `mosquitto`, who cannot read pytest's private tmp_path
    (tmp_path / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nuser {getpass.getuser()}\nallow_anonymous false\n"
                                             f"password_file {tmp_path / 'passwd'}\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=30)
        ref = {"username": {"name": "plant-broker", "key": "user"}, "password": {"name": "plant-broker", "key": "pass"}}
        fleet = _fleet({"mqtt": {}}, broker={"mode": "external", "url": f"mqtt://127.0.0.1:{port}", "credentials": ref})
        children = builders.build_children(fleet, OWNER, child_meta.BuildOptions(), None)
        assert "plant-secret-42" not in json.dumps(children) and "plant-user" not in json.dumps(children)
        pods.secrets["plant-broker"] = {"user": "plant-user", "pass": "plant-secret-42"}
        _no_duplicates(_run_fleet(pods, children, "mqtt"))
    finally:
        broker.terminate()
        broker.wait(10)


def test_opcua_username_and_basic256sha256_on_a_read_only_root(pods):
    """Each pod makes its self-signed certificate under HOME, which only its emptyDir makes
    writable; the simulator accepts exactly the username/password of the referenced Secret."""
    port = free_port()
    ref = {"username": {"name": "opcua-users", "key": "username"}, "password": {"name": "opcua-users", "key": "password"}}
    fleet = _fleet({"opcua": {"port": port, "security": "Basic256Sha256", "authentication": "username", "credentials": ref}})
    children = builders.build_children(fleet, OWNER, child_meta.BuildOptions(), None)
    assert "line-operator" not in json.dumps(children)
    pods.secrets["opcua-users"] = {"username": "line-operator", "password": "opcua-secret-7"}
    _no_duplicates(_run_fleet(pods, children, "opcua"))
    pki = list((pods.root / "pods").glob(f"*/home/.local/share/sensorfleet/opcua-pki/pods/*"))
    assert pki, "no certificate was written on the home emptyDir"


def test_coap_fleet_in_containers(pods):
    fleet = _fleet({"coap": {"port": free_port()}})
    children = builders.build_children(fleet, OWNER, child_meta.BuildOptions(), None)
    _no_duplicates(_run_fleet(pods, children, "coap"))


def _stub_nixtla():
    """The TimeGPT stub of tests/forecasting (the one faked service: TimeGPT is paid SaaS)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "forecasting" / "test_timegpt.py"
    spec = importlib.util.spec_from_file_location("timegpt_stub", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StubNixtla()


def test_forecast_job_gets_the_timegpt_key_from_its_secret_and_writes_its_report(pods, tmp_path):
    import threading

    fleet = _fleet({"mqtt": {}}, forecasting={"enabled": True, "model": "timegpt", "horizon": 30,
                                             "apiKey": {"name": "nixtla", "key": "api-key"}})
    children = builders.build_children(fleet, OWNER, child_meta.BuildOptions(), broker_builders.BrokerCredentials("u", "p"))
    assert "test-key" not in json.dumps(children)
    pods.add_objects(children)
    pods.secrets["nixtla"] = {"api-key": "test-key"}  # the key the stub accepts
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(pods.configmaps[child_meta.fleet_configmap_name("pods")]["fleet.yaml"])
    data = pods.claim_dir(child_meta.data_claim_name("pods"))
    subprocess.run([sys.executable, "-m", "sensorfleet.cli", "generate", str(fleet_file), "--days", "2", "--interval", "60", "--data", str(data), "--quiet"],
                   check=True, capture_output=True, timeout=300)
    subprocess.run(["chmod", "-R", "a+rwX", str(data)], check=True)
    stub = _stub_nixtla()
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        job = pods.pod_spec_of(_by_name(children)[f"CronJob/{child_meta.forecast_name('pods')}"])
        # NIXTLA_BASE_URL: where the stub listens instead of Nixtla's service
        run = pods.run_pod(job, extra_env={"NIXTLA_BASE_URL": stub.url})
        code = run.exit_code(timeout=900)
        assert code == 0, run.logs()
    finally:
        stub.shutdown()
        stub.server_close()
    posts = [r for r in stub.requests if r["method"] == "POST"]
    assert posts and all(r["headers"]["Authorization"] == "Bearer test-key" for r in posts)
    metrics = [json.loads(p.read_text()) for p in data.rglob("metrics.json")]
    assert metrics and metrics[0]["headline"]["model"] == "TimeGPT"


def test_sparkplug_fleet_with_its_mosquitto_pod(pods):
    """payloadFormat sparkplugB from the same pod specs: the app image's edge node (MQTT 5, Last
    Will) and Sparkplug host through the operator's Mosquitto pod, with the generated credentials."""
    port = free_port()
    fleet = _fleet({"mqtt": {"payloadFormat": "sparkplugB"}}, broker={"port": port})
    credentials = broker_builders.BrokerCredentials(broker_builders.BROKER_USERNAME, "generated-" + "x" * 16)
    children = builders.build_children(fleet, OWNER, child_meta.BuildOptions(), credentials)
    pods.add_objects(children)
    broker = pods.run_pod(pods.pod_spec_of(_by_name(children)[f"Deployment/{child_meta.broker_name('pods')}"]))
    wait_for_port(port, timeout=120)
    assert broker.running(), broker.logs()
    data = _run_fleet(pods, children, "mqtt")
    _no_duplicates(data)
