"""connectionPerDevice (issue 13 part 3): N concurrent device connections, each its own MQTT client
publishing at 1 msg/s at QoS 1, through Mosquitto into one collector — zero loss, connect rate
achieved, simulator and broker RSS. Target: 10,000 connections, connect rate >= 1,000/s.

The harness is bench_mqtt's (`sensorfleet_throughput`: one simulator process, one collector, a
real Mosquitto); the connect rate is the simulator's own line "all N device connections up in
X s (Y connections/s)", timed from the first attempt to the last CONNACK.

Run: `PYTHONPATH=. python bench/bench_connections.py [--quick]`; writes bench/results/connections.json.
The machine is shared: the load average before and after is part of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

from rich.console import Console

from bench.bench_mqtt import RESULTS, machine, sensorfleet_throughput

console = Console()
RAMP = re.compile(r"all (\d+) device connections up in ([\d.]+) s \((\d+) connections/s")


def connections_run(workdir: Path, devices: int, seconds: float, connect_rate: float) -> dict:
    result = sensorfleet_throughput(workdir, devices, 1.0, seconds, "perDevice", connectionPerDevice=True, connectRate=connect_rate)
    log = next(workdir.glob(f"tp-perDevice-{devices}-1.0/simulate-mqtt-*.log")).read_text()
    ramp = RAMP.search(log)
    result["connect_rate_setting_per_s"] = connect_rate
    result["connections_up"] = int(ramp[1]) if ramp else 0
    result["ramp_s"] = float(ramp[2]) if ramp else None
    result["connect_rate_achieved_per_s"] = int(ramp[3]) if ramp else 0
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1,000 connections for 20 s, to check the benchmark itself")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sf-bench-conn-"))
    devices, seconds, rate = (1_000, 20, 2_000) if args.quick else (10_000, 60, 2_000)
    with console.status(f"{devices:,} device connections at 1 msg/s for {seconds} s (connectRate {rate:,}/s)"):
        run = connections_run(workdir, devices, seconds, rate)
    console.print(run)
    headline = {
        "device_connections": run["connections_up"],
        "connect_rate_achieved_per_s": run["connect_rate_achieved_per_s"],
        "zero_loss": run["zero_loss"],
        "published": run["published"], "stored": run["stored"], "lost": run["lost"],
        # A simulator that gets less CPU than the offered load needs publishes every tick late (never
        # skips one): offered vs published messages/s and the lag say whether 1 msg/s was held.
        "offered_messages_per_s": devices,
        "published_messages_per_s": run["messages_per_s"],
        "max_simulator_lag_s": run["max_simulator_lag_s"],
        "simulator_peak_rss_mib": run["peak_rss_mib"]["simulator"],
        "broker_peak_rss_mib": run["peak_rss_mib"]["broker"],
        "simulator_cores_used": run["cores_used"]["simulator"],
        "load_average_1m": run["load_average_1m"],
        "quick": args.quick,
    }
    summary = {"machine": machine(), "run": run, "headline": headline}
    (RESULTS / ("connections-quick.json" if args.quick else "connections.json")).write_text(json.dumps(summary, indent=2))
    console.print(f"headline: {headline} (load average now {os.getloadavg()[0]:.2f}; the machine is shared)")
    return summary


if __name__ == "__main__":
    main()
