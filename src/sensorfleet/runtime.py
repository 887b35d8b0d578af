"""Process plumbing shared by every component (simulators, collectors, broker): the options each
pod's command line maps to, logging, and a stop signal for SIGINT/SIGTERM.

The same entry points run as local processes under `sensorfleet run` and as containers in pods.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from dataclasses import dataclass, field, replace
from urllib.parse import unquote, urlsplit

from sensorfleet.spec import SensorFleet

ENV_MQTT_USERNAME = "SENSORFLEET_MQTT_USERNAME"
ENV_MQTT_PASSWORD = "SENSORFLEET_MQTT_PASSWORD"


@dataclass
class SimulatorOptions:
    fleet: SensorFleet
    replica: int = 0  # which shard of the protocol's devices this process simulates
    broker_url: str | None = None  # MQTT only
    host: str = "127.0.0.1"  # servers (CoAP, OPC UA) bind here
    port: int | None = None  # server port; None = the spec's
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    duration: float | None = None  # seconds, then stop (tests and benchmarks)
    metrics_port_file: str | None = None  # with metrics_port 0: any free port, written here (FleetMetrics.serve)
    tls_ca: str | None = None  # TLS files; None = the spec's (spec.broker.tls)
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass
class CollectorOptions:
    fleet: SensorFleet
    data_url: str
    broker_url: str | None = None  # MQTT only
    targets: list[str] = field(default_factory=list)  # servers to collect from (CoAP, OPC UA)
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    client_id: str | None = None  # stable id = persistent MQTT session across restarts
    duration: float | None = None
    source: str | None = None  # a third-party source of spec.sources instead of the simulators
    metrics_port_file: str | None = None  # with metrics_port 0: any free port, written here (FleetMetrics.serve)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    # PEM files for mqtts:// (sensorfleet.tls.client_context): the CA the broker is verified
    # against (None: the system's) and the client certificate with its key.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context for mqtts:// (built once per address); None for mqtt://.
        Raises sensorfleet.tls.TlsConfigError naming the field of a missing or bad file."""
        return _ssl_context(self.ca_file, self.cert_file, self.key_file) if self.tls else None


@functools.lru_cache(maxsize=8)
def _ssl_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    from sensorfleet.tls import client_context

    return client_context(ca_file, cert_file, key_file)


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user:pass@]host[:port]`; credentials may also come from the environment."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp"):
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r}: no host")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker URL {url!r}: port is not a number between 0 and 65535") from None
    username = unquote(parts.username) if parts.username else os.environ.get(ENV_MQTT_USERNAME) or None
    password = unquote(parts.password) if parts.password else os.environ.get(ENV_MQTT_PASSWORD) or None
    return BrokerAddress(parts.hostname, port, username, password, tls)


def broker_address(url: str | None, fleet: SensorFleet, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> BrokerAddress:
    """The broker a simulator or collector talks to: the URL (default mqtt://127.0.0.1:1883) with,
    for mqtts://, the TLS files from the command line or else from spec.broker.tls. The TLS
    context is built here, so a missing or unreadable file fails at start, naming its field."""
    address = parse_broker_url(url or "mqtt://127.0.0.1:1883")
    if not address.tls:
        return address
    tls = fleet.spec.broker.tls
    address = replace(address, ca_file=ca_file or tls.ca_file, cert_file=cert_file or tls.cert_file, key_file=key_file or tls.key_file)
    address.ssl_context()
    return address


def mqtt_client(broker: BrokerAddress, client_id: str, *, clean_session: bool, manual_ack: bool = False):
    """A paho client for SensorFleet: MQTT 3.1.1 (the embedded amqtt broker speaks nothing newer),
    reconnecting with back-off from 1 s up to 30 s, credentials and TLS from the broker address."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=clean_session, manual_ack=manual_ack)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    context = broker.ssl_context()
    if context is not None:
        client.tls_set_context(context)
    return client


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("SENSORFLEET_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def stop_event_on_signals() -> threading.Event:
    """An Event set by SIGINT or SIGTERM, so loops end and data is flushed."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        logging.getLogger("sensorfleet").info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def pause_event_on_sigusr1() -> threading.Event:
    """An Event set by SIGUSR1: a simulator stops producing but stays up, so the runner can read
    its final counters from /metrics before stopping it for good."""
    pause = threading.Event()
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: pause.set())
    return pause


def port_is_free(port: int, host: str = "127.0.0.1", udp: bool = False) -> bool:
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        if not udp:  # servers set SO_REUSEADDR too: a socket in TIME_WAIT is not "in use"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", start: int | None = None, udp: bool = False) -> int:
    """A free port: the first free one from `start` up, or one the kernel picks."""
    if start:
        for port in range(start, min(start + 500, 65536)):
            if port_is_free(port, host, udp) and (udp or port_is_free(port, host, udp=True)):
                return port
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
