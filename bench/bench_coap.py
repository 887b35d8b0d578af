"""CoAP benchmark (issue 3): one simulator process + one collector process on this machine.

1. Reference: libcoap's `coap-client` (C) observing the simulator: one client process per resource
   of 100 fast devices (300 observers, 10,000 notifications/s offered); notifications/s the
   simulator pushes to C peers.
2. Capacity: N devices x 3 sensors at 1 Hz for growing N; a step holds when, over a measuring
   window after warm-up, nothing is lost, the simulator dropped nothing and the collector stored
   what was offered (>= 95 %, the window catches publishes in whole batches). Reported: readings (= observe notifications) stored per second at
   the largest N that holds, and the ratio to the reference.

Run: `python bench/bench_coap.py [--quick]`; writes bench/results/coap.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from bench.common import capacity_ladder, machine, window_figures
from sensorfleet.runner import scrape
from sensorfleet.runtime import free_port
from sensorfleet.spec import DEFAULT_SENSORS
from sensorfleet.testing import component, wait_until

RESULTS = Path(__file__).resolve().parent / "results"
SENSORS = 3
console = Console()


def fleet_file(workdir: Path, devices: int, interval: float) -> Path:
    doc = {
        "apiVersion": "sensorfleet.io/v1alpha1",
        "kind": "SensorFleet",
        "metadata": {"name": "bench"},
        "spec": {
            "protocols": {"mqtt": {"enabled": False}, "opcua": {"enabled": False}, "coap": {"enabled": True, "devices": devices, "interval": interval}},
            "collector": {"batchSize": 20000, "flushInterval": 1.0},
        },
    }
    path = workdir / f"coap-{devices}-{interval}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _scrape(port: int) -> dict:
    """/metrics of a busy process: its HTTP thread competes for the GIL, so be patient."""
    for _ in range(10):
        samples = scrape(port, timeout=5.0)
        if samples is not None:
            return samples
        time.sleep(0.5)
    raise RuntimeError(f"metrics endpoint :{port} is not answering")


def _count_documents(text: str) -> int:
    """coap-client prints notifications back to back; count the JSON documents."""
    decoder, n, i = json.JSONDecoder(), 0, 0
    text = text.strip()
    while i < len(text):
        try:
            _, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        n += 1
        while i < len(text) and text[i].isspace():
            i += 1
    return n


def reference_coap_client(workdir: Path, devices: int, interval: float, seconds: int) -> dict:
    """`coap-client -s` observers against the simulator, one per resource (devices x 3 sensors).

    Few devices at a fast interval, so that a process per resource stays affordable; the number of
    device ticks per second (the simulator's model work per notification) matches the capacity
    steps at the same notification rate."""
    binary = shutil.which("coap-client-notls") or shutil.which("coap-client")
    if not binary:
        return {"error": "coap-client not installed (Debian libcoap3-bin)"}
    fleet = fleet_file(workdir, devices, interval)
    sensors = [s["name"] for s in DEFAULT_SENSORS]
    port = free_port(udp=True)
    sim = component("simulate", "coap", fleet, workdir, "--port", str(port)).start()
    try:
        wait_until(lambda: "simulator of fleet" in sim.log(), 60, message="simulator serving")
        targets = [f"coap://127.0.0.1:{port}/sensors/coap-{d:05d}/{s}" for d in range(devices) for s in sensors]
        outputs = [workdir / f"coap-client-{i}.out" for i in range(len(targets))]
        procs = [subprocess.Popen([binary, "-m", "get", "-s", str(seconds), "-B", str(seconds + 5), url], stdout=open(out, "wb"), stderr=subprocess.DEVNULL)
                 for url, out in zip(targets, outputs)]
        for p in procs:
            p.wait(seconds + 60)
        received = sum(_count_documents(out.read_text(errors="replace")) for out in outputs)
        samples = _scrape(sim.metrics_port)
    finally:
        sim.stop()
    offered = len(targets) / interval
    return {"clients": len(targets), "devices": devices, "interval_s": interval, "seconds": seconds, "offered_per_s": round(offered), "received": received,
            "notifications_per_s": round(received / seconds), "simulator_dropped": samples.get("sensorfleet_readings_dropped_total", 0.0)}


def capacity_step(workdir: Path, devices: int, warmup: float, window: float) -> dict:
    """N devices at 1 Hz through one simulator and one collector: does it hold?"""
    step = workdir / f"step-{devices}"
    step.mkdir()
    fleet = fleet_file(step, devices, 1.0)
    port = free_port(udp=True)
    sim = component("simulate", "coap", fleet, step, "--port", str(port)).start()
    col = None
    try:
        wait_until(lambda: "simulator of fleet" in sim.log(), 120, message="simulator serving")
        col = component("collect", "coap", fleet, step, "--data", str(step / "data"), "--target", f"coap://127.0.0.1:{port}").start()
        wait_until(lambda: _scrape(col.metrics_port).get("sensorfleet_connected") == 1, 120, message="collector observing everything")
        time.sleep(warmup)
        c0, s0, t0 = _scrape(col.metrics_port), _scrape(sim.metrics_port), time.monotonic()
        time.sleep(window)
        c1, s1, t1 = _scrape(col.metrics_port), _scrape(sim.metrics_port), time.monotonic()
    finally:
        sim.stop()
        if col is not None:
            time.sleep(1.0)
            col.stop()
    figures = window_figures(devices * SENSORS, t1 - t0, (c0, c1), (s0, s1))
    return {"devices": devices, **figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CoAP benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter steps")
    args = parser.parse_args(argv)
    steps = [500, 1700] if args.quick else [1000, 1700, 2100, 2500, 3400]
    window = 10.0 if args.quick else 20.0
    result: dict = {"protocol": "coap", "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="bench-coap-") as tmp:
        workdir = Path(tmp)
        console.print("[bold]reference[/bold]: coap-client observers against the simulator")
        result["reference"] = reference_coap_client(workdir, devices=100, interval=0.03, seconds=10)
        console.print(result["reference"])
        result["capacity"], best = capacity_ladder(steps, lambda devices: capacity_step(workdir, devices, warmup=5.0, window=window),
                                                   lambda devices: devices * SENSORS, console)
    reference_rate = result["reference"].get("notifications_per_s")
    result["largest_devices_at_1hz"] = best["devices"] if best else 0
    result["readings_per_s_stored"] = best["stored_per_s"] if best else 0
    result["notifications_per_s"] = best["received_per_s"] if best else 0
    result["target_notifications_per_s"] = 5000
    result["ratio_to_coap_client"] = round(result["notifications_per_s"] / reference_rate, 2) if reference_rate else None
    result["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "coap.json"
    out.write_text(json.dumps(result, indent=2))

    table = Table(title=f"CoAP: one simulator + one collector ({result['machine']['cpus']} cores, load {result['machine']['load_average_1m']})")
    for col in ("run", "devices", "offered/s", "received/s", "stored/s", "lost", "sim dropped", "holds", "sim CPU", "col CPU"):
        table.add_column(col)
    ref = result["reference"]
    if "error" not in ref:
        table.add_row("coap-client x%d (reference)" % ref["clients"], str(ref["clients"]), str(ref["offered_per_s"]), str(ref["notifications_per_s"]), "-", "-", str(int(ref["simulator_dropped"])), "-", "-", "-")
    for s in result["capacity"]:
        table.add_row("sensorfleet", str(s["devices"]), str(s["offered_per_s"]), str(s["received_per_s"]), str(s["stored_per_s"]), str(s["lost"]), str(s["simulator_dropped"]),
                      "yes" if s["holds"] else "no", str(s["simulator_cpu"]), str(s["collector_cpu"]))
    console.print(table)
    console.print(f"largest at 1 Hz: {result['largest_devices_at_1hz']} devices = {result['notifications_per_s']} notifications/s "
                  f"(target {result['target_notifications_per_s']}); ratio to coap-client reference: {result['ratio_to_coap_client']}; written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
