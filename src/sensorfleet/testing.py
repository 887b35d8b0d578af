"""Real servers and processes for tests and benchmarks (like kopf.testing): a Mosquitto broker,
the embedded broker, and SensorFleet components as subprocesses. Everything on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sensorfleet.broker import ListenerTls, current_user, find_mosquitto, mosquitto_config
from sensorfleet.runner import scrape
from sensorfleet.runtime import free_port
from sensorfleet.tls import generate_tls, write_generated


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.3)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


@dataclass
class ServerProcess:
    """A server we started; `restart()` stops it (SIGTERM) and starts it again on the same port."""

    argv: list[str]
    port: int
    log_path: Path
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    tls: dict[str, Path] | None = None  # a TLS broker's PEM files (ca.crt, tls.*, client.*)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.argv[0]} did not start; log:\n{self.log_path.read_text(errors='replace')[-2000:]}") from None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self, down_for: float = 0.5) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@contextmanager
def mosquitto_broker(workdir: Path | None = None, persistence: bool = True) -> Iterator[ServerProcess]:
    binary = find_mosquitto()
    if not binary:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sf-mosquitto-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(mosquitto_config(port, "127.0.0.1", str(workdir) if persistence else None, None, user=current_user()))
    server = ServerProcess([binary, "-c", str(conf)], port, workdir / "mosquitto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def tls_mosquitto_broker(workdir: Path | None = None, require_certificate: bool = True, fleet: str = "test") -> Iterator[ServerProcess]:
    """Mosquitto with one TLS listener and certificates generated for 127.0.0.1 (`server.tls`
    holds their paths: ca.crt, tls.crt/tls.key of the broker, client.crt/client.key)."""
    binary = find_mosquitto()
    if not binary:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sf-mosquitto-tls-"))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = write_generated(workdir / "tls", generate_tls(fleet, ["127.0.0.1", "localhost"]))
    port = free_port()
    conf = workdir / "mosquitto.conf"
    listener = ListenerTls(str(paths["ca.crt"]), str(paths["tls.crt"]), str(paths["tls.key"]), require_certificate)
    conf.write_text(mosquitto_config(port, "127.0.0.1", None, None, user=current_user(), tls=listener))
    server = ServerProcess([binary, "-c", str(conf)], port, workdir / "mosquitto.log", tls=paths)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def embedded_broker(workdir: Path | None = None) -> Iterator[ServerProcess]:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sf-amqtt-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "sensorfleet.cli", "broker", "--port", str(port)], port, workdir / "amqtt.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Component:
    """A `sensorfleet simulate|collect ...` subprocess with its metrics endpoint."""

    argv: list[str]
    metrics_port: int
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> Component:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        deadline = time.monotonic() + 30
        while scrape(self.metrics_port) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(self.argv[3:6])} did not start; log:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    def metric(self, name: str) -> float:
        samples = scrape(self.metrics_port)
        if samples is None:
            raise RuntimeError(f"metrics endpoint :{self.metrics_port} is not answering; log:\n{self.log()[-2000:]}")
        return samples.get(name, 0.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.wait(30)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.wait(10)


def component(kind: str, protocol: str, fleet_path: Path, workdir: Path, *args: str) -> Component:
    """`sensorfleet simulate|collect PROTOCOL --fleet F ...` with a free metrics port."""
    port = free_port()
    name = f"{kind}-{protocol}-{port}"
    argv = [sys.executable, "-m", "sensorfleet.cli", kind, protocol, "--fleet", str(fleet_path), "--metrics-port", str(port), "--metrics-host", "127.0.0.1", *args]
    return Component(argv, port, Path(workdir) / f"{name}.log")


def wait_until(predicate, timeout: float, interval: float = 0.2, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")
