"""Hostile payloads never stop a collector: every one is counted by reason, valid ones are stored.

The fuzzer and the property test drive the collectors' real code paths (tests/spine/fuzz/ingest.py):
paho's `_on_message` and the writer thread's `handle` for MQTT, CoAP's `_on_message` and
`handle_item`, OPC UA's `publish_callback` and `handle_item`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensorfleet.collectors.mqtt import MqttCollector
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import MALFORMED_REASONS, decode_json_payload
from sensorfleet.runtime import CollectorOptions, free_port, parse_broker_url
from sensorfleet.spec import load_fleet
from sensorfleet.testing import component, wait_until

FUZZ = Path(__file__).resolve().parent / "fuzz"
VALID = {"fleet": "demo", "protocol": "mqtt", "device": "mqtt-00001", "sensor": "temperature", "value": 21.5, "unit": "degC", "ts": "2026-11-25T12:00:00.000000Z", "seq": 1, "quality": "good", "anomaly": None}
GOOD = json.dumps(VALID).encode()


def _ingest():
    spec = importlib.util.spec_from_file_location("sensorfleet_fuzz_ingest", FUZZ / "ingest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ingest = _ingest()


def _fuzz(tmp_path: Path, runs: int, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    # -max_len bounds the fuzzer's input; the builders in ingest.py decide the payloads' sizes.
    args = [sys.executable, str(FUZZ / "fuzz_ingest.py"), f"-runs={runs}", "-seed=12345", "-max_len=4096", "-rss_limit_mb=4096", f"-artifact_prefix={tmp_path}/"]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env={**os.environ, **(env or {})})


def test_coverage_guided_fuzzing_of_every_collector_counts_100000_hostile_inputs(tmp_path):
    """atheris mutates inputs towards new code paths; each becomes one hostile case fed to a real
    collector. A crash, an input counted zero times or wrongly, or an unknown reason fails it.
    About 25 s at load 11 on 2 cores (13 s of CPU)."""
    runs = 100_000
    run = _fuzz(tmp_path, runs)
    lines = [line for line in run.stdout.splitlines() + run.stderr.splitlines() if line.startswith("FUZZ-SUMMARY ")]
    assert run.returncode == 0 and lines, f"exit {run.returncode}\n{run.stderr[-4000:]}"
    summary = json.loads(lines[-1].removeprefix("FUZZ-SUMMARY "))
    # It ran to the end, and every case and every document in it is accounted for.
    assert summary["cases"] == runs == sum(summary["by_kind"].values()), summary["by_kind"]
    totals, reasons_by_protocol = summary["totals"], summary["malformed_by_reason"]
    assert summary["documents"] >= runs
    assert summary["documents"] == sum(t["received"] + t["malformed"] for t in totals.values())
    for protocol, t in totals.items():
        assert sum(reasons_by_protocol[protocol].values()) == t["malformed"], protocol
        assert t["received"] == t["stored"] + t["duplicates"], protocol
    assert set(summary["by_kind"]) >= {"raw_bytes", "valid", "wrong_type", "deep_nesting", "megabyte", "invalid_utf8", "duplicate_key", "number_literal", "mixed_array", "cbor", "opcua_value"}
    assert summary["stored"] > 0, "valid readings among the hostile ones were stored"
    reasons = {reason for counts in reasons_by_protocol.values() for reason in counts}
    assert reasons >= {"too_deep", "too_large", "invalid_utf8", "not_json", "wrong_type", "non_finite", "duplicate_key", "out_of_range", "missing_field", "bad_ts", "not_cbor", "bad_seq", "unknown_handle"}, reasons


def test_the_fuzzer_finds_the_crash_of_the_decoder_before_issue_12(tmp_path):
    """The same fuzzer against main's old MQTT decoding (json.loads, tests/spine/fuzz/old_decoder.py)
    stops on a RecursionError and saves the input: the 100,000-case run above can fail."""
    run = _fuzz(tmp_path, 5_000, {"SENSORFLEET_FUZZ_DECODER": "old"}, timeout=300)
    assert run.returncode != 0, "the old decoder survived 5,000 hostile cases"
    assert "RecursionError" in run.stdout + run.stderr, run.stderr[-4000:]
    assert list(tmp_path.glob("crash-*")), "the crashing input is saved for replay"


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_any_case_is_stored_or_counted_once_per_document(tmp_path_factory, rng: random.Random):
    harness = ingest.IngestHarness(tmp_path_factory.mktemp("ingest"))
    for _ in range(20):
        harness.feed(harness.case(ingest.RandomDraw(rng)))  # raises when a case is miscounted
    harness.close()
    harness.check_totals()


@pytest.mark.parametrize(("payload", "reason", "named"), [
    (b"[" * 200_000, "too_deep", "deeper"),
    (b'{"a":' * 200_000, "too_deep", "deeper"),
    (b"[" + b",".join([GOOD] * 6000) + b"]", "too_large", "larger than the limit"),
    (b"\xff\xfe", "invalid_utf8", "byte 0"),
    (GOOD.replace(b"mqtt-00001", b"mqtt-\xc0\x80"), "invalid_utf8", "byte 54 (0xc0)"),
    (b"{nope", "not_json", "byte"),
    (GOOD.replace(b"21.5", b"NaN"), "non_finite", "byte 96"),
    (GOOD.replace(b"21.5", b"-Infinity"), "non_finite", "NaN or Infinity"),
    (GOOD.replace(b"21.5", b"1e400"), "out_of_range", "`value`"),
    (GOOD.replace(b'"seq": 1', b'"seq": 99999999999999999999'), "out_of_range", "`seq`"),
    (GOOD.replace(b'"seq": 1', b'"seq": -1'), "out_of_range", "`seq`"),
    (GOOD.replace(b'"seq": 1', b'"seq": 1, "seq": 2'), "duplicate_key", "'seq'"),
    (GOOD.replace(b"21.5", b'"hot"'), "wrong_type", "`value`"),
    (GOOD.replace(b'"seq": 1', b'"seq": true'), "wrong_type", "`seq`"),
    (b"[1]", "wrong_type", "document 0"),
    (GOOD.replace(b'"device": "mqtt-00001", ', b""), "missing_field", "`device`"),
    (GOOD.replace(b"2026-11-25T12:00:00.000000Z", b"yesterday"), "bad_ts", "`ts`"),
    (GOOD.replace(b"2026-11-25T12:00:00.000000Z", b"2026-11-25T12:00:00"), "bad_ts", "timezone"),
    (GOOD.replace(b'"good"', b'"great"'), "bad_field", "`quality`"),
    (GOOD.replace(b"mqtt-00001", b"x" * 129), "bad_field", "`device`"),
    (GOOD.replace(b"21.5", b"null"), "bad_value", "'value'"),
    (b"[]", "empty_batch", "empty array"),
])
def test_each_refusal_names_its_reason_and_the_field_or_byte(payload, reason, named):
    decoded = decode_json_payload(payload)
    assert not decoded.readings and len(decoded.rejected) == 1
    assert decoded.rejected[0].kind == reason and reason in MALFORMED_REASONS
    assert named in str(decoded.rejected[0]), str(decoded.rejected[0])


def test_an_array_refuses_its_bad_documents_and_keeps_the_good_ones():
    docs = [VALID, {**VALID, "seq": 2, "value": "hot"}, 7, {**VALID, "seq": 3}]
    decoded = decode_json_payload(json.dumps(docs).encode())
    assert [r.seq for r in decoded.readings] == [1, 3]
    assert [e.kind for e in decoded.rejected] == ["wrong_type", "wrong_type"]
    assert "document 1" in str(decoded.rejected[0]) and "document 2" in str(decoded.rejected[1])


@pytest.mark.parametrize("anomaly", [None, *__import__("sensorfleet.reading", fromlist=["ANOMALIES"]).ANOMALIES])
@pytest.mark.parametrize("quality", ["good", "uncertain", "bad"])
def test_every_fault_kind_and_quality_the_simulator_sends_is_accepted(anomaly, quality):
    """The schema's enums come from reading.ANOMALIES / QUALITIES: a fault kind added to the signal
    model (drift, level_shift, ...) must not turn its readings into `bad_field` refusals."""
    from sensorfleet.reading import Reading, parse_ts

    reading = Reading("demo", "mqtt", "mqtt-00001", "temperature", None if quality == "bad" else 1.0, "degC", parse_ts("2026-11-25T12:00:00Z"), 7, quality, anomaly)
    assert decode_json_payload(reading.to_json()).readings == [reading]


def test_the_decoder_reads_exactly_what_reading_to_wire_writes():
    from sensorfleet.reading import Reading, format_ts, parse_ts

    reading = Reading("demo", "mqtt", "mqtt-00001", "temperature", -3.25, "degC", parse_ts("2026-11-25T12:00:00.123456Z"), 2**62, "uncertain", "stuck")
    assert decode_json_payload(reading.to_json()).readings == [reading]
    assert format_ts(decode_json_payload(reading.to_json()).readings[0].ts) == "2026-11-25T12:00:00.123456Z"


def test_live_collector_survives_a_flood_of_garbage(write_fleet, tmp_path, mosquitto):
    fleet = write_fleet()
    collector = component("collect", "mqtt", fleet, tmp_path, "--data", str(tmp_path / "data"), "--broker", mosquitto.url).start()
    wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 30, message="collector connected")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    garbage = [b"", b"\x00\x01\x02", b"{", b"[1,2,3]", b'{"fleet": "demo"}', json.dumps({**VALID, "value": "NaN"}).encode(), json.dumps({**VALID, "fleet": "other"}).encode()] * 30
    for payload in garbage:
        client.publish("sensorfleet/demo/mqtt-00001", payload, qos=1).wait_for_publish(10)
    valid = [json.dumps({**VALID, "seq": i}).encode() for i in range(1, 11)]
    for payload in valid:
        client.publish("sensorfleet/demo/mqtt-00001", payload, qos=1).wait_for_publish(10)
    client.loop_stop()
    wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") == 10, 60, message="valid readings stored")
    # [1,2,3] holds three bad documents; the empty payload is not JSON; every other one is one bad payload
    wait_until(lambda: collector.metric("sensorfleet_payloads_malformed_total") == 30 * 9, 30, message="every bad document counted")
    assert collector.process.poll() is None, "collector crashed"
    log = collector.log()
    assert log.count("skipping malformed mqtt payload (not_json)") == 1, "each kind is logged once"
    assert collector.stop() == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_collector_whose_writer_thread_dies_exits_non_zero_and_fails_liveness(write_fleet, tmp_path, mosquitto):
    """Whatever ends a vital thread (here: a handler that raises), the process must not run on
    deaf: /healthz answers 503 and `run` returns 1, so Kubernetes restarts the container."""
    fleet = load_fleet(write_fleet())
    metrics = FleetMetrics("demo", "mqtt", "collector")
    port = free_port()
    metrics.serve(port, "127.0.0.1", None)
    collector = MqttCollector(CollectorOptions(fleet, str(tmp_path / "data")), parse_broker_url(mosquitto.url), metrics)

    def broken_handle(item):
        raise MemoryError("injected: the writer cannot go on")

    collector.handle = broken_handle  # type: ignore[method-assign]
    stop = threading.Event()
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(code=collector.run(stop, duration=120)))
    thread.start()
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status == 200
        wait_until(lambda: metrics.registry.get_sample_value("sensorfleet_connected", {"fleet": "demo", "protocol": "mqtt"}) == 1, 30, message="collector connected")
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        publisher.connect("127.0.0.1", mosquitto.port)
        publisher.loop_start()
        publisher.publish("sensorfleet/demo/mqtt-00001", GOOD, qos=1).wait_for_publish(10)
        publisher.loop_stop()

        def liveness_failed() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
            except urllib.error.HTTPError as exc:
                return exc.code == 503 and b"mqtt-writer" in exc.read()
            return False

        wait_until(liveness_failed, 30, message="/healthz failing")
        thread.join(60)
        assert result.get("code") == 1
    finally:
        stop.set()
        thread.join(60)


def test_collector_and_simulator_pods_are_restarted_when_healthz_fails():
    from sensorfleet.operator import workload_builders
    from sensorfleet.operator.child_meta import BuildOptions, Owner
    from sensorfleet.spec import SensorFleet

    fleet = SensorFleet.model_validate({"metadata": {"name": "plant", "namespace": "factory"}, "spec": {}})
    owner = Owner("plant", "factory", "0000-uid")
    for deployment in (workload_builders.build_collector_deployment(fleet, owner, BuildOptions(), "mqtt", 0), workload_builders.build_simulator_deployment(fleet, owner, BuildOptions(), "mqtt", 0)):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, deployment["metadata"]["name"]


def test_a_refused_message_is_acknowledged_so_a_restarted_collector_never_sees_it_again(write_fleet, tmp_path, mosquitto):
    """The poison message of issue 12 is counted once and acknowledged like a stored one: after a
    SIGKILL and a restart on the same persistent session the broker has nothing to redeliver
    (before the fix it redelivered the message, which killed the next collector too)."""
    fleet = write_fleet()
    args = ("--data", str(tmp_path / "data"), "--broker", mosquitto.url, "--client-id", "poisoned-collector")
    first = component("collect", "mqtt", fleet, tmp_path, *args).start()
    wait_until(lambda: first.metric("sensorfleet_connected") == 1, 30, message="collector connected")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        client.publish("sensorfleet/demo/mqtt-00001", b"[" * 200_000, qos=1).wait_for_publish(10)
        wait_until(lambda: first.metric("sensorfleet_payloads_malformed_total{reason=too_deep}") == 1, 30, message="poison counted")
        time.sleep(1.0)  # the PUBACK is sent as soon as the refusal is counted (nothing to write)
        first.signal(signal.SIGKILL)
        first.wait(10)
        second = component("collect", "mqtt", fleet, tmp_path, *args).start()
        wait_until(lambda: second.metric("sensorfleet_connected") == 1, 30, message="restarted collector connected")
        # A valid reading published after the restart arrives after anything the session held.
        client.publish("sensorfleet/demo/mqtt-00001", json.dumps({**VALID, "seq": 2}).encode(), qos=1).wait_for_publish(10)
        wait_until(lambda: second.metric("sensorfleet_readings_stored_total") == 1, 30, message="reading after the restart stored")
        assert second.metric("sensorfleet_payloads_malformed_total") == 0, "the refused message was redelivered"
        assert second.stop() == 0
    finally:
        client.loop_stop()
