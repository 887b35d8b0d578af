"""The wheel (what the Dockerfile installs) carries every feature under `sensorfleet.`, and
nothing importable as a bare `operator`."""

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
