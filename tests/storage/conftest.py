"""A real S3-compatible server for the storage tests: SeaweedFS through `hack/s3.sh` (the same
script as `make s3-up`), on free 127.0.0.1 ports, stopped at the end."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
S3_SCRIPT = REPO / "hack" / "s3.sh"


@dataclass
class S3Server:
    folder: Path
    env: dict[str, str]  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION

    def run(self, command: str) -> None:
        subprocess.run([str(S3_SCRIPT), command, str(self.folder)], check=True, timeout=600, stdout=subprocess.DEVNULL)


def _exports(line: str) -> dict[str, str]:
    words = shlex.split(line)
    assert words[0] == "export", line
    return dict(w.split("=", 1) for w in words[1:])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    folder = tmp_path_factory.mktemp("s3")
    # A cold build of `weed` takes long; it happens here once (and `make test` does it up front).
    up = subprocess.run([str(S3_SCRIPT), "up", str(folder)], capture_output=True, text=True, timeout=3600)
    assert up.returncode == 0, up.stderr
    server = S3Server(folder, _exports(up.stdout.strip().splitlines()[-1]))
    try:
        yield server
    finally:
        server.run("down")


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process and its children talk to the test server (the standard AWS variables)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return {**os.environ}
