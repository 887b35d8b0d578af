"""Sparkplug B vs JSON (issue 13): readings/s stored with zero loss and bytes per reading, the
two payload formats measured in the same run on the same machine.

1. Bytes: the encoders' messages for the same TickBlocks (100 devices x 20 ticks, default sensors):
   payload bytes per reading, and payload + topic (what a PUBLISH carries beyond its fixed header).
2. Throughput: one simulator + one collector through Mosquitto at QoS 1 (bench_mqtt's harness),
   perDevice JSON and sparkplugB at the same offered loads; a format stops at its first loss.

Run: `PYTHONPATH=. python bench/bench_sparkplug.py [--quick]`; writes bench/results/sparkplug.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.bench_mqtt import RESULTS, fleet_file, machine, sensorfleet_throughput
from sensorfleet.signals import SignalModel
from sensorfleet.simulators.mqtt import PayloadEncoder
from sensorfleet.simulators.sparkplug import SparkplugEncoder
from sensorfleet.spec import load_fleet

console = Console()


def bytes_per_reading(workdir: Path) -> dict:
    fleet = load_fleet(fleet_file(workdir, 100, 1.0))
    model = SignalModel(fleet.spec, fleet.name, "mqtt")
    devices = np.arange(100, dtype=np.int64)
    start = model.current_tick(devices, 1_780_000_000.0)
    json_encoder = PayloadEncoder(model, "sensorfleet", "perDevice")
    spb_encoder = SparkplugEncoder(model, "sim-0", devices)
    out: dict[str, dict] = {}
    for name, encoder in (("json", json_encoder), ("sparkplugB", spb_encoder)):
        messages = [m for k in range(20) for m in encoder.messages(model.block(devices, start + k))]
        readings = sum(count for _, _, count in messages)
        payload = sum(len(p) for _, p, _ in messages)
        topic = sum(len(t.encode()) + 2 for t, _, _ in messages)  # + the topic's length prefix
        out[name] = {"messages": len(messages), "readings": readings, "payload_bytes_per_reading": round(payload / readings, 1), "payload_and_topic_bytes_per_reading": round((payload + topic) / readings, 1)}
    out["ratio_sparkplug_vs_json_payload"] = round(out["sparkplugB"]["payload_bytes_per_reading"] / out["json"]["payload_bytes_per_reading"], 3)
    out["ratio_sparkplug_vs_json_payload_and_topic"] = round(out["sparkplugB"]["payload_and_topic_bytes_per_reading"] / out["json"]["payload_and_topic_bytes_per_reading"], 3)
    out["note"] = "sparkplugB counts DBIRTH on each device's first tick (then DDATA), as on the wire"
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the benchmark itself")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sf-bench-spb-"))
    sizes = bytes_per_reading(workdir)
    console.print(f"bytes: {sizes}")
    steps = [500] if args.quick else [1500, 3000, 4500]
    seconds = 5 if args.quick else 15
    throughput: dict[str, list[dict]] = {"json": [], "sparkplugB": []}
    for devices in steps:
        for fmt in ("json", "sparkplugB"):  # interleaved: both formats see the same machine load
            if throughput[fmt] and not throughput[fmt][-1]["zero_loss"]:
                continue
            (workdir / fmt).mkdir(exist_ok=True)
            with console.status(f"throughput: {fmt}, {devices} devices every 0.25 s"):
                result = sensorfleet_throughput(workdir / fmt, devices, 0.25, seconds, "perDevice", payloadFormat=fmt)
            result["payload_format"] = fmt
            console.print(f"throughput: {result}")
            throughput[fmt].append(result)
    best = {fmt: max((r for r in rs if r["zero_loss"]), key=lambda r: r["stored_readings_per_s"], default=None) for fmt, rs in throughput.items()}
    headline = {
        "json_stored_readings_per_s_zero_loss": best["json"] and best["json"]["stored_readings_per_s"],
        "sparkplug_stored_readings_per_s_zero_loss": best["sparkplugB"] and best["sparkplugB"]["stored_readings_per_s"],
        "ratio_sparkplug_vs_json_readings_per_s": best["json"] and best["sparkplugB"] and round(best["sparkplugB"]["stored_readings_per_s"] / best["json"]["stored_readings_per_s"], 3),
        "json_payload_bytes_per_reading": sizes["json"]["payload_bytes_per_reading"],
        "sparkplug_payload_bytes_per_reading": sizes["sparkplugB"]["payload_bytes_per_reading"],
        "ratio_sparkplug_vs_json_bytes": sizes["ratio_sparkplug_vs_json_payload"],
        "load_average_1m_end": round(os.getloadavg()[0], 2),
    }
    summary = {"machine": machine(), "bytes": sizes, "throughput": throughput, "headline": headline}
    (RESULTS / "sparkplug.json").write_text(json.dumps(summary, indent=2))
    table = Table(title=f"Sparkplug B vs JSON ({machine()['cpus']} cores, load {headline['load_average_1m_end']})")
    table.add_column("measure")
    table.add_column("JSON", justify="right")
    table.add_column("Sparkplug B", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("payload bytes / reading", str(sizes["json"]["payload_bytes_per_reading"]), str(sizes["sparkplugB"]["payload_bytes_per_reading"]), str(sizes["ratio_sparkplug_vs_json_payload"]))
    table.add_row("payload + topic bytes / reading", str(sizes["json"]["payload_and_topic_bytes_per_reading"]), str(sizes["sparkplugB"]["payload_and_topic_bytes_per_reading"]), str(sizes["ratio_sparkplug_vs_json_payload_and_topic"]))
    table.add_row("stored readings/s, zero loss", f"{headline['json_stored_readings_per_s_zero_loss'] or 0:,}", f"{headline['sparkplug_stored_readings_per_s_zero_loss'] or 0:,}", str(headline["ratio_sparkplug_vs_json_readings_per_s"]))
    console.print(table)
    return summary


if __name__ == "__main__":
    main()
