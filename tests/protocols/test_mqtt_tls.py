"""MQTT over TLS with a custom CA and client certificates, through the real Debian Mosquitto:
readings arrive complete, and every misconfiguration is an error that names the field to fix."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import yaml

from sensorfleet.testing import component, tls_mosquitto_broker, wait_until
from sensorfleet.tls import generate_tls, write_generated

from .conftest import published_of


def client_flags(broker, *, cert: bool = True) -> list[str]:
    flags = ["--broker", broker.url, "--tls-ca", str(broker.tls["ca.crt"])]
    return flags + (["--tls-cert", str(broker.tls["client.crt"]), "--tls-key", str(broker.tls["client.key"])] if cert else [])


def test_tls_round_trip_with_client_certificates_loses_nothing(write_fleet, tmp_path):
    fleet = write_fleet("mqtt", devices=20, interval=0.1)
    with tls_mosquitto_broker(tmp_path / "broker") as broker:
        data = tmp_path / "data"
        collector = component("collect", "mqtt", fleet, tmp_path, "--data", str(data), "--client-id", "tls-collector", *client_flags(broker)).start()
        try:
            wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 20, message="collector connected over TLS")
            simulator = component("simulate", "mqtt", fleet, tmp_path, "--duration", "4", *client_flags(broker)).start()
            assert simulator.wait(60) == 0, simulator.log()
            published = published_of(simulator)
            assert published > 1000, simulator.log()
            wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= published, 30, message=f"{published} readings stored")
            assert collector.metric("sensorfleet_readings_lost_total") == 0
            assert collector.metric("sensorfleet_readings_duplicate_total") == 0
        finally:
            assert collector.stop() == 0, collector.log()
    df = pd.read_parquet(data)
    assert len(df) == published and not df.duplicated(["device", "sensor", "seq"]).any()
    assert "mqtts://127.0.0.1" in simulator.log()


def test_a_client_without_certificate_is_refused_with_a_clear_error(write_fleet, tmp_path):
    fleet = write_fleet("mqtt")
    with tls_mosquitto_broker(tmp_path / "broker") as broker:
        simulator = component("simulate", "mqtt", fleet, tmp_path, *client_flags(broker, cert=False)).start()
        try:
            wait_until(lambda: "requires a client certificate" in simulator.log(), 20, message="the refusal in the simulator's log")
            assert simulator.metric("sensorfleet_connected") == 0
        finally:
            simulator.stop()
    assert "set spec.broker.tls.certFile (--tls-cert) and spec.broker.tls.keyFile (--tls-key)" in simulator.log()


def test_a_broker_signed_by_another_ca_is_a_clear_error(write_fleet, tmp_path):
    fleet = write_fleet("mqtt")
    other = write_generated(tmp_path / "other-ca", generate_tls("other", ["127.0.0.1"]))
    with tls_mosquitto_broker(tmp_path / "broker") as broker:
        flags = ["--broker", broker.url, "--tls-ca", str(other["ca.crt"]), "--tls-cert", str(broker.tls["client.crt"]), "--tls-key", str(broker.tls["client.key"])]
        collector = component("collect", "mqtt", fleet, tmp_path, "--data", str(tmp_path / "data"), *flags).start()
        try:
            wait_until(lambda: "not signed by a CA we trust" in collector.log(), 20, message="the verification failure in the collector's log")
            assert collector.metric("sensorfleet_connected") == 0
        finally:
            collector.stop()
    assert "set spec.broker.tls.caFile (--tls-ca)" in collector.log()


def test_a_missing_tls_file_from_the_spec_names_the_field(write_fleet, tmp_path):
    fleet = write_fleet("mqtt")
    doc = yaml.safe_load(fleet.read_text())
    doc["spec"]["broker"] = {"mode": "external", "url": "mqtts://127.0.0.1:8883", "tls": {"caFile": str(tmp_path / "absent-ca.pem")}}
    fleet.write_text(yaml.safe_dump(doc))
    result = subprocess.run([sys.executable, "-m", "sensorfleet.cli", "simulate", "mqtt", "--fleet", str(fleet), "--broker", "mqtts://127.0.0.1:8883"],
                            capture_output=True, text=True, timeout=60, env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert f"spec.broker.tls.caFile (--tls-ca): cannot read {tmp_path / 'absent-ca.pem'}: No such file or directory" in " ".join(result.stderr.split())


def test_sensorfleet_run_starts_a_tls_broker_with_generated_certificates(write_fleet, tmp_path):
    fleet = write_fleet("mqtt", devices=20, interval=0.2)
    doc = yaml.safe_load(fleet.read_text())
    doc["spec"]["broker"] = {"mode": "mosquitto", "port": 0, "tls": {"enabled": True, "port": 0}}
    fleet.write_text(yaml.safe_dump(doc))
    run = subprocess.run([sys.executable, "-m", "sensorfleet.cli", "run", str(fleet), "--no-live", "--duration", "4", "--data", str(tmp_path / "data"), "--logs", str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/sbin:/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "broker: mqtts://127.0.0.1:" in run.stdout
    conf = (tmp_path / "logs" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and f"cafile {tmp_path / 'logs' / 'tls' / 'ca.crt'}" in conf
    tail = run.stdout.split("final summary")[1]
    row = [c.strip() for c in next(line for line in tail.splitlines() if line.strip("│ ").startswith("mqtt")).strip("│").split("│")]
    published, stored, lost = (int(row[i].replace(",", "")) for i in (3, 4, 5))
    assert published > 200 and stored == published and lost == 0, row
