"""`sensorfleet run` counts honestly: poison messages do not stop collection and are counted
exactly, a restart is not loss, and the summary never says 0 lost when readings were not stored."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from sensorfleet.run_summary import ProtocolCounts, child_summary, summarize
from sensorfleet.runtime import free_port
from sensorfleet.testing import wait_until

RUN_ENV = {"COLUMNS": "200", "PATH": "/usr/sbin:/usr/bin:/bin"}
VALID = {"fleet": "demo", "protocol": "mqtt", "device": "mqtt-00001", "sensor": "temperature", "value": 21.5, "unit": "degC", "ts": "2026-11-25T12:00:00.000000Z", "seq": 1, "quality": "good", "anomaly": None}


def run_fleet(fleet, tmp_path, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sensorfleet.cli", "run", str(fleet), "--no-live", "--data", str(tmp_path / "data"), "--logs", str(tmp_path / f"logs-{name}"), "--summary", str(tmp_path / f"{name}.json"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=RUN_ENV,
    )


def test_poison_messages_published_to_a_running_fleet_are_counted_exactly_and_collection_goes_on(write_fleet, tmp_path):
    broker_port = free_port()
    fleet = write_fleet({"broker": {"port": broker_port}, "protocols": {"mqtt": {"devices": 10, "interval": 0.2}}, "collector": {"flushInterval": 0.5}})
    poison = {
        "deep.json": b"[" * 200_000,  # the payload that killed paho's network thread (issue 12)
        "large.json": b"[" + b",".join([json.dumps(VALID).encode()] * 8000) + b"]",
        "utf8.json": json.dumps(VALID).encode().replace(b"mqtt-00001", b"mqtt-\xff"),
        "nan.json": json.dumps(VALID).encode().replace(b"21.5", b"NaN"),
        "dup.json": json.dumps(VALID).encode().replace(b'"seq": 1', b'"seq": 1, "seq": 2'),
        "array.json": b"[1,2,3]",
    }
    expected = {"too_deep": 1, "too_large": 1, "invalid_utf8": 1, "non_finite": 1, "duplicate_key": 1, "wrong_type": 3}
    for name, payload in poison.items():
        (tmp_path / name).write_bytes(payload)
    run = run_fleet(fleet, tmp_path, "poison", "--duration", "25")
    try:
        wait_until(lambda: "started mqtt-simulator-0" in (tmp_path / "logs-poison" / "sensorfleet-run.log").read_text() if (tmp_path / "logs-poison" / "sensorfleet-run.log").exists() else False, 90, message="fleet started")
        time.sleep(2)
        for name in poison:
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker_port), "-q", "1", "-t", "sensorfleet/demo/mqtt-00001", "-f", str(tmp_path / name)], check=True, timeout=60)
        output, _ = run.communicate(timeout=240)
    finally:
        run.kill()
    assert run.returncode == 0, output
    mqtt = json.loads((tmp_path / "poison.json").read_text())["protocols"]["mqtt"]
    assert mqtt["malformed_by_reason"] == expected and mqtt["malformed"] == sum(expected.values()), mqtt
    assert mqtt["published"] > 500 and mqtt["stored"] == mqtt["published"] and mqtt["lost"] == 0, mqtt


def test_a_fleet_run_twice_on_the_same_data_counts_the_stopped_time_as_offline_not_lost(write_fleet, tmp_path):
    fleet = write_fleet({
        "broker": {"port": 0},
        "protocols": {
            "mqtt": {"devices": 5, "interval": 0.25},
            "coap": {"enabled": True, "devices": 3, "interval": 0.25, "port": free_port(udp=True)},
            "opcua": {"enabled": True, "devices": 3, "interval": 0.25, "port": free_port()},
        },
        "collector": {"flushInterval": 0.5},
    })
    for name in ("first", "second"):
        run = run_fleet(fleet, tmp_path, name, "--duration", "8")
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output
        if name == "first":
            time.sleep(3)  # the fleet is stopped: these readings are never produced
    second = json.loads((tmp_path / "second.json").read_text())["protocols"]
    for protocol, s in second.items():
        # A CoAP/OPC UA server drops a notification a slow client has no room for (a real loss,
        # counted lost by the collector): under load that happens; the restart itself is no loss.
        dropped = sum((child_summary(log) or {}).get("dropped", 0) for log in (tmp_path / "logs-second").glob(f"{protocol}-simulator-*.log"))
        assert s["lost"] <= dropped and s["duplicate"] == 0, (protocol, s, dropped)
        assert s["stored"] <= s["published"] or s["notes"], (protocol, s)
    assert second["mqtt"]["offline"] >= 5 * 4, "about 3 s x 4 readings/s x 5 devices were never produced"
    assert second["mqtt"]["stored"] == second["mqtt"]["published"] > 0


def test_a_summary_never_reports_zero_lost_when_published_readings_were_not_stored():
    # The measured case of issue 12: the collector's network thread had died.
    summary = summarize("mqtt", ProtocolCounts(published=9_393, stored=2_355, lost=0), collectors_healthy=True)
    assert summary.lost == 9_393 - 2_355 and "counted lost" in summary.notes[0]
    dead = summarize("coap", ProtocolCounts(published=1_000, stored=400, lost=0), collectors_healthy=False)
    assert dead.lost == 600 and "a collector died" in dead.notes[0]
    healthy = summarize("coap", ProtocolCounts(published=1_000, stored=990, lost=0), collectors_healthy=True)
    assert healthy.lost == 0 and healthy.unobserved == 10
    more = summarize("mqtt", ProtocolCounts(published=1_392, stored=1_398, lost=0), collectors_healthy=True)
    assert more.lost == 0 and "stored exceeds published by 6" in more.notes[0]
