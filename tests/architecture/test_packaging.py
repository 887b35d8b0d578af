"""The wheel (what the Dockerfile installs) carries every feature under `sensorfleet.`, nothing
importable as a bare `operator`, and none of the dev tooling (the dev cluster in `devcluster/`)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_maps_every_folder_under_sensorfleet(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("sensorfleet-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("sensorfleet/operator/builders.py", "sensorfleet/operator/crd.py", "sensorfleet/simulators/mqtt.py", "sensorfleet/collectors/base.py", "sensorfleet/forecasting/pipeline.py", "sensorfleet/cli.py"):
        assert module in names, module
    top_level = {n.split("/")[0] for n in names if not n.startswith("sensorfleet-")}
    assert top_level == {"sensorfleet"}, top_level
    dev_tooling = [n for n in names if "devcluster" in n or "devdeploy" in n]
    assert dev_tooling == [], dev_tooling


def test_runtime_code_never_imports_the_dev_cluster():
    """The dev cluster is not in the wheel, so an import of it from runtime code would fail in a pod."""
    import ast
    import os

    package = REPO / "src" / "sensorfleet"  # operator/, simulators/... are symlinked in: follow them
    files = [Path(d) / f for d, _, fs in os.walk(package, followlinks=True) for f in fs if f.endswith(".py")]
    assert len(files) > 40, files
    offenders = []
    for path in sorted(files):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "devcluster" or n.startswith("devcluster.") for n in names):
                offenders.append(str(path.relative_to(package)))
    assert offenders == []
