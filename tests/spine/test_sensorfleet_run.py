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


def test_two_runs_at_once_both_work_and_each_summary_counts_only_its_own_fleet(write_fleet, tmp_path):
    """Both runs start together with the same spec.monitoring.port: each process binds a free
    metrics port itself and tells its runner, so no run scrapes (or takes) the other's ports."""
    runs = {}
    for name, devices in (("alpha", 4), ("bravo", 9)):  # different sizes: a mixed-up scrape shows
        fleet = write_fleet({"broker": {"port": 0}, "protocols": {"mqtt": {"devices": devices, "interval": 0.25}},
                             "collector": {"flushInterval": 0.5}}, name=name)
        runs[name] = (devices, subprocess.Popen(
            [sys.executable, "-m", "sensorfleet.cli", "run", str(fleet), "--no-live", "--duration", "8", "--data", str(tmp_path / name / "data"),
             "--logs", str(tmp_path / name / "logs"), "--summary", str(tmp_path / name / "summary.json")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={"COLUMNS": "200", "PATH": "/usr/sbin:/usr/bin:/bin"}))
    outputs = {name: run.communicate(timeout=240)[0] for name, (_, run) in runs.items()}
    ports = {}
    for name, (devices, run) in runs.items():
        assert run.returncode == 0, outputs[name]
        mqtt = json.loads((tmp_path / name / "summary.json").read_text())["protocols"]["mqtt"]
        frame = pd.read_parquet(tmp_path / name / "data")
        assert frame["device"].nunique() == devices and set(frame["fleet"]) == {name}, name
        assert frame.groupby(["device", "sensor"])["seq"].apply(lambda seq: seq.is_unique).all(), name
        # exact: every published reading stored once, and nothing of the other run counted
        assert mqtt["published"] == mqtt["stored"] == len(frame) > devices * 3 * 10, (name, mqtt)
        assert mqtt["lost"] == 0 and mqtt["duplicate"] == 0 and not mqtt["notes"], (name, mqtt)
        targets = json.loads((tmp_path / name / "logs" / "prometheus-targets.json").read_text())
        ports[name] = {t["targets"][0] for t in targets}
        assert len(ports[name]) == len(targets) == 2, targets
    assert not ports["alpha"] & ports["bravo"], ports


def test_a_coap_or_opcua_port_in_use_is_a_clear_error_naming_the_field(write_fleet, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fleet = write_fleet({"broker": {"port": 0}, "protocols": {"mqtt": {"enabled": False}, "opcua": {"enabled": True, "devices": 2, "port": port}}})
        run = start_run(fleet, tmp_path, "--duration", "5")
        output, _ = run.communicate(timeout=60)
    assert run.returncode == 2, output
    assert f"opcua simulator port 127.0.0.1:{port}/tcp is already in use (spec.protocols.opcua.port + replica 0)" in " ".join(output.split())
    assert "Traceback" not in output
