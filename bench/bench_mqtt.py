"""MQTT end-to-end benchmark (issue 2): SensorFleet through Mosquitto at QoS 1 against Mosquitto's
own C clients measured in the same run.

1. Reference: `mosquitto_pub -l -q 1` -> mosquitto -> `mosquitto_sub -q 1`, the same payloads.
2. Throughput: one simulator + one collector process, QoS 1, readings/s stored with zero loss.
3. Capacity: `sensorfleet run` with N devices at 1 Hz for each N; sustained = nothing lost, nothing
   left behind, simulator lag under 2 s; peak RSS of the whole process tree.

Run: `python bench/bench_mqtt.py [--quick]`; writes bench/results/mqtt.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml
from rich.console import Console
from rich.table import Table

from sensorfleet.runner import scrape
from sensorfleet.testing import component, mosquitto_broker, wait_until

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"
console = Console()


def machine() -> dict:
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(), "platform": platform.platform()}


def fleet_file(workdir: Path, devices: int, interval: float, **mqtt) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["protocols"]["coap"]["enabled"] = False
    doc["spec"]["protocols"]["opcua"]["enabled"] = False
    doc["spec"]["protocols"]["mqtt"].update(devices=devices, interval=interval, qos=1, **mqtt)
    doc["spec"]["broker"]["port"] = 0
    doc["spec"]["collector"].update(batchSize=20000, flushInterval=1.0)
    path = workdir / f"fleet-{devices}-{interval}-{mqtt.get('messageMode', 'perDevice')}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def reference_mosquitto_clients(workdir: Path, messages: int, payload: bytes) -> dict:
    """Mosquitto's own C clients at QoS 1, the same payloads: messages/s delivered end to end.

    `mosquitto_pub -l` drops what is still in flight when its stdin ends, so stdin stays open until
    `mosquitto_sub` has received every message (or stalls for 5 s): the rate is over all of them.
    A file on stdin (the first version) lost up to two thirds of the messages at EOF, and the rate
    over the survivors varied from 13.7k to 18.9k msg/s between runs."""
    with mosquitto_broker(workdir / "ref-broker") as broker:
        received = workdir / "received.txt"
        with open(received, "wb") as sink:
            sub = subprocess.Popen(["mosquitto_sub", "-p", str(broker.port), "-h", "127.0.0.1", "-q", "1", "-t", "bench/#"], stdout=sink)
            time.sleep(0.5)
            started = time.perf_counter()
            pub = subprocess.Popen(["mosquitto_pub", "-p", str(broker.port), "-h", "127.0.0.1", "-q", "1", "-t", "bench/ref", "-l"], stdin=subprocess.PIPE)
            pub.stdin.write((payload + b"\n") * messages)
            pub.stdin.flush()
            count, last_change = 0, time.perf_counter()
            while count < messages and time.perf_counter() - last_change < 5.0:
                time.sleep(0.02)
                now_count = received.read_bytes().count(b"\n")
                if now_count != count:
                    count, last_change = now_count, time.perf_counter()
            pub.stdin.close()
            pub.wait(10)
            sub.terminate()
            sub.wait(10)
        elapsed = last_change - started
        # Sequential publishing (each QoS 1 publish acknowledged before the next): a lower bound.
        n_seq = min(messages, 20_000)
        seq_started = time.perf_counter()
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-h", "127.0.0.1", "-q", "1", "-t", "bench/seq", "-m", payload.decode(), "--repeat", str(n_seq), "--repeat-delay", "0"], check=True)
        seq_elapsed = time.perf_counter() - seq_started
    return {
        "streamed_messages_offered": messages, "received": count, "seconds": round(elapsed, 2), "messages_per_s": round(count / elapsed),
        "sequential_publish_messages_per_s": round(n_seq / seq_elapsed), "payload_bytes": len(payload), "readings_per_message": 3,
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }


def sensorfleet_throughput(workdir: Path, devices: int, interval: float, seconds: float, mode: str, **mqtt) -> dict:
    """One simulator + one collector, QoS 1; `mqtt`: more fields of spec.protocols.mqtt (bench_sparkplug)."""
    fleet = fleet_file(workdir, devices, interval, messageMode=mode, **mqtt)
    workdir = workdir / f"tp-{mode}-{devices}-{interval}"
    workdir.mkdir()
    with mosquitto_broker(workdir / "tp-broker") as broker:
        collector = component("collect", "mqtt", fleet, workdir, "--data", str(workdir / "tp-data"), "--broker", broker.url, "--client-id", "bench").start()
        wait_until(lambda: collector.metric("sensorfleet_connected") == 1, 20, message="collector connected")
        simulator = component("simulate", "mqtt", fleet, workdir, "--broker", broker.url, "--duration", str(seconds)).start()
        load_before = os.getloadavg()
        processes = {"simulator": psutil.Process(simulator.process.pid), "collector": psutil.Process(collector.process.pid), "broker": psutil.Process(broker.process.pid)}
        cpu_before = {k: sum(p.cpu_times()[:2]) for k, p in processes.items()}
        peak_rss = dict.fromkeys(processes, 0)
        cpu_used = dict.fromkeys(processes, 0.0)
        started = time.monotonic()
        lag, dropped = 0.0, 0.0
        while simulator.process.poll() is None:
            samples = scrape(simulator.metrics_port) or {}
            lag = max(lag, samples.get("sensorfleet_simulator_lag_seconds", 0.0))
            # Readings the simulator could not queue (broker slower than the offered load): counted, not hidden.
            dropped = max(dropped, samples.get("sensorfleet_readings_dropped_total", 0.0))
            for name, process in processes.items():
                try:
                    peak_rss[name] = max(peak_rss[name], process.memory_info().rss)
                    cpu_used[name] = sum(process.cpu_times()[:2]) - cpu_before[name]
                except psutil.Error:
                    pass
            time.sleep(0.5)
        wall = time.monotonic() - started
        published = int(simulator.log().split("published ")[1].split(" readings")[0])
        drained_at = time.monotonic()
        try:
            wait_until(lambda: collector.metric("sensorfleet_readings_stored_total") >= published, 120, message="collector drained")
        except AssertionError:
            pass
        drain = time.monotonic() - drained_at
        # CPU until the collector drained: per-core efficiency, whatever share of the machine each got.
        cpu_total = dict(cpu_used)
        for name, process in processes.items():
            try:
                cpu_total[name] = sum(process.cpu_times()[:2]) - cpu_before[name]
            except psutil.Error:
                pass
        stored = collector.metric("sensorfleet_readings_stored_total")
        # Reordered deliveries are first counted lost, then late: lost for good = lost - late.
        lost = collector.metric("sensorfleet_readings_lost_total") - collector.metric("sensorfleet_readings_late_total")
        late = collector.metric("sensorfleet_readings_late_total")
        collector.stop()
    offered = devices * 3 / interval
    readings_per_message = 3 if mode == "perDevice" else 500
    return {
        "mode": mode, "devices": devices, "interval_s": interval, "offered_readings_per_s": round(offered), "seconds": seconds,
        "published": published, "dropped_by_simulator": int(dropped), "stored": int(stored), "lost": int(lost), "reordered": int(late), "max_simulator_lag_s": round(lag, 2), "drain_s": round(drain, 2),
        "stored_readings_per_s": round(stored / (seconds + drain)),
        # Cores each process used while the simulator ran (CPU seconds / wall seconds), and peak RSS.
        "cores_used": {name: round(cpu / wall, 2) for name, cpu in cpu_used.items()},
        "peak_rss_mib": {name: round(rss / 2**20) for name, rss in peak_rss.items()},
        # Messages each process handled per CPU second it used (the simulator while publishing; the
        # collector and the broker until the collector drained): what one core would carry.
        "messages_per_cpu_second": {
            "simulator": round(published / readings_per_message / max(cpu_used["simulator"], 1e-3)),
            "collector": round(stored / readings_per_message / max(cpu_total["collector"], 1e-3)),
            "broker": round(stored / readings_per_message / max(cpu_total["broker"], 1e-3)),
        },
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "messages_per_s": round(published / readings_per_message / (seconds + drain)),
        "zero_loss": stored == published and lost == 0 and dropped == 0,
    }


def capacity_run(workdir: Path, devices: int, seconds: float, mode: str = "gateway") -> dict:
    """`sensorfleet run` with `devices` at 1 Hz: sustained? peak RSS of the process tree.
    Gateway mode: one paho process publishes ~8,000 messages/s on this machine, so 10,000
    devices one message each per second do not fit one simulator beside broker and collector."""
    fleet = fleet_file(workdir, devices, 1.0, messageMode=mode)
    data, logs = workdir / f"cap-data-{devices}", workdir / f"cap-logs-{devices}"
    run = subprocess.Popen([sys.executable, "-m", "sensorfleet.cli", "run", str(fleet), "--no-live", "--duration", str(seconds), "--data", str(data), "--logs", str(logs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    root = psutil.Process(run.pid)
    peak_rss, max_lag = 0, 0.0
    while run.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        targets = logs / "prometheus-targets.json"
        if targets.exists():
            for t in json.loads(targets.read_text()):
                if t["labels"]["component"] == "simulator":
                    samples = scrape(int(t["targets"][0].split(":")[1]), timeout=0.5) or {}
                    max_lag = max(max_lag, samples.get("sensorfleet_simulator_lag_seconds", 0.0))
        time.sleep(0.5)
    output = run.stdout.read()
    tail = output.split("final summary")[-1]
    row = next((line for line in tail.splitlines() if line.strip("│ ").startswith("mqtt")), "")
    cells = [c.strip().replace(",", "") for c in row.strip("│").split("│")] if row else []
    published, stored, lost = (int(cells[i]) for i in (3, 4, 5)) if len(cells) > 5 else (0, 0, -1)  # the table's lost is net of late arrivals
    sustained = run.returncode == 0 and published > 0 and stored == published and lost == 0 and max_lag < 2.0
    return {"mode": mode, "devices": devices, "seconds": seconds, "published": published, "stored": stored, "lost": lost, "max_simulator_lag_s": round(max_lag, 2), "peak_rss_mib": round(peak_rss / 2**20), "sustained": sustained, "exit_code": run.returncode}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the benchmark itself")
    parser.add_argument("--modes", default="perDevice,gateway", help="throughput modes to run, comma-separated (the reference always runs)")
    parser.add_argument("--per-device-devices", default="1500,2500,3500,4500,5500", help="perDevice steps (devices every 0.25 s, 3 readings each)")
    parser.add_argument("--gateway-devices", default="2000,3500,5000", help="gateway steps (devices every 0.1 s, 3 readings each)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each throughput step")
    parser.add_argument("--no-capacity", action="store_true", help="skip the `sensorfleet run` capacity ladder")
    parser.add_argument("--out", type=Path, default=RESULTS / "mqtt.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sf-bench-mqtt-"))
    quick = args.quick
    payload = json.dumps([{"fleet": "bench", "protocol": "mqtt", "device": "mqtt-00001", "sensor": s, "value": 21.123456789, "unit": "degC", "ts": "2026-11-25T12:00:00.000000Z", "seq": 28771200, "quality": "good", "anomaly": None} for s in ("temperature", "humidity", "pressure")], separators=(",", ":")).encode()
    with console.status("reference: mosquitto_pub -> mosquitto -> mosquitto_sub (QoS 1)"):
        reference = reference_mosquitto_clients(workdir, 20_000 if quick else 100_000, payload)
    console.print(f"reference: {reference}")
    throughput = []
    # Offered load steps up per mode; a mode stops at its first step with a loss (the next is higher).
    cases = [("perDevice", 500, 0.1), ("gateway", 500, 0.1)] if quick else [
        *(("perDevice", int(n), 0.25) for n in args.per_device_devices.split(",")),
        *(("gateway", int(n), 0.1) for n in args.gateway_devices.split(",")),
    ]
    modes = set(args.modes.split(","))
    failed: set[str] = set()
    for mode, devices, interval in cases:
        if mode in failed or mode not in modes:
            continue
        with console.status(f"throughput: {mode}, {devices} devices every {interval} s"):
            result = sensorfleet_throughput(workdir, devices, interval, 5 if quick else args.seconds, mode)
        console.print(f"throughput: {result}")
        throughput.append(result)
        if not result["zero_loss"]:
            failed.add(mode)
    capacity = []
    for devices in [] if args.no_capacity else [1000] if quick else [5000, 10000, 15000, 20000]:
        with console.status(f"capacity: sensorfleet run with {devices} devices at 1 Hz"):
            result = capacity_run(workdir, devices, 10 if quick else 30)
        console.print(f"capacity: {result}")
        capacity.append(result)
        if not result["sustained"]:
            break
    best = max((t for t in throughput if t["zero_loss"]), key=lambda t: t["stored_readings_per_s"], default=None)
    best_per_device = max((t for t in throughput if t["zero_loss"] and t["mode"] == "perDevice"), key=lambda t: t["stored_readings_per_s"], default=None)
    best_gateway = max((t for t in throughput if t["zero_loss"] and t["mode"] == "gateway"), key=lambda t: t["stored_readings_per_s"], default=None)
    best_capacity = max((c for c in capacity if c["sustained"]), key=lambda c: c["devices"], default=None)
    summary = {
        "machine": machine(),
        "reference_mosquitto_clients": reference,
        "throughput": throughput,
        "capacity": capacity,
        "headline": {
            "stored_readings_per_s_zero_loss": best and best["stored_readings_per_s"],
            "mode": best and best["mode"],
            "per_device_stored_readings_per_s": best_per_device and best_per_device["stored_readings_per_s"],
            "per_device_messages_per_s": best_per_device and best_per_device["messages_per_s"],
            "ratio_per_device_messages_vs_mosquitto_clients": best_per_device and round(best_per_device["messages_per_s"] / reference["messages_per_s"], 3),
            "per_device_peak_rss_mib": best_per_device and best_per_device["peak_rss_mib"],
            "per_device_cores_used": best_per_device and best_per_device["cores_used"],
            "per_device_messages_per_cpu_second": best_per_device and best_per_device["messages_per_cpu_second"],
            "per_device_load_average_1m": best_per_device and best_per_device["load_average_1m"],
            "gateway_stored_readings_per_s_zero_loss": best_gateway and best_gateway["stored_readings_per_s"],
            "gateway_peak_rss_mib": best_gateway and best_gateway["peak_rss_mib"],
            "gateway_cores_used": best_gateway and best_gateway["cores_used"],
            "gateway_load_average_1m": best_gateway and best_gateway["load_average_1m"],
            "max_devices_at_1hz": best_capacity and best_capacity["devices"],
            "peak_rss_mib_at_max": best_capacity and best_capacity["peak_rss_mib"],
        },
    }
    args.out.write_text(json.dumps(summary, indent=2))
    table = Table(title=f"MQTT benchmark ({machine()['cpus']} cores)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    h = summary["headline"]
    table.add_row("mosquitto_pub→sub QoS 1 (reference)", f"{reference['messages_per_s']:,} msg/s", "")
    table.add_row(f"SensorFleet stored, zero loss ({h['mode']})", f"{h['stored_readings_per_s_zero_loss'] or 0:,} readings/s", "≥ 25,000 readings/s")
    table.add_row("SensorFleet perDevice messages", f"{h['per_device_stored_readings_per_s'] or 0:,} readings/s ({h['per_device_messages_per_s'] or 0:,} msg/s)", "")
    table.add_row("ratio (perDevice msg/s / reference msg/s)", f"{h['ratio_per_device_messages_vs_mosquitto_clients'] or 0:.2f}", "≥ 0.8")
    table.add_row("  simulator / collector peak RSS (perDevice)", " / ".join(f"{(h['per_device_peak_rss_mib'] or {}).get(k, 0)} MiB" for k in ("simulator", "collector")), "< 300 MiB each")
    table.add_row("  cores used: simulator / collector / broker", " / ".join(str((h['per_device_cores_used'] or {}).get(k, 0)) for k in ("simulator", "collector", "broker")), "")
    table.add_row("  messages per CPU second: simulator / collector / broker", " / ".join(f"{(h['per_device_messages_per_cpu_second'] or {}).get(k, 0):,}" for k in ("simulator", "collector", "broker")), "")
    table.add_row("  load average (1 min) before / after", " / ".join(str((h['per_device_load_average_1m'] or {}).get(k, 0)) for k in ("before", "after")), "")
    table.add_row("SensorFleet gateway, zero loss", f"{h['gateway_stored_readings_per_s_zero_loss'] or 0:,} readings/s", "≥ 100,000 readings/s")
    table.add_row("  collector peak RSS (gateway)", f"{(h['gateway_peak_rss_mib'] or {}).get('collector', 0)} MiB", "< 300 MiB")
    table.add_row("most devices at 1 Hz (sensorfleet run)", f"{h['max_devices_at_1hz'] or 0:,}", "≥ 10,000")
    table.add_row("peak RSS at that size", f"{h['peak_rss_mib_at_max'] or 0:,} MiB", "< 1,024 MiB")
    console.print(table)
    return summary


if __name__ == "__main__":
    main()
