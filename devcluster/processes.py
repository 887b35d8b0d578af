"""The processes of a dev cluster: free ports, starting a component in its own process group,
stopping it for sure (pid reuse checked), and waiting until it is healthy."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from devcluster.errors import ClusterError, StartupError


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 (held open together so the kernel cannot repeat one)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port (closed connections in TIME_WAIT do not count:
    SO_REUSEADDR ignores them, as every server that binds the port next will)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def tail_of(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _die_with_parent() -> None:
    """preexec_fn: own process group, and SIGKILL when the Python that started us dies (a
    kube-apiserver told to SIGTERM without its etcd can spend minutes shutting down)."""
    os.setsid()
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL))


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    pid: int = 0
    started_at: float = 0.0  # psutil create_time, to tell our process from a reused pid
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str] | None, tie_to_parent: bool) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent if tie_to_parent else None,
                start_new_session=not tie_to_parent,
            )
        self.pid = self.popen.pid
        self.started_at = _create_time(self.pid) or 0.0

    def exit_code(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        return None if _is_ours(self.pid, self.started_at) else -1


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _is_ours(pid: int, started_at: float) -> bool:
    """True while pid is alive and is the process we started (not a reused pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started_at) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_group(pid: int, started_at: float, popen: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process group, then SIGKILL what is left after 10 s; reap our own child."""
    if not _is_ours(pid, started_at):
        if popen is not None:
            popen.poll()
        return
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if popen is not None:
                popen.poll()
            if not _is_ours(pid, started_at):
                return
            time.sleep(0.1)
    raise ClusterError(f"process {pid} did not exit after SIGKILL")


# --------------------------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------------------------


def http_get(url: str, context: ssl.SSLContext | None, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def wait_until(
    component: Component,
    what: str,
    probe: Callable[[], bool],
    timeout: float,
    progress: IO[str],
) -> None:
    """Poll probe() until True; fail fast with the log tail if the component exits or times out."""
    started = time.monotonic()
    last_error = ""
    while True:
        code = component.exit_code()
        if code is not None:
            raise StartupError(component.name, f"exited with code {code}", component.log, tail_of(component.log))
        try:
            if probe():
                progress.write(f"[devcluster]   {component.name}: {what} ({time.monotonic() - started:.1f}s)\n")
                progress.flush()
                return
        except (OSError, ssl.SSLError, ValueError) as error:
            last_error = str(error)
        if time.monotonic() - started > timeout:
            reason = f"not {what} after {timeout:.0f}s" + (f" (last error: {last_error})" if last_error else "")
            raise StartupError(component.name, reason, component.log, tail_of(component.log))
        time.sleep(0.25)



def wait_port_free(port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not port_is_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 1.0) -> Any:
    """Poll condition() until it returns something truthy and return that; TimeoutError naming
    ``what`` (and the last exception, if the condition kept raising) otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except (ClusterError, OSError, ValueError, KeyError) as error:
            last_error = error
        if time.monotonic() > deadline:
            detail = f"; last error: {last_error}" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)

