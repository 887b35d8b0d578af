"""`sensorfleet run`, before anything starts: the plan of every child process (broker, collectors,
simulators, third-party sources) with its command line, ports and start order, and the local
broker's listener (Mosquitto or the embedded amqtt broker, TLS with the user's or freshly
generated certificates). runner.py starts what the plan says and watches it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from sensorfleet.broker import ListenerTls, current_user, mosquitto_config
from sensorfleet.runtime import free_port, port_is_free
from sensorfleet.spec import SensorFleet
from sensorfleet.tls import generate_tls, write_generated


class FleetRunError(RuntimeError):
    """A fleet that cannot start (port in use, missing binary, a child that died at start-up)."""


@dataclass
class ChildSpec:
    name: str  # e.g. "mqtt-collector-0"
    role: str  # broker | simulator | collector
    protocol: str | None
    argv: list[str]
    metrics_port: int = 0  # known once the child has written metrics_port_file
    ready_port: int | None = None  # TCP port that accepts connections once the child is up
    # The child binds a free metrics port itself and writes its number here: a port chosen
    # here and bound later by the child could be taken meanwhile (by a second `sensorfleet
    # run`, whose scrapes would then read this run's counts, or the other way round).
    metrics_port_file: Path | None = None
    source: str | None = None  # the third-party source (spec.sources) a collector reads

    @property
    def row(self) -> str | None:
        """The line of the live table and the summary this child counts in."""
        return source_row(self.source) if self.source else self.protocol


def source_row(name: str) -> str:
    return f"source {name}"


@dataclass
class Plan:
    """Everything a local run will start, decided before anything starts (pure, testable)."""

    broker_url: str
    children: list[ChildSpec] = field(default_factory=list)
    mosquitto_conf: str | None = None


def _sensorfleet() -> list[str]:
    return [sys.executable, "-m", "sensorfleet.cli"]


def _tls_port(spec) -> int:
    port = spec.broker.tls.port or free_port()
    if not port_is_free(port):
        raise FleetRunError(f"broker TLS port 127.0.0.1:{port} is already in use (spec.broker.tls.port); set it to a free port, or 0 for any")
    return port


def local_broker_tls(fleet: SensorFleet, log_dir: Path) -> tuple[ListenerTls, list[str]]:
    """The local Mosquitto's TLS files and the clients' flags: the user's (spec.broker.tls
    serverCertFile/serverKeyFile with caFile, certFile, keyFile; clients read them from the spec),
    or a CA, a server certificate for 127.0.0.1/localhost and a client certificate generated into
    `<run dir>/tls` (new for every run: nothing outside the run trusts them)."""
    tls = fleet.spec.broker.tls
    if tls.server_cert_file and tls.server_key_file and tls.ca_file:
        files = {"server_cert_file": tls.server_cert_file, "server_key_file": tls.server_key_file, "ca_file": tls.ca_file}
        for name, path in files.items():
            if not Path(path).is_file():
                raise FleetRunError(f"spec.broker.tls.{_camel(name)}: {path} is not a readable file")
        return ListenerTls(str(Path(tls.ca_file).resolve()), str(Path(tls.server_cert_file).resolve()), str(Path(tls.server_key_file).resolve()), tls.require_client_certificate), []
    paths = write_generated(log_dir / "tls", generate_tls(fleet.name, ["127.0.0.1", "localhost"]))
    listener = ListenerTls(str(paths["ca.crt"]), str(paths["tls.crt"]), str(paths["tls.key"]), tls.require_client_certificate)
    return listener, ["--tls-ca", str(paths["ca.crt"]), "--tls-cert", str(paths["client.crt"]), "--tls-key", str(paths["client.key"])]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def plan_run(fleet: SensorFleet, fleet_path: Path, data_url: str, broker_url: str | None, log_dir: Path, mosquitto: str | None) -> Plan:
    spec = fleet.spec

    def child(name: str, role: str, protocol: str, argv: list[str], ready_port: int | None = None, source: str | None = None) -> ChildSpec:
        port_file = log_dir / f"{name}.metrics-port"
        return ChildSpec(name, role, protocol, [*argv, "--metrics-port", "0", "--metrics-port-file", str(port_file)],
                         ready_port=ready_port, metrics_port_file=port_file, source=source)

    fleet_arg = ["--fleet", str(fleet_path)]
    children: list[ChildSpec] = []
    conf = None
    client_tls_args: list[str] = []  # --tls-ca/--tls-cert/--tls-key of generated files
    if "mqtt" in spec.enabled_protocols() and not broker_url:
        mode = spec.broker.mode
        if mode == "external":
            broker_url = spec.broker.url
        else:
            port = spec.broker.port or free_port()
            if not port_is_free(port):
                raise FleetRunError(f"broker port 127.0.0.1:{port} is already in use (spec.broker.port); stop what uses it, set spec.broker.port to a free port, 0 for any, or pass --broker mqtt://host:port")
            broker_url = f"mqtt://127.0.0.1:{port}"
            if mode == "mosquitto" and not mosquitto:
                raise FleetRunError("spec.broker.mode is 'mosquitto' but no mosquitto binary is on PATH (apt-get install mosquitto), or use mode 'auto'")
            if spec.protocols.mqtt.payload_format == "sparkplugB" and not (mode in ("auto", "mosquitto") and mosquitto):
                raise FleetRunError("spec.protocols.mqtt.payloadFormat: sparkplugB needs an MQTT 5 broker (the edge node's Last Will); the embedded amqtt broker speaks MQTT 3.1.1 only: install mosquitto (apt-get install mosquitto), or use spec.broker.mode external")
            if spec.broker.tls.enabled and not mosquitto:
                raise FleetRunError("spec.broker.tls.enabled needs Mosquitto (apt-get install mosquitto): the embedded amqtt broker has no TLS listener")
            if mode in ("auto", "mosquitto") and mosquitto:
                persistence = log_dir / "broker"
                listener_tls = None
                if spec.broker.tls.enabled:
                    port = _tls_port(spec)
                    listener_tls, client_tls_args = local_broker_tls(fleet, log_dir)
                    broker_url = f"mqtts://127.0.0.1:{port}"
                conf = mosquitto_config(port, "127.0.0.1", str(persistence), None, user=current_user(), tls=listener_tls)
                children.append(ChildSpec("broker", "broker", "mqtt", [mosquitto, "-c", str(log_dir / "mosquitto.conf")], ready_port=port))
            else:
                children.append(ChildSpec("broker", "broker", "mqtt", [*_sensorfleet(), "broker", "--port", str(port)], ready_port=port))
    for protocol in spec.enabled_protocols():
        p = spec.protocol(protocol)
        server_urls = []
        simulators = []
        for replica in range(p.replicas):
            argv = [*_sensorfleet(), "simulate", protocol, *fleet_arg, "--replica", str(replica), "--metrics-host", "127.0.0.1"]
            ready = None
            if protocol == "mqtt":
                argv += ["--broker", broker_url, *client_tls_args]
            else:
                port = p.port + replica
                udp = protocol == "coap"
                if not port_is_free(port, udp=udp):
                    raise FleetRunError(f"{protocol} simulator port 127.0.0.1:{port}/{'udp' if udp else 'tcp'} is already in use (spec.protocols.{protocol}.port + replica {replica}); choose another port")
                argv += ["--host", "127.0.0.1", "--port", str(port)]
                scheme = "coap" if udp else "opc.tcp"
                server_urls.append(f"{scheme}://127.0.0.1:{port}")
                ready = None if udp else port
            simulators.append(child(f"{protocol}-simulator-{replica}", "simulator", protocol, argv, ready))
        for replica in range(p.collector_replicas):
            argv = [*_sensorfleet(), "collect", protocol, *fleet_arg, "--data", data_url, "--metrics-host", "127.0.0.1"]
            if protocol == "mqtt":
                argv += ["--broker", broker_url, "--client-id", f"{fleet.name}-mqtt-collector-{replica}", *client_tls_args]
            else:
                # Each collector replica takes its share of the servers.
                mine = server_urls[replica :: p.collector_replicas]
                if not mine:
                    continue
                for url in mine:
                    argv += ["--target", url]
            children.append(child(f"{protocol}-collector-{replica}", "collector", protocol, argv))
        children.extend(simulators)
    # Third-party sources: a collector each, talking to the devices' own broker or server.
    for protocol in ("mqtt", "opcua", "coap"):
        for source in getattr(spec.sources, protocol):
            argv = [*_sensorfleet(), "collect", protocol, *fleet_arg, "--data", data_url, "--metrics-host", "127.0.0.1", "--source", source.name]
            children.append(child(f"source-{source.name}", "collector", protocol, argv, source=source.name))
    # Collectors before simulators for MQTT (subscriptions must exist before the first publish);
    # CoAP / OPC UA collectors need their servers up first.
    order = {"broker": 0, "collector": 1, "simulator": 2}
    children.sort(key=lambda c: (order[c.role] if c.protocol == "mqtt" or c.role == "broker" else {"simulator": 1, "collector": 2}[c.role]))
    return Plan(broker_url or "", children, conf)
