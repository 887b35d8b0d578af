"""`sensorfleet run`: the whole fleet as local processes, stopped cleanly however it ends."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import psutil

from sensorfleet.testing import wait_until


def start_run(fleet, tmp_path, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "sensorfleet.cli", "run", str(fleet), "--no-live", "--data", str(tmp_path / "data"), "--logs", str(tmp_path / "logs"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={"COLUMNS": "200", "PATH": "/usr/sbin:/usr/bin:/bin"},
    )


def summary_row(output: str, protocol: str) -> list[str]:
    tail = output.split("final summary")[1]
    line = next(line for line in tail.splitlines() if line.strip("│ ").startswith(protocol))
    return [cell.strip() for cell in line.strip("│").split("│")]


def test_run_for_a_duration_stores_everything_and_reports(write_fleet, tmp_path):
    fleet = write_fleet({"broker": {"port": 0}, "protocols": {"mqtt": {"devices": 30, "interval": 0.2}}, "collector": {"flushInterval": 0.5}})
    run = start_run(fleet, tmp_path, "--duration", "5")
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 0, output
    assert "metrics: http://127.0.0.1:" in output
    row = summary_row(output, "mqtt")
    published, stored, lost, duplicates = (int(row[i].replace(",", "")) for i in (3, 4, 5, 6))
    assert published > 300 and stored == published and lost == 0 and duplicates == 0, row
    df = pd.read_parquet(tmp_path / "data")
    assert len(df) == published
    targets = json.loads((tmp_path / "logs" / "prometheus-targets.json").read_text())
    assert {t["labels"]["component"] for t in targets} == {"simulator", "collector"}
    assert (tmp_path / "logs" / "sensorfleet-run.log").read_text().count("started") >= 3


def test_ctrl_c_stops_cleanly_with_data_flushed(write_fleet, tmp_path):
    fleet = write_fleet({"broker": {"port": 0}, "protocols": {"mqtt": {"devices": 30, "interval": 0.2}}, "collector": {"flushInterval": 30}})
    run = start_run(fleet, tmp_path)
    time.sleep(8)
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=90)
    assert run.returncode == 0, output
    published = int(summary_row(output, "mqtt")[3].replace(",", ""))
    # flushInterval is 30 s: everything on disk was written by the shutdown flush
    assert len(pd.read_parquet(tmp_path / "data")) == published > 0
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(fleet) in " ".join(p.info["cmdline"] or [])]


def test_broker_port_in_use_is_a_clear_error(write_fleet, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fleet = write_fleet({"broker": {"port": port}})
        run = start_run(fleet, tmp_path, "--duration", "5")
        output, _ = run.communicate(timeout=60)
    assert run.returncode == 2
    assert f"broker port 127.0.0.1:{port} is already in use (spec.broker.port)" in " ".join(output.split())
    assert "Traceback" not in output


def test_a_component_failing_at_start_up_is_reported(write_fleet, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the dataset directory should be")
    fleet = write_fleet({"broker": {"port": 0}})
    run = subprocess.run([sys.executable, "-m", "sensorfleet.cli", "run", str(fleet), "--no-live", "--data", str(blocker / "data"), "--logs", str(tmp_path / "logs"), "--duration", "5"], capture_output=True, text=True, timeout=90, env={"COLUMNS": "200", "PATH": "/usr/sbin:/usr/bin:/bin"})
    assert run.returncode == 2
    assert "mqtt-collector-0 exited with code" in run.stderr and "at start-up" in run.stderr
    assert "Traceback" not in run.stderr.split("last log lines")[0]


def test_a_child_dying_mid_run_stops_the_fleet_cleanly(write_fleet, tmp_path):
    fleet = write_fleet({"broker": {"port": 0}, "protocols": {"mqtt": {"devices": 10, "interval": 0.5}}})
    run = start_run(fleet, tmp_path)
    runner = psutil.Process(run.pid)

    def simulator():
        return next((p for p in runner.children(recursive=True) if "simulate" in p.cmdline()), None)

    log = tmp_path / "logs" / "mqtt-simulator-0.log"
    # Past start-up (a loaded machine may take seconds to import): the simulator is publishing.
    wait_until(lambda: simulator() is not None and log.exists() and "simulating" in log.read_text(), 120, message="simulator running")
    time.sleep(1)
    simulator().kill()
    output, _ = run.communicate(timeout=90)
    assert run.returncode == 1, output
    assert "mqtt-simulator-0 exited unexpectedly" in output, output
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(fleet) in " ".join(p.info["cmdline"] or [])], "children left behind"


def test_a_metrics_port_taken_after_planning_is_replaced(write_fleet, tmp_path, monkeypatch):
    """Ports are free when planned; if another program takes one before the child binds it,
    the runner retries that child on another port instead of failing the fleet."""
    from sensorfleet import runner as runner_module
    from sensorfleet.spec import load_fleet

    fleet_path = write_fleet({"broker": {"port": 0}, "protocols": {"mqtt": {"devices": 5}}})
    fleet = load_fleet(fleet_path)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    real_plan = runner_module.plan_run

    def plan_with_a_stolen_port(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        collector = next(c for c in plan.children if c.role == "collector")
        collector.argv[collector.argv.index("--metrics-port") + 1] = str(port)
        collector.metrics_port = port
        return plan

    monkeypatch.setattr(runner_module, "plan_run", plan_with_a_stolen_port)
    try:
        code = runner_module.run_fleet(fleet, fleet_path, duration=3, data_url=str(tmp_path / "data"), log_dir=tmp_path / "logs", live=False)
    finally:
        taken.close()
    assert code == 0
    assert "was taken meanwhile; retrying" in (tmp_path / "logs" / "sensorfleet-run.log").read_text()
    assert len(pd.read_parquet(tmp_path / "data")) > 0
