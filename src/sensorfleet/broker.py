"""The MQTT broker of a local run.

Choice (spec.broker.mode): `auto` uses Mosquitto when a `mosquitto` binary is on PATH — it is
several times faster and supports shared subscriptions — and otherwise the embedded amqtt broker
(pure Python, MQTT 3.1.1, nothing outside pip needed). `external` uses the given URL. In
Kubernetes the operator always runs the eclipse-mosquitto image with the same configuration
`mosquitto_config()` renders.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListenerTls:
    """PEM files of a TLS listener: the CA that signed the client certificates, the broker's own."""

    cafile: str
    certfile: str
    keyfile: str
    require_certificate: bool = True


def mosquitto_config(port: int, bind: str | None, data_dir: str | None, password_file: str | None,
                     session_expiry: str = "7d", max_queued_bytes: int = 0, user: str | None = None,
                     max_connections: int = -1,
                     tls: ListenerTls | None = None) -> str:
    """mosquitto.conf for a fleet broker. `bind=None` listens on every interface (pods).
    `session_expiry` and `max_queued_bytes` (per client, 0 = unbounded) bound what a session that
    is never resumed (a removed collector replica) can hold.
    `user`: who the broker runs as; a broker started as root otherwise switches to `mosquitto`,
    which cannot write the persistence file in a directory of ours (sessions then die with it).
    `max_connections`: client connections the listener accepts (-1 = no bound, Mosquitto's default).

    `tls`: the one listener speaks TLS only (no plain port beside it: a client that forgets TLS
    is refused rather than sending its password in the clear)."""
    lines = [
        "# Rendered by SensorFleet (sensorfleet.broker.mosquitto_config).",
        f"listener {port}{' ' + bind if bind else ''}",
        *([f"max_connections {max_connections}"] if max_connections >= 0 else []),
        *([f"user {user}"] if user else []),
        "protocol mqtt",
        *(_tls_lines(tls) if tls else []),
        # Collectors acknowledge a message only once it is written to Parquet, so many QoS 1
        # messages are in flight per collector; Mosquitto's default of 20 would throttle them.
        # Bounded below the 16-bit packet-id space: more in flight than ids would reuse ids.
        "max_inflight_messages 60000",
        # A restarting collector's persistent session must hold everything published meanwhile.
        "max_queued_messages 0",
        f"max_queued_bytes {max_queued_bytes}",
        f"persistent_client_expiration {session_expiry}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
    ]
    if data_dir:
        # Sessions, subscriptions and queued messages survive a broker restart.
        lines += ["persistence true", f"persistence_location {data_dir.rstrip('/')}/", "autosave_interval 30"]
    else:
        lines += ["persistence false"]
    if password_file:
        lines += ["allow_anonymous false", f"password_file {password_file}"]
    else:
        lines += ["allow_anonymous true"]
    return "\n".join(lines) + "\n"


def _tls_lines(tls: ListenerTls) -> list[str]:
    return [
        f"cafile {tls.cafile}",
        f"certfile {tls.certfile}",
        f"keyfile {tls.keyfile}",
        f"require_certificate {'true' if tls.require_certificate else 'false'}",
        "tls_version tlsv1.2",  # the oldest accepted; TLS 1.3 is negotiated when both sides have it
    ]


def current_user() -> str:
    """The name of the user running this process: a local broker runs as the same user."""
    import os
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)


async def serve_embedded(host: str, port: int, stop: asyncio.Event) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 1000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    log.info("embedded amqtt broker listening on %s:%d", host, port)
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def run_embedded(host: str, port: int) -> int:
    """Run the embedded broker until SIGINT/SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_embedded(host, port, stop)

    asyncio.run(main())
    return 0
