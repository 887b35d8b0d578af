"""Forecast figures reach Prometheus: the exporter serves the newest report per fleet, a wrong
report is a clear error (never zeros), and the job's optional push lands in a real Pushgateway."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sensorfleet.forecast_metrics import PUSHGATEWAY_ENV, ReportFolder, ReportShapeError, push_from_env, read_report
from sensorfleet.runtime import free_port
from sensorfleet.testing import wait_for_port, wait_until


def unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def report(fleet: str | None, generated_at: str, mae: float = 0.42, model: str = "Harmonic") -> dict:
    """The shape `sensorfleet forecast` writes (forecasting/pipeline.py), reduced to what is read."""
    return {
        "headline": {"model": model, "mae": mae, "mase": 0.76, "mase_vs_baseline": 0.71, "cv_mase_vs_baseline": 0.68, "baseline": "SeasonalNaive",
                     "baseline_mase": 1.06, "anomalies_flagged": 22, "series": 6, "generated_at": generated_at},
        "options": {"fleet": fleet, "horizon": 60},
        "holdout": {"windows": 1, "series": 6, "models": {
            model: {"mae": mae, "rmse": 0.53, "smape": 0.0048, "mase": 0.76, "mase_vs_baseline": 0.71},
            "SeasonalNaive": {"mae": 0.61, "rmse": 0.75, "smape": 0.0069, "mase": 1.06, "mase_vs_baseline": 1.0},
        }},
    }


def write(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_newest_report_per_fleet_and_folder_name_as_fallback(tmp_path: Path) -> None:
    write(tmp_path / "demo" / "2026-11-24T10" / "metrics.json", report("demo", "2026-11-24T10:00:00+00:00", mae=0.9))
    write(tmp_path / "demo" / "2026-11-24T11" / "metrics.json", report("demo", "2026-11-24T11:00:00+00:00", mae=0.4))
    write(tmp_path / "plant-7" / "metrics.json", report(None, "2026-11-24T09:00:00+00:00"))
    reports, errors = ReportFolder(tmp_path).scan()
    assert errors == []
    assert sorted(reports) == ["demo", "plant-7"]
    assert reports["demo"].models["Harmonic"].mae == 0.4  # the newer run wins
    assert reports["demo"].models["SeasonalNaive"].mase == 1.06
    assert reports["plant-7"].generated_at == pytest.approx(unix('2026-11-24T09:00:00+00:00'))


@pytest.mark.parametrize(("doc", "names"), [
    ("{not json", "not a readable JSON file"),
    ([1, 2], "top level: expected an object"),
    ({"holdout": {}}, "headline: expected an object"),
    ({"headline": {"model": "Harmonic", "generated_at": "yesterday"}}, "headline.generated_at: expected an ISO 8601 time, got 'yesterday'"),
    ({"headline": {"model": "Harmonic", "generated_at": "2026-11-24T10:00:00+00:00"}, "holdout": {"models": {"Harmonic": {"mae": "0.4"}}}},
     "holdout.models.Harmonic.mae: expected a number or null, got '0.4'"),
])
def test_a_wrong_report_is_an_error_naming_the_file_and_field(tmp_path: Path, doc: object, names: str) -> None:
    path = write(tmp_path / "metrics.json", doc)
    with pytest.raises(ReportShapeError) as caught:
        read_report(path)
    assert str(path) in str(caught.value) and names in str(caught.value)


def exporter(reports: Path, port: int, logs: Path) -> subprocess.Popen:
    log = (logs / f"exporter-{port}.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "sensorfleet.cli", "forecast-exporter", "--reports", str(reports), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_exporter_serves_reports_as_they_appear_and_counts_unreadable_ones(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    port = free_port()
    process = exporter(reports, port, tmp_path)  # the folder does not exist yet: serve nothing, don't fail
    try:
        wait_for_port(port, timeout=30)
        url = f"http://127.0.0.1:{port}/metrics"
        assert not [k for k in scrape(url) if k[0] == "sensorfleet_forecast_mae"]
        write(reports / "demo" / "metrics.json", report("demo", "2026-11-24T10:00:00+00:00", mae=0.5))
        write(reports / "broken" / "metrics.json", "{truncated")
        samples = scrape(url)
        assert samples[("sensorfleet_forecast_mae", (("fleet", "demo"), ("model", "Harmonic")))] == 0.5
        assert samples[("sensorfleet_forecast_mase", (("fleet", "demo"), ("model", "SeasonalNaive")))] == 1.06
        assert samples[("sensorfleet_forecast_anomalies_flagged", (("fleet", "demo"), ("model", "Harmonic")))] == 22
        assert samples[("sensorfleet_forecast_last_success_timestamp_seconds", (("fleet", "demo"),))] == pytest.approx(unix('2026-11-24T10:00:00+00:00'))
        assert samples[("sensorfleet_forecast_invalid_reports", ())] == 1
        # A new run rewrites the report: the next scrape shows it.
        time.sleep(0.01)
        write(reports / "demo" / "metrics.json", report("demo", "2026-11-24T11:00:00+00:00", mae=0.3))
        assert scrape(url)[("sensorfleet_forecast_mae", (("fleet", "demo"), ("model", "Harmonic")))] == 0.3
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0


def test_exporter_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    port = free_port()
    first = exporter(tmp_path, port, tmp_path)
    try:
        wait_for_port(port, timeout=30)
        second = subprocess.run([sys.executable, "-m", "sensorfleet.forecast_metrics", "--reports", str(tmp_path), "--host", "127.0.0.1", "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"metrics port 127.0.0.1:{port} is not available" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(15)


def test_push_to_a_real_pushgateway(tmp_path: Path) -> None:
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    assert binary, "the Pushgateway is not installed (apt-get install prometheus-pushgateway; .ci/run does)"
    port = free_port()
    log = (tmp_path / "pushgateway.log").open("ab")
    gateway = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, timeout=30)
        out = tmp_path / "out"
        write(out / "metrics.json", report("demo", "2026-11-24T10:00:00+00:00", mae=0.5))
        assert push_from_env(out, "demo", environ={}) is False  # not configured: nothing to do
        env = {PUSHGATEWAY_ENV: f"http://127.0.0.1:{port}"}
        assert push_from_env(out, "demo", environ=env) is True
        url = f"http://127.0.0.1:{port}/metrics"
        group = (("fleet", "demo"), ("instance", ""), ("job", "sensorfleet-forecast"))

        def pushed(name: str, *extra: tuple[str, str]) -> float | None:
            return scrape(url).get((name, tuple(sorted(group + extra))))

        assert pushed("sensorfleet_forecast_mae", ("model", "Harmonic")) == 0.5
        assert pushed("sensorfleet_forecast_last_success_timestamp_seconds") == pytest.approx(unix('2026-11-24T10:00:00+00:00'))
        # A failed run adds its time and keeps the last success's figures.
        before = time.time()
        assert push_from_env(None, "demo", failed=True, environ=env) is True
        assert pushed("sensorfleet_forecast_last_failure_timestamp_seconds") >= before - 1
        assert pushed("sensorfleet_forecast_mae", ("model", "Harmonic")) == 0.5
        # The next success replaces the group: the failure is gone, so the alert clears.
        assert push_from_env(out, "demo", environ=env) is True
        wait_until(lambda: pushed("sensorfleet_forecast_last_failure_timestamp_seconds") is None, timeout=5, message="the failure to be replaced")
        # A gateway that does not answer is a warning, not a failed forecast job.
        assert push_from_env(out, "demo", environ={PUSHGATEWAY_ENV: f"http://127.0.0.1:{free_port()}"}) is False
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(15)


def test_the_forecast_command_pushes_success_and_failure(tmp_path: Path) -> None:
    """`sensorfleet forecast` itself pushes: its figures after a success, a failure time after a
    user error — so the ForecastFailing alert sees the CronJob's outcome."""
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    assert binary, "the Pushgateway is not installed (apt-get install prometheus-pushgateway; .ci/run does)"
    port = free_port()
    log = (tmp_path / "pushgateway.log").open("ab")
    gateway = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    example = Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml"
    env = {**os.environ, PUSHGATEWAY_ENV: f"http://127.0.0.1:{port}"}
    cli = [sys.executable, "-m", "sensorfleet.cli"]
    try:
        wait_for_port(port, timeout=30)
        data = tmp_path / "data"
        subprocess.run([*cli, "generate", str(example), "--days", "3", "--interval", "60", "--devices", "2", "--protocol", "mqtt", "--data", str(data), "--quiet"], check=True, capture_output=True, timeout=300)
        ok = subprocess.run([*cli, "forecast", "--data", str(data), "--out", str(tmp_path / "out"), "--fleet", str(example), "--horizon", "30", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
        assert ok.returncode == 0, ok.stderr[-2000:]
        url = f"http://127.0.0.1:{port}/metrics"
        success = [v for (name, labels), v in scrape(url).items() if name == "sensorfleet_forecast_last_success_timestamp_seconds" and ("fleet", "demo") in labels]
        assert success and success[0] > time.time() - 600
        failed = subprocess.run([*cli, "forecast", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "out2"), "--fleet", str(example), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
        assert failed.returncode == 2
        failures = [v for (name, labels), v in scrape(url).items() if name == "sensorfleet_forecast_last_failure_timestamp_seconds" and ("fleet", "demo") in labels]
        assert failures and failures[0] > time.time() - 600
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(15)
