"""Backpressure with real failures, no mocks: a collector whose store fills up (a small tmpfs the
test mounts and fills) or goes away (the real SeaweedFS server stopped mid-run) keeps its memory
bounded by spec.storage.maxBufferedReadings, says why in its log and metrics, and once the store
is back writes everything: 0 lost for MQTT (the broker kept what was not acknowledged); for CoAP
every reading beyond the bound is counted lost with reason storage_unavailable, exactly."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sensorfleet.dataset import read_dataset
from sensorfleet.runtime import free_port
from sensorfleet.testing import Component, component, mosquitto_broker, wait_until

LIMIT = 3000  # spec.storage.maxBufferedReadings of these fleets
DEVICES, SENSORS, INTERVAL = 60, 3, 0.05  # 3,600 readings/s
RATE = DEVICES * SENSORS / INTERVAL
GATEWAY_BATCH = DEVICES * SENSORS  # one MQTT message per gateway tick
RATE_COAP = 20 * SENSORS / 0.1


def write_fleet(tmp_path: Path, protocol: str, **protocol_extra) -> Path:
    protocols = {p: {"enabled": False} for p in ("mqtt", "coap", "opcua")}
    protocols[protocol] = {"enabled": True, "devices": DEVICES, "interval": INTERVAL, **protocol_extra}
    doc = {"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "bp"},
           "spec": {"protocols": protocols, "collector": {"flushInterval": 0.5},
                    "storage": {"maxBufferedReadings": LIMIT}, "anomalies": {"dropoutProbability": 0.0}}}
    path = tmp_path / f"{protocol}-fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 8 MiB filesystem (tmpfs), unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "sf-backpressure", str(mount)], capture_output=True, text=True)
    assert done.returncode == 0, f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {done.stderr.strip()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the filesystem says ENOSPC; returns it (delete it to free the space)."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def published(simulator: Component) -> int:
    for line in simulator.log().splitlines():
        if "published" in line and "readings, dropped" in line:
            return int(line.split("published ")[1].split(" readings")[0])
    raise AssertionError(f"no final count in the simulator's log:\n{simulator.log()[-2000:]}")


def assert_complete(df: pd.DataFrame, expected: int) -> None:
    assert len(df) == expected, f"stored {len(df)} of {expected} published"
    assert not df.duplicated(["device", "sensor", "seq"]).any(), "duplicates stored"
    span = df.groupby(["device", "sensor"])["seq"].agg(lambda s: s.max() - s.min() + 1 - s.nunique())
    assert span.sum() == 0, "sequence gaps in the dataset"


class Outage:
    """Samples a collector while its store is failing: peak RSS, peak buffered readings, what it
    received meanwhile."""

    def __init__(self, collector: Component):
        self.collector = collector
        self.baseline_rss = max(self._rss() for _ in range(5) if time.sleep(0.2) is None)
        self.peak_rss = self.baseline_rss
        self.peak_buffered = 0.0

    def _rss(self) -> float:
        assert self.collector.process is not None
        return rss_mib(self.collector.process.pid)

    def watch(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.peak_rss = max(self.peak_rss, self._rss())
            self.peak_buffered = max(self.peak_buffered, self.collector.metric("sensorfleet_collector_buffered_readings"))
            time.sleep(0.25)


def run_mqtt_outage(tmp_path: Path, data: str, break_store, repair_store, outage_seconds: float, env_note: str) -> tuple[Outage, Component, int, pd.DataFrame]:
    fleet = write_fleet(tmp_path, "mqtt", messageMode="gateway", gatewayBatch=GATEWAY_BATCH)
    with mosquitto_broker(tmp_path / "mosquitto") as broker:
        collector = component("collect", "mqtt", fleet, tmp_path, "--data", data, "--broker", broker.url, "--client-id", "bp-collector").start()
        simulator = None
        try:
            wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 30, message="collector connected")
            seconds = outage_seconds + 20
            simulator = component("simulate", "mqtt", fleet, tmp_path, "--broker", broker.url, "--duration", str(seconds)).start()
            wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= 2 * RATE, 30, message="readings stored while the store is fine")
            outage = Outage(collector)
            break_store()
            wait_until(lambda: collector.metric("sensorfleet_storage_degraded") == 1, 30, message=f"sensorfleet_storage_degraded = 1 ({env_note})")
            received_at_break = collector.metric("sensorfleet_readings_received_total")
            degraded_report = readyz(collector)
            outage.watch(outage_seconds)
            received_during = collector.metric("sensorfleet_readings_received_total") - received_at_break
            repair_store()
            wait_until(lambda: collector.metric("sensorfleet_storage_degraded") == 0, 60, message="the store writable again")
            assert readyz(collector) == (200, {"storage": "ok"})
            assert simulator.wait(seconds + 60) == 0, simulator.log()[-2000:]
            total = published(simulator)
            wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= total, 90, message=f"all {total} readings stored")
            lost = collector.metric("sensorfleet_readings_lost_total") - collector.metric("sensorfleet_readings_late_total")
            assert collector.stop() == 0, collector.log()[-3000:]
        finally:
            for c in (simulator, collector):
                if c is not None and c.process and c.process.poll() is None:
                    c.stop()
    df = read_dataset(data, columns=["device", "sensor", "seq"])
    assert lost == 0
    # The readiness probe of the collector pod (and so the fleet's StorageDegraded) said why.
    code, report = degraded_report
    assert code == 503 and report["storage"] == "degraded" and data in report["message"] and report["errno"], degraded_report
    # While the store failed the collector took only what fits its buffer (plus the message being
    # taken when it filled); the broker kept the rest.
    assert outage.peak_buffered <= LIMIT + GATEWAY_BATCH, outage.peak_buffered
    assert received_during <= LIMIT + 2 * GATEWAY_BATCH, f"received {received_during:.0f} readings while the store was down"
    assert received_during < RATE * outage_seconds / 4, "backpressure: the collector stopped taking messages"
    return outage, collector, total, df


def readyz(c: Component) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_mqtt_full_disk_bounded_memory_then_everything_stored(tmp_path: Path, small_disk: Path) -> None:
    data = str(small_disk / "data")
    filler: list[Path] = []
    outage, collector, total, df = run_mqtt_outage(
        tmp_path, data, lambda: filler.append(fill(small_disk)), lambda: filler[0].unlink(), outage_seconds=15, env_note="disk full")
    assert_complete(df, total)
    log = collector.log()
    assert "ENOSPC" in log and "No space left on device" in log and data in log, log[-3000:]
    assert "writable again" in log
    growth = outage.peak_rss - outage.baseline_rss
    print(f"\nMQTT, disk full for 15 s at {RATE:.0f} readings/s: RSS {outage.baseline_rss:.0f} -> peak {outage.peak_rss:.0f} MiB "
          f"(+{growth:.1f}), peak buffered {outage.peak_buffered:.0f} (limit {LIMIT}); load {os.getloadavg()[0]:.1f}")
    assert growth < 40, f"RSS grew by {growth:.0f} MiB while the disk was full"


def summary(c: Component) -> dict:
    import json
    import re

    lines = re.findall(r"SUMMARY (\{.*\})", c.log())
    assert lines, f"no SUMMARY in the log:\n{c.log()[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("protocol", ["coap", "opcua"])
def test_full_disk_counts_what_a_coap_or_opcua_collector_could_not_keep_as_lost_exactly(protocol: str, tmp_path: Path, small_disk: Path) -> None:
    devices, interval = 20, 0.1  # RATE_COAP: well within one collector's reach
    fleet = write_fleet(tmp_path, protocol, devices=devices, interval=interval)
    data = str(small_disk / "data")
    port = free_port(udp=protocol == "coap")
    target = f"coap://127.0.0.1:{port}" if protocol == "coap" else f"opc.tcp://127.0.0.1:{port}/"
    simulator = component("simulate", protocol, fleet, tmp_path, "--port", str(port)).start()
    collector = None
    try:
        wait_until(lambda: "simulator of fleet" in simulator.log(), 60, message=f"{protocol} simulator serving")
        collector = component("collect", protocol, fleet, tmp_path, "--data", data, "--target", target).start()
        wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= 1000, 60, message="readings stored while the disk has room")
        outage = Outage(collector)
        filler = fill(small_disk)
        wait_until(lambda: collector.metric("sensorfleet_storage_degraded") == 1, 30, message="sensorfleet_storage_degraded = 1")
        outage.watch(12)  # ~7,200 readings arrive; LIMIT fit in the buffer
        unstored_during = collector.metric("sensorfleet_readings_unstored_total")  # one reason: storage_unavailable
        filler.unlink()
        wait_until(lambda: collector.metric("sensorfleet_storage_degraded") == 0, 60, message="the disk writable again")
        time.sleep(3)  # collecting normally again
        assert simulator.stop() == 0, simulator.log()[-3000:]
        produced = summary(simulator)
        time.sleep(1.5)  # what was in flight arrives
        wait_until(lambda: collector.metric("sensorfleet_collector_buffered_readings") == 0, 30, message="the buffer drained")
        unstored = collector.metric("sensorfleet_readings_unstored_total")
        assert collector.stop() == 0, collector.log()[-3000:]
        collected = summary(collector)
    finally:
        for c in (collector, simulator):
            if c is not None and c.process and c.process.poll() is None:
                c.stop()
    df = read_dataset(data, columns=["device", "sensor", "seq"])
    assert not df.duplicated(["device", "sensor", "seq"]).any(), "duplicates stored"
    assert collected["stored"] == len(df)
    # The counts do not lie: every reading received is stored or named lost at the bound
    # (storage_unavailable); every seq missing from the dataset is counted lost (the bound's drops
    # plus any the simulator could not send), none twice.
    assert collected["received"] <= produced["published"]
    assert collected["received"] == collected["stored"] + unstored + collected["duplicates"], (produced, collected, unstored)
    assert unstored >= unstored_during > 0 and unstored <= collected["lost"]
    spans = df.groupby(["device", "sensor"])["seq"].agg(["min", "max", "count"])
    assert int((spans["max"] - spans["min"] + 1 - spans["count"]).sum()) == collected["lost"], (produced, collected, unstored)
    print(f"\n{protocol}, disk full for 12 s at {RATE_COAP:.0f} readings/s: published {produced['published']}, received {collected['received']}, "
          f"stored {collected['stored']}, lost {collected['lost']} (storage_unavailable {unstored:.0f}); peak buffered {outage.peak_buffered:.0f}, "
          f"RSS {outage.baseline_rss:.0f} -> {outage.peak_rss:.0f} MiB; load {os.getloadavg()[0]:.1f}")
    assert outage.peak_buffered <= LIMIT
    log = collector.log()
    assert "ENOSPC" in log and data in log



def test_mqtt_s3_outage_bounded_memory_then_everything_stored(tmp_path: Path, s3_server, s3_env) -> None:
    import uuid

    data = f"s3://outage-{uuid.uuid4().hex[:8]}/fleet"
    endpoint = s3_env["AWS_ENDPOINT_URL"]
    outage, collector, total, df = run_mqtt_outage(
        tmp_path, data, lambda: s3_server.run("down"), lambda: s3_server.run("up"), outage_seconds=30, env_note="SeaweedFS stopped")
    assert_complete(df, total)
    log = collector.log()
    assert endpoint in log and data in log and "ECONNREFUSED" in log, log[-3000:]
    growth = outage.peak_rss - outage.baseline_rss
    print(f"\nMQTT, SeaweedFS stopped for 30 s at {RATE:.0f} readings/s: RSS {outage.baseline_rss:.0f} -> peak {outage.peak_rss:.0f} MiB "
          f"(+{growth:.1f}), peak buffered {outage.peak_buffered:.0f} (limit {LIMIT}); load {os.getloadavg()[0]:.1f}")
    assert growth < 40, f"RSS grew by {growth:.0f} MiB while the store was down"


def test_mqtt_collector_killed_while_the_disk_is_full_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    """Acknowledgements go out only once a batch is written: what a collector held in memory when
    it was SIGKILLed is redelivered by the broker to its successor."""
    fleet = write_fleet(tmp_path, "mqtt", messageMode="gateway", gatewayBatch=GATEWAY_BATCH)
    data = str(small_disk / "data")
    with mosquitto_broker(tmp_path / "mosquitto") as broker:
        args = ("--data", data, "--broker", broker.url, "--client-id", "bp-killed")
        first = component("collect", "mqtt", fleet, tmp_path, *args).start()
        second = simulator = None
        try:
            wait_until(lambda: first.metric("sensorfleet_connected") == 1, 30, message="collector connected")
            simulator = component("simulate", "mqtt", fleet, tmp_path, "--broker", broker.url, "--duration", "15").start()
            wait_until(lambda: first.metric("sensorfleet_readings_stored_total") >= RATE, 30, message="readings stored")
            filler = fill(small_disk)
            wait_until(lambda: first.metric("sensorfleet_collector_buffered_readings") >= LIMIT, 30, message="the buffer full")
            held = first.metric("sensorfleet_collector_buffered_readings")
            first.signal(9)
            first.wait(10)
            filler.unlink()
            second = component("collect", "mqtt", fleet, tmp_path, *args).start()
            assert simulator.wait(90) == 0, simulator.log()[-2000:]
            total = published(simulator)
            wait_until(lambda: len(read_dataset(data, columns=["seq"])) >= total, 90, message=f"all {total} readings stored")
            lost = second.metric("sensorfleet_readings_lost_total") - second.metric("sensorfleet_readings_late_total")
            assert second.stop() == 0, second.log()[-3000:]
        finally:
            for c in (simulator, first, second):
                if c is not None and c.process and c.process.poll() is None:
                    c.stop()
    assert held >= LIMIT and lost == 0
    assert_complete(read_dataset(data, columns=["device", "sensor", "seq"]), total)


def test_a_duplicate_is_acknowledged_only_after_its_first_copy_is_written(small_disk: Path) -> None:
    """A message redelivered while the store fails holds only duplicates of readings still waiting
    in the storage queue: acknowledging it at once would lose them if the collector died before
    they were written. `when_written` waits for everything handed over before it."""
    from datetime import datetime, timezone

    from sensorfleet.collectors.base import CollectorSink
    from sensorfleet.metrics import FleetMetrics
    from sensorfleet.reading import Reading

    sink = CollectorSink("bp", "mqtt", str(small_disk / "data"), FleetMetrics("bp", "mqtt", "collector"), redelivered=True)
    sink.start_storage_thread()
    now = datetime.now(timezone.utc)
    readings = [Reading("bp", "mqtt", "d-1", "temperature", 20.0 + i, "degC", now, i, "good", None) for i in range(100)]
    filler = fill(small_disk)
    assert sum(sink.accept(r, now) for r in readings) == 100
    written: list[str] = []
    sink.flush(on_written=lambda: written.append("first copies"))
    assert sum(sink.accept(r, now) for r in readings) == 0 and sink.pending() == 0  # all duplicates
    sink.flush(on_written=lambda: written.append("duplicates"))
    wait_until(lambda: sink.storage is not None and sink.storage.health.degraded, 10, message="the write failing")
    time.sleep(1.0)
    assert written == [], "nothing may be acknowledged while its readings are not written"
    filler.unlink()
    wait_until(lambda: len(written) == 2, 30, message="both acknowledged once written")
    assert written == ["first copies", "duplicates"]
    assert len(read_dataset(str(small_disk / "data"), columns=["seq"])) == 100
    assert sink.close() == 0
