"""`sensorfleet run`: a whole fleet as local processes — broker, collectors, simulators.

Each child runs the same `sensorfleet <subcommand>` a pod runs. The children live in their own
session, so Ctrl-C reaches only this runner, which then stops them in an order that loses nothing:
simulators first (they drain their in-flight messages), collectors once they have received what
was published (they flush on SIGTERM), the broker last. The live table is read from the
children's own /metrics endpoints — the numbers Prometheus would scrape.

What starts, with which arguments and in which order, is decided first by run_plan.py.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from sensorfleet.broker import find_mosquitto
from sensorfleet.run_plan import ChildSpec, FleetRunError, Plan, plan_run, source_row
from sensorfleet.run_summary import ProtocolCounts, ProtocolSummary, child_summary, summarize, summary_document
from sensorfleet.runtime import parse_broker_url
from sensorfleet.spec import SensorFleet

STARTUP_TIMEOUT = 30.0
# An OPC UA simulator builds its address space before it listens: about 1 ms per node here
# (6,700 devices x 3 sensors took 40 s), so its start-up allowance grows with the fleet.
STARTUP_SECONDS_PER_OPCUA_NODE = 0.003


def startup_timeout(spec: ChildSpec, fleet: SensorFleet) -> float:
    if spec.protocol == "opcua" and spec.role == "simulator":
        p = fleet.spec.protocols.opcua
        nodes = (p.devices // p.replicas + 1) * (len(fleet.spec.sensors) + 1)
        return STARTUP_TIMEOUT + nodes * STARTUP_SECONDS_PER_OPCUA_NODE
    return STARTUP_TIMEOUT
DRAIN_TIMEOUT = 20.0


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _set_pdeathsig() -> None:
    """Children die with the runner even if it is killed without a chance to clean up."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def scrape(port: int, timeout: float = 1.0) -> dict[str, float] | None:
    """Sum every sample by name (and name{le} for histogram buckets) from one /metrics endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
            text = response.read().decode()
    except OSError:
        return None
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + (f"{{le={sample.labels['le']}}}" if "le" in sample.labels else "")
            totals[key] += sample.value
            if "reason" in sample.labels:
                totals[f"{sample.name}{{reason={sample.labels['reason']}}}"] += sample.value
    return totals


def quantile_from_buckets(samples: dict[str, float], name: str, q: float) -> float | None:
    buckets = sorted((float(k.split("le=")[1].rstrip("}")), v) for k, v in samples.items() if k.startswith(name + "_bucket{"))
    if not buckets or buckets[-1][1] == 0:
        return None
    target = q * buckets[-1][1]
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= target:
            if bound == float("inf"):
                return previous_bound
            fraction = (target - previous_count) / (count - previous_count) if count > previous_count else 1.0
            return previous_bound + (bound - previous_bound) * fraction
        previous_bound, previous_count = bound, count
    return None


@dataclass
class ProtocolRow:
    devices: float = 0
    published: float = 0
    received: float = 0
    stored: float = 0
    lost: float = 0
    duplicates: float = 0
    malformed: float = 0
    late: float = 0
    offline: float = 0
    malformed_by_reason: dict[str, float] = field(default_factory=dict)
    rate: float = 0.0
    p50: float | None = None
    p99: float | None = None


class FleetRun:
    def __init__(self, fleet: SensorFleet, plan: Plan, log_dir: Path, console: Console):
        self.fleet = fleet
        self.plan = plan
        self.log_dir = log_dir
        self.console = console
        self.children: list[Child] = []
        self.rows: dict[str, ProtocolRow] = {p: ProtocolRow() for p in fleet.spec.enabled_protocols()}
        self.rows.update({source_row(s.name): ProtocolRow() for s in fleet.spec.sources.all()})
        self._last_stored: dict[str, tuple[float, float]] = {}
        # Last scrape of every child: a child that has exited still counts in the totals.
        self._samples: dict[str, dict[str, float]] = {}
        self.run_log = open(log_dir / "sensorfleet-run.log", "a", buffering=1)

    def log(self, message: str) -> None:
        self.run_log.write(f"{datetime.now().isoformat(timespec='seconds')} {message}\n")

    # --- start ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self.plan.mosquitto_conf:
            (self.log_dir / "broker").mkdir(exist_ok=True)
            (self.log_dir / "mosquitto.conf").write_text(self.plan.mosquitto_conf)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for spec in self.plan.children:
            if spec.metrics_port_file:  # a previous run with the same --logs folder left it
                spec.metrics_port_file.unlink(missing_ok=True)
            self._wait_ready(self._spawn(spec, env))

    def _spawn(self, spec: ChildSpec, env: dict[str, str]) -> Child:
        log_path = self.log_dir / f"{spec.name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(spec.argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, preexec_fn=_set_pdeathsig)
        child = Child(spec, process, log_path)
        self.children.append(child)
        self.log(f"started {spec.name} (pid {process.pid}): {' '.join(spec.argv)}")
        return child

    def _wait_ready(self, child: Child) -> None:
        timeout = startup_timeout(child.spec, self.fleet)
        deadline = time.monotonic() + timeout
        import socket

        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise FleetRunError(f"{child.spec.name} exited with code {child.process.returncode} at start-up; its last log lines ({child.log_path}):\n{child.tail()}")
            ready = True
            if child.spec.ready_port:
                with socket.socket() as s:
                    s.settimeout(0.5)
                    ready = s.connect_ex(("127.0.0.1", child.spec.ready_port)) == 0
            if ready and child.spec.metrics_port_file and not child.spec.metrics_port:
                ready = self._read_metrics_port(child)
            if ready and child.spec.metrics_port:
                ready = scrape(child.spec.metrics_port) is not None
            if ready:
                return
            time.sleep(0.1)
        raise FleetRunError(f"{child.spec.name} did not become ready within {timeout:.0f} s; its last log lines ({child.log_path}):\n{child.tail()}")

    @staticmethod
    def _read_metrics_port(child: Child) -> bool:
        assert child.spec.metrics_port_file is not None
        try:
            child.spec.metrics_port = int(child.spec.metrics_port_file.read_text())
        except FileNotFoundError:  # not listening yet (the file is renamed into place whole)
            return False
        return True

    # --- watch ----------------------------------------------------------------------------------
    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def refresh(self) -> None:
        fresh = {p: ProtocolRow() for p in self.rows}
        latency: dict[str, dict[str, float]] = {p: defaultdict(float) for p in self.rows}
        now = time.monotonic()
        for child in self.children:
            if not child.spec.metrics_port or child.spec.row not in fresh:
                continue
            samples = scrape(child.spec.metrics_port) if child.process.poll() is None else None
            if samples is not None:
                self._samples[child.spec.name] = samples
            samples = self._samples.get(child.spec.name)
            if samples is None:
                continue
            row = fresh[child.spec.row]
            if child.spec.role == "simulator":
                row.devices += samples.get("sensorfleet_simulated_devices", 0)
                row.published += samples.get("sensorfleet_readings_published_total", 0)
            else:
                row.received += samples.get("sensorfleet_readings_received_total", 0)
                row.stored += samples.get("sensorfleet_readings_stored_total", 0)
                row.lost += samples.get("sensorfleet_readings_lost_total", 0) - samples.get("sensorfleet_readings_late_total", 0)
                row.duplicates += samples.get("sensorfleet_readings_duplicate_total", 0)
                row.malformed += samples.get("sensorfleet_payloads_malformed_total", 0)
                row.late += samples.get("sensorfleet_readings_late_total", 0)
                row.offline += samples.get("sensorfleet_readings_offline_total", 0)
                for key, value in samples.items():
                    if key.startswith("sensorfleet_payloads_malformed_total{reason="):
                        reason = key.split("reason=", 1)[1].rstrip("}")
                        row.malformed_by_reason[reason] = row.malformed_by_reason.get(reason, 0) + value
                for key, value in samples.items():
                    if key.startswith("sensorfleet_reading_latency_seconds_bucket"):
                        latency[child.spec.row][key] += value
        for protocol, row in fresh.items():
            previous = self._last_stored.get(protocol)
            if previous and now > previous[0]:
                row.rate = max(0.0, (row.stored - previous[1]) / (now - previous[0]))
            else:
                row.rate = self.rows[protocol].rate
            if not previous or now - previous[0] >= 2.0:
                self._last_stored[protocol] = (now, row.stored)
            row.p50 = quantile_from_buckets(latency[protocol], "sensorfleet_reading_latency_seconds", 0.5)
            row.p99 = quantile_from_buckets(latency[protocol], "sensorfleet_reading_latency_seconds", 0.99)
        self.rows = fresh

    def table(self, title: str) -> Table:
        table = Table(title=title, title_justify="left")
        for column in ("protocol", "devices", "stored/s", "published", "stored", "lost", "dups", "malformed", "p50", "p99"):
            table.add_column(column, justify="left" if column == "protocol" else "right")
        for protocol, r in self.rows.items():
            ms = lambda v: "-" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
            table.add_row(protocol, f"{r.devices:.0f}", f"{r.rate:,.0f}", f"{r.published:,.0f}", f"{r.stored:,.0f}", f"{r.lost:,.0f}", f"{r.duplicates:,.0f}", f"{r.malformed:,.0f}", ms(r.p50), ms(r.p99))
        return table

    # --- stop -----------------------------------------------------------------------------------
    def _terminate(self, role: str, timeout: float) -> None:
        group = [c for c in self.children if c.spec.role == role and c.process.poll() is None]
        for child in group:
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in group:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"{child.spec.name} did not stop within {timeout:.0f} s; killing it")
                child.process.kill()
                child.process.wait()
            self.log(f"{child.spec.name} exited with code {child.process.returncode}")

    def pause_simulators(self, timeout: float = 10.0) -> None:
        """MQTT simulators pause on SIGUSR1 and stay up until their queue is empty, so the
        last scrape holds their final published count."""
        paused = [c for c in self.children if c.spec.role == "simulator" and c.spec.protocol == "mqtt" and c.process.poll() is None]
        for child in paused:
            child.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        time.sleep(0.2)
        while paused and time.monotonic() < deadline:
            queues = [scrape(c.spec.metrics_port) or {} for c in paused]
            if all(q.get("sensorfleet_publish_queue_messages", 0) == 0 for q in queues):
                break
            time.sleep(0.2)
        self.refresh()

    def stop(self) -> None:
        self.pause_simulators()
        self._terminate("simulator", 15.0)
        # Let collectors receive everything published before they flush and exit.
        # Server protocols (CoAP, OPC UA) count readings made before a collector subscribed as
        # published, so "received >= published" may never hold: also stop once nothing arrives.
        deadline = time.monotonic() + DRAIN_TIMEOUT
        last_received, quiet_since = None, time.monotonic()
        while time.monotonic() < deadline:
            self.refresh()
            if all(r.received + 0.5 >= r.published for r in self.rows.values()):
                break
            received = tuple(r.received for r in self.rows.values())
            if received != last_received:
                last_received, quiet_since = received, time.monotonic()
            elif time.monotonic() - quiet_since >= 3.0:
                break
            if any(c.process.poll() is not None for c in self.children if c.spec.role == "collector"):
                break
            time.sleep(0.5)
        # Then until they have written it (a batch waits at most flushInterval), so the last
        # scrape below is the run's final count.
        deadline = time.monotonic() + self.fleet.spec.collector.flush_interval + 5.0
        while time.monotonic() < deadline:
            self.refresh()
            if all(r.stored + r.duplicates >= r.received for r in self.rows.values()):
                break
            time.sleep(0.25)
        self._terminate("collector", 15.0)
        self._terminate("broker", 10.0)
        self.run_log.close()

    def final_counts(self) -> dict[str, ProtocolCounts]:
        """The run's counts per protocol: each child's own final SUMMARY line where it logged one
        (written after its last reading), else its last scrape."""
        out: dict[str, ProtocolCounts] = {}
        for protocol, row in self.rows.items():
            counts = ProtocolCounts(row.published, row.received, row.stored, row.lost, row.late, row.duplicates, row.malformed, row.offline, dict(row.malformed_by_reason))
            for role in ("simulator", "collector"):
                children = [c for c in self.children if c.spec.row == protocol and c.spec.role == role]
                finals = [child_summary(c.log_path) for c in children]
                if not children or not all(finals):
                    continue
                if role == "simulator":
                    counts.published = sum(f.get("published", 0) for f in finals)
                    continue
                for name in ("received", "stored", "lost", "late", "duplicates", "malformed", "offline"):
                    setattr(counts, name, sum(f.get(name, 0) for f in finals))
                reasons: dict[str, float] = {}
                for f in finals:
                    for reason, n in f.get("malformed_by_reason", {}).items():
                        reasons[reason] = reasons.get(reason, 0) + n
                counts.malformed_by_reason = reasons
            out[protocol] = counts
        return out

    def collectors_healthy(self, protocol: str) -> bool:
        return all(c.process.poll() == 0 for c in self.children if c.spec.row == protocol and c.spec.role == "collector")

    def kill_all(self) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()


def run_fleet(fleet: SensorFleet, fleet_path: Path, duration: float | None = None, data_url: str | None = None, broker_url: str | None = None, log_dir: Path | None = None, live: bool = True, summary_path: Path | None = None) -> int:
    console = Console()
    data_url = data_url or fleet.spec.storage.url or str(Path("data") / fleet.name)
    log_dir = log_dir or Path("runs") / f"{fleet.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    log_dir.mkdir(parents=True, exist_ok=True)
    if broker_url:
        parse_broker_url(broker_url)  # a malformed URL fails here, with its reason
    mosquitto = find_mosquitto()
    plan = plan_run(fleet, fleet_path.resolve(), data_url, broker_url, log_dir.resolve(), mosquitto)
    run = FleetRun(fleet, plan, log_dir, console)
    # Ctrl-C (SIGINT) and SIGTERM end the watch loop; the children are stopped in order below.
    stopping = {"why": None}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["why"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        try:
            run.start()
        except FleetRunError:
            run.kill_all()
            raise
        broker_kind = next((("mosquitto" if "mosquitto" in c.argv[0] else "embedded amqtt") for c in plan.children if c.role == "broker"), "external")
        console.print(f"fleet [bold]{fleet.name}[/bold]: data → {data_url}   logs → {log_dir}")
        if plan.broker_url:
            console.print(f"broker: {plan.broker_url} ({broker_kind})")
        targets = []
        for child in run.children:
            if child.spec.metrics_port:
                console.print(f"metrics: http://127.0.0.1:{child.spec.metrics_port}/metrics  ({child.spec.name})")
                targets.append({"targets": [f"127.0.0.1:{child.spec.metrics_port}"], "labels": {"fleet": fleet.name, "component": child.spec.role, "protocol": child.spec.protocol or "", "process": child.spec.name}})
        # Prometheus file_sd targets for `prometheus --config.file` users (see docs/monitoring.md).
        (log_dir / "prometheus-targets.json").write_text(json.dumps(targets, indent=2))
        started = time.monotonic()
        title = lambda: f"fleet {fleet.name} — {time.monotonic() - started:.0f} s" + (f" of {duration:.0f} s" if duration else " (Ctrl-C to stop)")  # noqa: E731
        with Live(run.table(title()), console=console, refresh_per_second=2, transient=False, auto_refresh=False) if live else _NoLive() as view:
            last_print = 0.0
            while stopping["why"] is None and (duration is None or time.monotonic() - started < duration):
                dead = run.dead_child()
                if dead:
                    console.print(f"[red]error[/red] {dead.spec.name} exited unexpectedly with code {dead.process.returncode}; stopping the fleet. Its last log lines ({dead.log_path}):\n{dead.tail()}", highlight=False)
                    run.log(f"{dead.spec.name} died with code {dead.process.returncode}")
                    exit_code = 1
                    break
                run.refresh()
                if live:
                    view.update(run.table(title()), refresh=True)
                elif time.monotonic() - last_print >= 5:
                    console.print(run.table(title()))
                    last_print = time.monotonic()
                time.sleep(1.0)
        console.print("stopping: simulators, then collectors (flushing), then the broker …")
        run.stop()
    finally:
        run.kill_all()
        for s, handler in previous.items():
            signal.signal(s, handler)
    _print_summary(console, fleet, data_url, run, exit_code, summary_path)
    return exit_code


class _NoLive:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *_args, **_kwargs) -> None:
        pass


def _print_summary(console: Console, fleet: SensorFleet, data_url: str, run: FleetRun, exit_code: int, summary_path: Path | None) -> None:
    from sensorfleet.dataset import read_dataset

    try:
        stored = read_dataset(data_url, columns=["protocol", "fleet"])
        stored = stored[stored["fleet"] == fleet.name].groupby("protocol", observed=True).size().to_dict()
    except Exception as exc:  # the summary must not hide the run's outcome
        console.print(f"[yellow]could not read the dataset for the summary: {exc}[/yellow]")
        stored = {}
    summaries: dict[str, ProtocolSummary] = {}
    for protocol, counts in run.final_counts().items():
        summary = summaries[protocol] = summarize(protocol, counts, run.collectors_healthy(protocol))
        row = run.rows[protocol]
        row.published, row.stored, row.lost, row.duplicates, row.malformed = summary.published, summary.stored, summary.lost, summary.duplicate, summary.malformed
    console.print(run.table(f"final summary — fleet {fleet.name}"))
    for protocol, summary in summaries.items():
        for note in summary.notes:
            console.print(f"note: {protocol}: {note}", highlight=False)
    console.print("rows in the dataset (all runs): " + ", ".join(f"{p} {n:,}" for p, n in sorted(stored.items())) + f"   ({data_url})")
    if summary_path is not None:
        document = summary_document(fleet.name, exit_code, summaries, {p: int(n) for p, n in stored.items()})
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(document, indent=2) + "\n")
        console.print(f"summary written to {summary_path}")
