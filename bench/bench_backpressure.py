"""Backpressure benchmark (issue 11): collector memory while its disk is full, by buffer bound.

One MQTT collector (real Mosquitto, gateway messages) writes to a small tmpfs this script mounts
(root needed); once it stores, the disk is filled for `--outage` seconds, then freed. Per value of
spec.storage.maxBufferedReadings: RSS before and at peak during the outage, peak buffered
readings, readings received during the outage, and whether everything published was stored (0
lost, no duplicates). The largest bound exceeds what the outage brings, so it behaves like a
collector without a bound: the same-run reference for the others.

Run: `python bench/bench_backpressure.py [--outage 15] [--bounds 3000,20000,1000000]`; writes
bench/results/backpressure.json.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "src"))

from sensorfleet.dataset import read_dataset  # noqa: E402
from sensorfleet.testing import component, mosquitto_broker, wait_until  # noqa: E402

DEVICES, SENSORS, INTERVAL = 60, 3, 0.05
RATE = DEVICES * SENSORS / INTERVAL


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def one(work: Path, bound: int, outage: float) -> dict:
    disk = work / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "sf-bench-backpressure", str(disk)], check=True)
    try:
        fleet = work / "fleet.yaml"
        fleet.write_text(yaml.safe_dump({"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": "bench"}, "spec": {
            "protocols": {"mqtt": {"enabled": True, "devices": DEVICES, "interval": INTERVAL, "messageMode": "gateway", "gatewayBatch": DEVICES * SENSORS},
                          "coap": {"enabled": False}, "opcua": {"enabled": False}},
            "collector": {"flushInterval": 0.5}, "storage": {"maxBufferedReadings": bound}}}))
        data = str(disk / "data")
        with mosquitto_broker(work / "mosquitto") as broker:
            collector = component("collect", "mqtt", fleet, work, "--data", data, "--broker", broker.url, "--client-id", "bench").start()
            simulator = None
            try:
                wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 30, message="connected")
                simulator = component("simulate", "mqtt", fleet, work, "--broker", broker.url, "--duration", str(outage + 20)).start()
                wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= 2 * RATE, 60, message="stored")
                pid = collector.process.pid  # type: ignore[union-attr]
                before = max(rss_mib(pid) for _ in range(5) if time.sleep(0.2) is None)
                filler = fill(disk)
                received0 = collector.metric("sensorfleet_readings_received_total")
                peak, buffered, deadline = before, 0.0, time.monotonic() + outage
                while time.monotonic() < deadline:
                    peak = max(peak, rss_mib(pid))
                    buffered = max(buffered, collector.metric("sensorfleet_collector_buffered_readings"))
                    time.sleep(0.25)
                received = collector.metric("sensorfleet_readings_received_total") - received0
                filler.unlink()
                simulator.wait(outage + 90)
                published = int(simulator.log().split("published ")[1].split(" readings")[0])
                wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= published, 120, message="all stored")
                lost = collector.metric("sensorfleet_readings_lost_total") - collector.metric("sensorfleet_readings_late_total")
                collector.stop()
            finally:
                for c in (simulator, collector):
                    if c is not None and c.process and c.process.poll() is None:
                        c.stop()
        df = read_dataset(data, columns=["device", "sensor", "seq"])
        return {"max_buffered_readings": bound, "rss_before_mib": round(before, 1), "rss_peak_mib": round(peak, 1),
                "rss_growth_mib": round(peak - before, 1), "peak_buffered_readings": buffered, "received_during_outage": received,
                "published": published, "stored_rows": len(df), "duplicates": int(df.duplicated(["device", "sensor", "seq"]).sum()), "lost": lost}
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outage", type=float, default=15.0, help="seconds the disk stays full")
    parser.add_argument("--bounds", default="3000,20000,1000000", help="maxBufferedReadings values; the last one is the unbounded reference")
    args = parser.parse_args()
    out: dict = {"rate_readings_per_s": RATE, "outage_s": args.outage, "load_before": os.getloadavg(), "runs": []}
    for bound in (int(b) for b in args.bounds.split(",")):
        with tempfile.TemporaryDirectory(prefix="sf-bench-bp-") as work:
            out["runs"].append(one(Path(work), bound, args.outage))
            print(json.dumps(out["runs"][-1]), flush=True)
    reference = out["runs"][-1]["rss_growth_mib"]
    for run in out["runs"]:
        run["growth_vs_unbounded"] = round(run["rss_growth_mib"] / reference, 3) if reference > 0 else None
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backpressure.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
