"""The Indexed forecast Job's pod command is real: the container the builders emit for
`spec.forecasting.parallelism: 2`, run here as two local processes with what the Job controller
and the kubelet give each pod (JOB_COMPLETION_INDEX, the Job's name, $(VAR) expansion), over a
generated dataset. The first pod to finish writes its shard; the second merges one report and
says so in its termination message. (kwok runs the pods in tests/operator/test_sharded_forecast.py
but runs no command.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from sensorfleet.operator import builders, child_meta, job_builders, pod_builders, storage_builders
from sensorfleet.operator.broker_builders import BrokerCredentials
from sensorfleet.operator.child_meta import BuildOptions, Owner
from sensorfleet.spec import SensorFleet

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
FLEET = "shardcmd"


def pod_argv_env(container: dict, index: int, job: str, tmp: Path, fleet_file: Path) -> tuple[list[str], dict[str, str]]:
    """The container's argv and env as the kubelet would run them in pod `index` of Job `job`,
    with the mounts (/data, the fleet file, HOME, the termination-message file) under `tmp`."""

    def localize(value: str) -> str:
        value = value.replace(pod_builders.FLEET_FILE, str(fleet_file)).replace(pod_builders.HOME_DIR, str(tmp / "home"))
        value = value.replace(job_builders.TERMINATION_MESSAGE_PATH, str(tmp / f"termination-{index}"))
        return str(tmp / "data") + value[len(storage_builders.DATA_DIR):] if value == storage_builders.DATA_DIR or value.startswith(storage_builders.DATA_DIR + "/") else value

    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TMPDIR")}
    env["HOME"] = str(tmp / "home")
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = localize(item["value"])
        elif item["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.labels['batch.kubernetes.io/job-name']":
            env[item["name"]] = job  # the downward API: the pod's Job-name label
    env["JOB_COMPLETION_INDEX"] = str(index)  # set by the Job controller in every Indexed Job pod
    args = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), localize(a)) for a in container["args"]]
    return [str(BIN / container["command"][0]), *args], env


def test_two_shard_pods_write_one_merged_report(tmp_path: Path) -> None:
    fleet = SensorFleet.model_validate({"metadata": {"name": FLEET, "namespace": "default"}, "spec": {
        "protocols": {"mqtt": {"devices": 3, "interval": 60}},
        "forecasting": {"horizon": 30, "frequency": "1min", "parallelism": 2},
    }})
    children = {(c["kind"], c["metadata"]["name"]): c for c in builders.build_children(fleet, Owner(FLEET, "default", "uid"), BuildOptions(), BrokerCredentials("u", "p" * 20))}
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(children[("ConfigMap", f"{FLEET}-fleet")]["data"]["fleet.yaml"])
    (tmp_path / "home").mkdir()
    start = (datetime.now(timezone.utc) - timedelta(days=2)).replace(second=0, microsecond=0)
    seeded = subprocess.run([str(BIN / "sensorfleet"), "generate", str(fleet_file), "--days", "1.99", "--start", start.isoformat(),
                             "--data", str(tmp_path / "data"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert seeded.returncode == 0, seeded.stderr[-2000:]
    container = children[("CronJob", child_meta.forecast_name(FLEET))]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    reports = tmp_path / "data" / "_reports"
    for index in (1, 0):  # pod 1 finishes first, pod 0 last
        argv, env = pod_argv_env(container, index, f"{FLEET}-forecast-29000000", tmp_path, fleet_file)
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"pod {index} ({argv}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        if index == 1:
            assert "last shard to finish" in done.stdout and not (reports / "metrics.json").exists()
            assert not (tmp_path / "termination-1").exists()  # only the merging pod reports the run
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["options"]["shards"] == 2 and metrics["headline"]["series"] == 9  # 3 devices x 3 sensors
    assert sum(s["series"] for s in metrics["shards"].values()) == 9
    assert (reports / "report.html").exists() and (reports / "animation.gif").exists()
    outcome = json.loads((tmp_path / "termination-0").read_text())
    assert outcome["reason"] == "Forecast" and "9 series" in outcome["headline"]
