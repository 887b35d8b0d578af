"""What the capacity benchmarks share: the machine record, the figures of one measured window, and
the ladder of growing fleet sizes that stops at the first size that does not hold."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable

import psutil
from rich.console import Console


def machine() -> dict:
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "platform": platform.platform()}


def window_figures(offered: float, elapsed: float, collector: tuple[dict, dict], simulator: tuple[dict, dict]) -> dict:
    """Per-second rates and counts between two scrapes (before, after) of each process's metrics.

    A window holds when nothing was lost or dropped and the collector received at least 95 % of
    what was offered. Late readings are counted as lost until they arrive, so they are not loss."""
    (c0, c1), (s0, s1) = collector, simulator

    def delta(name: str, a: dict, b: dict) -> float:
        return b.get(name, 0.0) - a.get(name, 0.0)

    received = delta("sensorfleet_readings_received_total", c0, c1) / elapsed
    lost = delta("sensorfleet_readings_lost_total", c0, c1) - delta("sensorfleet_readings_late_total", c0, c1)
    dropped = delta("sensorfleet_readings_dropped_total", s0, s1)
    return {"offered_per_s": offered, "received_per_s": round(received), "stored_per_s": round(delta("sensorfleet_readings_stored_total", c0, c1) / elapsed),
            "lost": int(lost), "simulator_dropped": int(dropped), "holds": lost == 0 and dropped == 0 and received >= 0.95 * offered,
            "simulator_cpu": round(delta("process_cpu_seconds_total", s0, s1) / elapsed, 2), "collector_cpu": round(delta("process_cpu_seconds_total", c0, c1) / elapsed, 2),
            "simulator_rss_mib": round(s1.get("process_resident_memory_bytes", 0) / 2**20), "collector_rss_mib": round(c1.get("process_resident_memory_bytes", 0) / 2**20)}


def capacity_ladder(sizes: Iterable[int], run_step: Callable[[int], dict], offered: Callable[[int], float], console: Console) -> tuple[list[dict], dict | None]:
    """Runs `run_step(devices)` for each size until one does not hold; returns every step and the largest that held.

    A step that never got going (a wait timed out, a process failed) is recorded as not holding, with its error."""
    steps: list[dict] = []
    for devices in sizes:
        console.print(f"[bold]capacity[/bold]: {devices} devices at 1 Hz")
        try:
            step = run_step(devices)
        except (AssertionError, RuntimeError) as exc:
            step = {"devices": devices, "offered_per_s": offered(devices), "received_per_s": 0, "stored_per_s": 0, "lost": 0, "simulator_dropped": 0,
                    "holds": False, "error": str(exc).splitlines()[0], "simulator_cpu": "-", "collector_cpu": "-", "simulator_startup_s": "-"}
        steps.append(step)
        console.print(step)
        if not step["holds"]:
            break
    held = [s for s in steps if s["holds"]]
    return steps, max(held, key=lambda s: s["devices"]) if held else None
