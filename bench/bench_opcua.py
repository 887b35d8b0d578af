"""OPC UA benchmark (issue 3): one simulator process + one collector process on this machine.

1. Reference: a plain asyncua server (no simulator logic: one folder of Double variables written
   round-robin as fast as it can with `write_attribute_value`) and a plain asyncua client
   (`create_subscription` + `subscribe_data_change` with a handler, items added 1,000 per request):
   data changes/s delivered to the subscription.
2. Capacity: N devices x 3 sensors at 1 Hz for growing N; a step holds when, over a measuring
   window after warm-up, nothing is lost, the simulator dropped nothing and the collector received
   what was offered (>= 95 %, the window catches publishes in whole batches). Reported: values/s delivered and stored at the largest N that holds,
   and the ratio to the reference.

3. Two-way (issue 13, `--two-way N`): N devices read-only (writable false, no history) against N
   devices with setpoints, methods and 24 h of HistoryRead enabled, in the same run, with clients
   acting during the window (setpoint writes on 100 devices, InjectFault on 10, a 10-minute
   HistoryRead of 20 variables); values/s delivered and simulator CPU, and their ratio.

Run: `python bench/bench_opcua.py [--quick] [--two-way N]`; writes bench/results/opcua.json (or
opcua-two-way.json) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
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
from sensorfleet.testing import component, wait_until

RESULTS = Path(__file__).resolve().parent / "results"
SENSORS = 3
console = Console()


def fleet_file(workdir: Path, devices: int, two_way: bool = False) -> Path:
    doc = {
        "apiVersion": "sensorfleet.io/v1alpha1",
        "kind": "SensorFleet",
        "metadata": {"name": "bench"},
        "spec": {
            "protocols": {"mqtt": {"enabled": False}, "coap": {"enabled": False}, "opcua": {"enabled": True, "devices": devices, "interval": 1.0,
                                                                                           **({"writable": True, "historyHours": 24} if two_way else {"historyHours": 0})}},
            "collector": {"batchSize": 20000, "flushInterval": 1.0},
        },
    }
    path = workdir / f"opcua-{devices}{'-two-way' if two_way else ''}.yaml"
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


# --- reference ------------------------------------------------------------------------------------
async def reference_server(port: int, variables: int, seconds: float) -> None:
    """A plain asyncua server: a folder of Double variables, written round-robin in a tight loop."""
    import logging

    from asyncua import Server, ua

    logging.getLogger("asyncua").setLevel(logging.WARNING)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    ns = await server.register_namespace("urn:bench:reference")
    items = []
    folder = ua.NodeId("Reference", ns)
    for nodeid, parent, name, cls, type_def, attrs in [(folder, ua.NodeId(ua.ObjectIds.ObjectsFolder), "Reference", ua.NodeClass.Object, ua.ObjectIds.FolderType, ua.ObjectAttributes())] + [
        (ua.NodeId(f"v{i}", ns), folder, f"v{i}", ua.NodeClass.Variable, ua.ObjectIds.BaseDataVariableType, ua.VariableAttributes(Value=ua.Variant(0.0, ua.VariantType.Double), DataType=ua.NodeId(ua.ObjectIds.Double), ValueRank=-1))
        for i in range(variables)
    ]:
        item = ua.AddNodesItem(RequestedNewNodeId=nodeid, BrowseName=ua.QualifiedName(name, ns), NodeClass=cls, ParentNodeId=parent,
                               ReferenceTypeId=ua.NodeId(ua.ObjectIds.Organizes), TypeDefinition=ua.NodeId(type_def), NodeAttributes=attrs)
        items.append(item)
    await server.iserver.isession.add_nodes(items)
    nodes = [ua.NodeId(f"v{i}", ns) for i in range(variables)]
    written = 0
    async with server:
        print("READY", flush=True)
        deadline = time.monotonic() + seconds
        value = 0.0
        while time.monotonic() < deadline:
            now = dt.datetime.now(dt.timezone.utc)
            for i, node in enumerate(nodes):
                await server.write_attribute_value(node, ua.DataValue(ua.Variant(value, ua.VariantType.Double), SourceTimestamp=now, ServerTimestamp=now))
                if i % 500 == 499:
                    await asyncio.sleep(0)  # let publish requests through
            written += len(nodes)
            value += 1.0
        print(f"WRITTEN {written} {seconds}", flush=True)


async def reference_client(port: int, variables: int, warmup: float, window: float) -> dict:
    """A plain asyncua client: one subscription, a handler counting data changes."""
    from asyncua import Client, ua

    class Counter:
        n = 0

        def datachange_notification(self, node, val, data) -> None:
            Counter.n += 1

    client = Client(f"opc.tcp://127.0.0.1:{port}/", timeout=60)
    await client.connect()
    try:
        ns = await client.get_namespace_index("urn:bench:reference")
        subscription = await client.create_subscription(500, Counter())
        nodes = [client.get_node(ua.NodeId(f"v{i}", ns)) for i in range(variables)]
        for start in range(0, variables, 1000):
            await subscription.subscribe_data_change(nodes[start : start + 1000], queuesize=1)
        await asyncio.sleep(warmup)
        n0, t0 = Counter.n, time.monotonic()
        await asyncio.sleep(window)
        n1, t1 = Counter.n, time.monotonic()
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), 10)
        except Exception:  # noqa: BLE001 -- the server may have stopped first
            pass
    return {"variables": variables, "data_changes_per_s": round((n1 - n0) / (t1 - t0))}


def reference(workdir: Path, variables: int, warmup: float, window: float) -> dict:
    port = free_port()
    seconds = 120 + warmup + window
    log = workdir / "reference-server.log"
    server = subprocess.Popen([sys.executable, __file__, "--reference-server", str(port), str(variables), str(seconds)], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "READY" in log.read_text(errors="replace"), 180, message="reference server")
        result = asyncio.run(reference_client(port, variables, warmup, window))
    finally:
        server.terminate()
        server.wait(30)
    return result


# --- capacity -----------------------------------------------------------------------------------
async def act_on_devices(port: int, devices: int) -> dict:
    """What clients of a two-way simulator do: setpoint writes, fault injections, a backfill."""
    from asyncua import Client, ua

    async with Client(f"opc.tcp://127.0.0.1:{port}/", timeout=60) as client:
        ns = await client.get_namespace_index("urn:sensorfleet:bench")
        started = time.monotonic()
        for i in range(min(100, devices)):
            await client.get_node(ua.NodeId(f"opcua-{i:05d}/TemperatureSetpoint", ns)).write_value(ua.DataValue(ua.Variant(30.0, ua.VariantType.Double)))
        for i in range(min(10, devices)):
            device = client.get_node(ua.NodeId(f"opcua-{i:05d}", ns))
            await device.call_method(ua.NodeId(f"opcua-{i:05d}/InjectFault", ns), ua.Variant("level_shift", ua.VariantType.String), ua.Variant(600.0, ua.VariantType.Double))
        actions_s = time.monotonic() - started
        end = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=2)
        started = time.monotonic()
        values = 0
        for i in range(min(20, devices)):
            values += len(await client.get_node(ua.NodeId(f"opcua-{i:05d}/humidity", ns)).read_raw_history(end - dt.timedelta(minutes=10), end))
        return {"actions": min(100, devices) + min(10, devices), "actions_s": round(actions_s, 2), "history_values": values, "history_s": round(time.monotonic() - started, 2)}


def capacity_step(workdir: Path, devices: int, warmup: float, window: float, two_way: bool = False) -> dict:
    step = workdir / f"step-{devices}{'-two-way' if two_way else ''}"
    step.mkdir()
    fleet = fleet_file(step, devices, two_way)
    port = free_port()
    sim = component("simulate", "opcua", fleet, step, "--port", str(port)).start()
    col = None
    started = time.monotonic()
    try:
        wait_until(lambda: "simulator of fleet" in sim.log(), 300, message="simulator serving")
        startup = time.monotonic() - started
        col = component("collect", "opcua", fleet, step, "--data", str(step / "data"), "--target", f"opc.tcp://127.0.0.1:{port}/").start()
        wait_until(lambda: _scrape(col.metrics_port).get("sensorfleet_connected") == 1, 300, message="collector subscribed")
        time.sleep(warmup)
        c0, s0, t0 = _scrape(col.metrics_port), _scrape(sim.metrics_port), time.monotonic()
        clients = asyncio.run(act_on_devices(port, devices)) if two_way else None
        time.sleep(max(0.0, window - (time.monotonic() - t0)))
        c1, s1, t1 = _scrape(col.metrics_port), _scrape(sim.metrics_port), time.monotonic()
    finally:
        sim.stop()
        if col is not None:
            col.stop()
    figures = window_figures(devices * SENSORS, t1 - t0, (c0, c1), (s0, s1))
    return {"devices": devices, **figures, "simulator_startup_s": round(startup, 1), **({"clients": clients} if clients else {})}


def two_way_comparison(devices: int, window: float) -> int:
    """Read-only vs two-way at the same size, one after the other in one run."""
    result: dict = {"protocol": "opcua", "benchmark": "two-way", "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="bench-opcua-two-way-") as tmp:
        for name, two_way in (("read_only", False), ("two_way", True)):
            console.print(f"[bold]{name}[/bold]: {devices} devices x {SENSORS} sensors at 1 Hz")
            result[name] = capacity_step(Path(tmp), devices, warmup=5.0, window=window, two_way=two_way)
            console.print(result[name])
    a, b = result["read_only"], result["two_way"]
    result["delivered_ratio"] = round(b["received_per_s"] / a["received_per_s"], 3) if a["received_per_s"] else None
    result["simulator_cpu_ratio"] = round(b["simulator_cpu"] / a["simulator_cpu"], 3) if a["simulator_cpu"] else None
    result["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "opcua-two-way.json"
    out.write_text(json.dumps(result, indent=2))
    console.print(f"two-way / read-only: delivered {result['delivered_ratio']}, simulator CPU {result['simulator_cpu_ratio']} "
                  f"(load {result['machine']['load_average_1m']} -> {result['machine']['load_average_1m_end']}); written {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="OPC UA benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter steps")
    parser.add_argument("--two-way", type=int, metavar="DEVICES", help="compare read-only and two-way (setpoints, methods, history) at this many devices")
    parser.add_argument("--reference-server", nargs=3, metavar=("PORT", "VARIABLES", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_server:
        port, variables, seconds = args.reference_server
        asyncio.run(reference_server(int(port), int(variables), float(seconds)))
        return 0
    if args.two_way:
        return two_way_comparison(args.two_way, 10.0 if args.quick else 20.0)
    steps = [500, 1700] if args.quick else [1700, 3400, 5000, 6700, 8400]
    window = 10.0 if args.quick else 20.0
    result: dict = {"protocol": "opcua", "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="bench-opcua-") as tmp:
        workdir = Path(tmp)
        variables = 3000 if args.quick else 10200
        console.print(f"[bold]reference[/bold]: plain asyncua server writing {variables} variables, plain asyncua subscription")
        result["reference"] = reference(workdir, variables, warmup=5.0, window=window)
        console.print(result["reference"])
        result["capacity"], best = capacity_ladder(steps, lambda devices: capacity_step(workdir, devices, warmup=5.0, window=window),
                                                   lambda devices: devices * SENSORS, console)
    reference_rate = result["reference"].get("data_changes_per_s")
    result["largest_devices_at_1hz"] = best["devices"] if best else 0
    result["values_per_s_delivered"] = best["received_per_s"] if best else 0
    result["values_per_s_stored"] = best["stored_per_s"] if best else 0
    result["target_values_per_s"] = 10000
    result["ratio_to_plain_asyncua"] = round(result["values_per_s_delivered"] / reference_rate, 2) if reference_rate else None
    result["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "opcua.json"
    out.write_text(json.dumps(result, indent=2))

    table = Table(title=f"OPC UA: one simulator + one collector ({result['machine']['cpus']} cores, load {result['machine']['load_average_1m']})")
    for col in ("run", "devices", "offered/s", "delivered/s", "stored/s", "lost", "sim dropped", "holds", "sim CPU", "col CPU", "sim start s"):
        table.add_column(col)
    ref = result["reference"]
    table.add_row("plain asyncua (reference)", "-", "max", str(ref["data_changes_per_s"]), "-", "-", "-", "-", "-", "-", "-")
    for s in result["capacity"]:
        table.add_row("sensorfleet", str(s["devices"]), str(s["offered_per_s"]), str(s["received_per_s"]), str(s["stored_per_s"]), str(s["lost"]), str(s["simulator_dropped"]),
                      "yes" if s["holds"] else "no", str(s["simulator_cpu"]), str(s["collector_cpu"]), str(s["simulator_startup_s"]))
    console.print(table)
    console.print(f"largest at 1 Hz: {result['largest_devices_at_1hz']} devices = {result['values_per_s_delivered']} values/s delivered "
                  f"(target {result['target_values_per_s']}); ratio to plain asyncua: {result['ratio_to_plain_asyncua']}; written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
