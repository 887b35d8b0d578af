"""`sensorfleet` — the one command. Every pod runs one of its subcommands, and so does `sensorfleet run`."""

from __future__ import annotations

import importlib
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from sensorfleet.spec import FleetSpecError, load_fleet

app = typer.Typer(
    help="Simulate, collect and forecast industrial IoT sensor data (MQTT, CoAP, OPC UA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)


class Protocol(str, Enum):
    mqtt = "mqtt"
    coap = "coap"
    opcua = "opcua"


FleetArg = Annotated[Path, typer.Option("--fleet", "-f", help="SensorFleet manifest (YAML).", show_default=False)]


def _load(path: Path):
    try:
        return load_fleet(path)
    except FleetSpecError as exc:
        for line in exc.errors:
            err.print(f"[red]error[/red] {exc.source}: {line}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def validate(fleet: Annotated[Path, typer.Argument(help="SensorFleet manifest (YAML).")]) -> None:
    """Check a fleet manifest: exit 0, or 2 with one line per error naming the field."""
    parsed = _load(fleet)
    spec = parsed.spec
    parts = []
    if spec.enabled_protocols():
        devices = ", ".join(f"{p} {spec.protocol(p).devices}" for p in spec.enabled_protocols())
        parts.append(f"{devices} devices, {len(spec.sensors)} sensors each")
    sources = spec.sources.all()
    if sources:
        parts.append(f"{len(sources)} third-party source(s): " + ", ".join(f"{spec.sources.protocol_of(s.name)} {s.name}" for s in sources))
    Console().print(f"[green]ok[/green] {fleet}: fleet [bold]{parsed.name}[/bold] ({'; '.join(parts)})", soft_wrap=True)


# TLS files of an mqtts:// broker; unset: spec.broker.tls.caFile / certFile / keyFile.
TlsCa = Annotated[Optional[str], typer.Option("--tls-ca", help="PEM CA file the broker is verified against (mqtts://); default spec.broker.tls.caFile.")]
TlsCert = Annotated[Optional[str], typer.Option("--tls-cert", help="PEM client certificate (mqtts://); default spec.broker.tls.certFile.")]
TlsKey = Annotated[Optional[str], typer.Option("--tls-key", help="PEM key of the client certificate; default spec.broker.tls.keyFile.")]


@app.command()
def simulate(
    protocol: Annotated[Protocol, typer.Argument(help="Protocol to simulate.")],
    fleet: FleetArg,
    replica: Annotated[int, typer.Option(help="Which shard of the protocol's devices this process simulates (0-based).")] = 0,
    broker: Annotated[Optional[str], typer.Option(help="MQTT broker URL (mqtt only), e.g. mqtt://127.0.0.1:1883.")] = None,
    host: Annotated[str, typer.Option(help="Address the CoAP / OPC UA server binds to.")] = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option(help="Server port (CoAP / OPC UA); default from the spec.")] = None,
    metrics_port: Annotated[int, typer.Option(help="Port of the Prometheus /metrics endpoint (0: none).")] = 0,
    metrics_host: Annotated[str, typer.Option(help="Address the metrics endpoint binds to.")] = "0.0.0.0",
    duration: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,
    metrics_port_file: Annotated[Optional[Path], typer.Option(help="Write the metrics port to this file once it listens; with --metrics-port 0 a free port is picked (what `sensorfleet run` uses).")] = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
) -> None:
    """Run one simulator process (what a simulator pod runs)."""
    from sensorfleet.runtime import SimulatorOptions, setup_logging

    setup_logging()
    parsed = _load(fleet)
    spec = parsed.spec.protocol(protocol.value)
    if not 0 <= replica < spec.replicas:
        err.print(f"[red]error[/red] --replica {replica}: spec.protocols.{protocol.value}.replicas is {spec.replicas}, so the replica must be 0..{spec.replicas - 1}")
        raise typer.Exit(2)
    opts = SimulatorOptions(parsed, replica, broker, host, port, metrics_port, metrics_host, duration, metrics_port_file=str(metrics_port_file) if metrics_port_file else None, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    module = importlib.import_module(f"sensorfleet.simulators.{protocol.value}")
    raise typer.Exit(_guarded(module.run, opts))


@app.command()
def collect(
    protocol: Annotated[Protocol, typer.Argument(help="Protocol to collect.")],
    fleet: FleetArg,
    data: Annotated[str, typer.Option(help="Dataset directory or fsspec URL.")],
    broker: Annotated[Optional[str], typer.Option(help="MQTT broker URL (mqtt only).")] = None,
    target: Annotated[Optional[list[str]], typer.Option(help="Server to collect from (coap://host:port, opc.tcp://host:port); repeatable.")] = None,
    client_id: Annotated[Optional[str], typer.Option(help="Stable client id (MQTT persistent session).")] = None,
    metrics_port: Annotated[int, typer.Option(help="Port of the Prometheus /metrics endpoint (0: none).")] = 0,
    metrics_host: Annotated[str, typer.Option(help="Address the metrics endpoint binds to.")] = "0.0.0.0",
    duration: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,
    source: Annotated[Optional[str], typer.Option(help="Collect the third-party source of this name (spec.sources) instead of the simulators.")] = None,
    metrics_port_file: Annotated[Optional[Path], typer.Option(help="Write the metrics port to this file once it listens; with --metrics-port 0 a free port is picked (what `sensorfleet run` uses).")] = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
) -> None:
    """Run one collector process (what a collector pod runs)."""
    from sensorfleet.runtime import CollectorOptions, setup_logging

    setup_logging()
    parsed = _load(fleet)
    opts = CollectorOptions(parsed, data, broker, list(target or []), metrics_port, metrics_host, client_id, duration, source, metrics_port_file=str(metrics_port_file) if metrics_port_file else None, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    if source is not None:
        try:
            actual = parsed.spec.sources.protocol_of(source)
        except KeyError:
            known = ", ".join(s.name for s in parsed.spec.sources.all()) or "none"
            err.print(f"[red]error[/red] --source {source}: spec.sources has no source of that name (its sources: {known})", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        if actual != protocol.value:
            err.print(f"[red]error[/red] --source {source}: it is in spec.sources.{actual}, not {protocol.value}; run `sensorfleet collect {actual} --source {source}`", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    module = importlib.import_module(f"sensorfleet.collectors.{'foreign_' if source else ''}{protocol.value}")
    raise typer.Exit(_guarded(module.run, opts))


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="TCP port.")] = 1883,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
) -> None:
    """Run the embedded MQTT broker (amqtt, MQTT 3.1.1) until interrupted."""
    from sensorfleet.broker import run_embedded
    from sensorfleet.runtime import port_is_free, setup_logging

    setup_logging()
    if not port_is_free(port, host):
        err.print(f"[red]error[/red] port {host}:{port} is already in use; pick another with --port")
        raise typer.Exit(2)
    raise typer.Exit(run_embedded(host, port))


@app.command()
def run(
    fleet: Annotated[Path, typer.Argument(help="SensorFleet manifest (YAML).")],
    duration: Annotated[Optional[float], typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Dataset directory or fsspec URL (default: spec.storage.url or ./data/<fleet>).")] = None,
    broker: Annotated[Optional[str], typer.Option(help="Use this MQTT broker (mqtt://host:port) instead of starting one.")] = None,
    logs: Annotated[Optional[Path], typer.Option(help="Folder for the run's log files (default: ./runs/<fleet>-<time>).")] = None,
    live: Annotated[bool, typer.Option(help="Show the live table (off: print a line every few seconds).")] = True,
    summary: Annotated[Optional[Path], typer.Option(help="Write the final per-protocol summary (published, stored, lost, late, duplicate, malformed by reason, offline) to this JSON file.")] = None,
) -> None:
    """Run a whole fleet on this machine: broker, simulators and collectors as local processes."""
    from sensorfleet.run_plan import FleetRunError
    from sensorfleet.runner import run_fleet

    parsed = _load(fleet)
    try:
        code = run_fleet(parsed, fleet, duration=duration, data_url=data, broker_url=broker, log_dir=logs, live=live, summary_path=summary)
    except FleetRunError as exc:
        err.print(f"[red]error[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def _guarded(function, opts) -> int:
    """Run a component; an OSError (port in use, unreachable path) is a one-line error, exit 2."""
    from sensorfleet.tls import TlsConfigError

    try:
        return function(opts)
    except (OSError, TlsConfigError) as exc:
        err.print(f"[red]error[/red] {exc}", highlight=False)
        return 2


def _register_plugins() -> None:
    """Subcommands that live with their feature (forecast, generate, operator, ...)."""
    for module_name in ("sensorfleet.forecasting.cli", "sensorfleet.detection.cli", "sensorfleet.operator.cli", "sensorfleet.forecast_metrics", "sensorfleet.compaction_cli"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real missing dependency must not hide
                raise
            continue
        module.register(app)


_register_plugins()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
