"""The errors the dev cluster raises; each message says what failed and where to look."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path


class ClusterError(RuntimeError):
    """The local control plane could not be built, started or stopped; the message says why."""


class CommandError(ClusterError):
    """kubectl or helm failed; the message carries the command and its stderr."""

    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        self.stderr = result.stderr
        command = " ".join([Path(argv[0]).name, *argv[1:]])
        super().__init__(f"`{command}` exited {result.returncode}: {result.stderr.strip()}")


class StartupError(ClusterError):
    """A component exited or never became healthy; carries the last lines of its log."""

    def __init__(self, component: str, reason: str, log: Path | None, log_tail: str) -> None:
        self.component = component
        self.log = log
        self.log_tail = log_tail
        where = f" (full log: {log})" if log else ""
        super().__init__(
            f"{component} failed to start: {reason}{where}\n"
            f"--- last lines of the {component} log ---\n{log_tail}"
        )
