"""`sensorfleet forecast` end to end on a dataset from the real signal model: accuracy against the
baseline, the outputs a user opens, and the one-line errors for bad input."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from sensorfleet.dataset import DatasetWriter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which must directly follow the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_default_model_beats_seasonal_naive(forecast_out: Path) -> None:
    metrics = json.loads((forecast_out / "metrics.json").read_text())
    head = metrics["headline"]
    assert head["model"] == "Harmonic" and head["baseline"] == "SeasonalNaive"
    models = metrics["holdout"]["models"]
    # Every series here has a daily cycle: the harmonic model must beat last-day's values clearly,
    # on the hold-out and on the pooled rolling-origin windows, and on every single series.
    assert models["Harmonic"]["mase"] < 0.85 * models["SeasonalNaive"]["mase"]
    assert metrics["cv"]["models"]["Harmonic"]["mase_vs_baseline"] < 0.85
    assert models["Harmonic"]["beats_baseline_share"] == 1.0
    assert head["mase"] == models["Harmonic"]["mase"] and head["mase_vs_baseline"] < 0.85
    assert metrics["holdout"]["series"] == 6 and metrics["cv"]["windows"] == 3
    for key in ("mae", "mase", "anomalies_flagged", "generated_at"):
        assert head[key] is not None


def test_forecasts_parquet_holds_every_window(forecast_out: Path) -> None:
    table = pq.read_table(forecast_out / "forecasts.parquet").to_pandas()
    assert {"unique_id", "protocol", "device", "sensor", "window", "ds", "y", "y_raw", "truth", "Harmonic", "Harmonic-lo-95", "Harmonic-hi-95", "SeasonalNaive", "anomaly_flag"} <= set(table.columns)
    assert table.groupby("window").size().to_dict() == {"cv1": 360, "cv2": 360, "cv3": 360, "test": 360, "future": 360}
    future = table[table["window"] == "future"]
    assert future["y"].isna().all() and future["Harmonic"].notna().all()
    assert future["ds"].min() == pd.Timestamp("2026-11-05", tz="UTC")
    assert (table["Harmonic-lo-95"] < table["Harmonic"]).all() and (table["Harmonic"] < table["Harmonic-hi-95"]).all()


def test_anomaly_flags_are_scored_against_ground_truth(forecast_out: Path) -> None:
    metrics = json.loads((forecast_out / "metrics.json").read_text())
    flags = metrics["anomalies"]["scored_windows"]
    table = pq.read_table(forecast_out / "forecasts.parquet").to_pandas()
    scored = table[table["window"] != "future"]
    outside = scored["y_raw"].notna() & ((scored["y_raw"] < scored["Harmonic-lo-95"]) | (scored["y_raw"] > scored["Harmonic-hi-95"]))
    assert flags["flagged"] == int(outside.sum()) == int(scored["anomaly_flag"].sum())
    injected = scored["truth"].isin(["spike", "stuck"]) & scored["y_raw"].notna()
    assert flags["injected"] == int(injected.sum())
    assert flags["true_positives"] == int((outside & injected).sum())
    if flags["by_kind"]["spike"]["injected"]:
        # Spikes are 8 noise sigmas: a 95 % interval must catch nearly all of them.
        assert flags["by_kind"]["spike"]["recall"] >= 0.8
    assert metrics["headline"]["anomalies_flagged"] == int(table.loc[table["window"] == "test", "anomaly_flag"].sum())


def test_plots_are_png_and_the_report_shows_them(forecast_out: Path) -> None:
    pngs = sorted(p.name for p in forecast_out.glob("*.png"))
    assert pngs == ["error_distribution.png", "forecast_vs_actual.png", "overview_mqtt.png", "residuals_over_time.png", "rolling_statistics.png", "train_test_split.png"]
    for name in pngs:
        path = forecast_out / name
        width, height = png_size(path)
        assert width >= 400 and height >= 200 and path.stat().st_size > 5_000, name
    html = (forecast_out / "report.html").read_text()
    referenced = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(referenced) == sorted([*pngs, "animation.gif"])  # the animation: tests/forecasting/test_animation.py
    assert "http://" not in html and "https://" not in html and "<script" not in html  # offline
    assert "Harmonic" in html and "SeasonalNaive" in html and "mase_vs_baseline" in html


def test_the_report_lists_the_device_events_beside_the_dataset(forecast_out: Path) -> None:
    metrics = json.loads((forecast_out / "metrics.json").read_text())
    events = metrics["device_events"]
    assert events["count"] == 2 and events["by_action"] == {"setpoint": 1, "fault": 1}
    assert [(e["device"], e["action"], e["sensor"], e["value"], e["fault"]) for e in events["rows"]] == [
        ("mqtt-00000", "setpoint", "temperature", 24.5, None), ("mqtt-00001", "fault", None, None, "level_shift")]
    html = (forecast_out / "report.html").read_text()
    assert "<h2>Device events</h2>" in html
    assert "<td>mqtt/mqtt-00000</td><td>setpoint</td><td>temperature</td><td>24.5</td>" in html
    assert "<td>mqtt/mqtt-00001</td><td>fault</td><td></td><td></td><td>level_shift</td><td>600</td>" in html


def test_fleet_spec_supplies_defaults_and_flags_override(dataset: Path, fleet_file: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner) -> None:
    from sensorfleet.forecasting.pipeline import ForecastOptions
    from sensorfleet.spec import load_fleet

    fleet = load_fleet(fleet_file)
    options = ForecastOptions.from_fleet(fleet, data=str(dataset), out=tmp_path, horizon=30, model=None, level=None)
    assert (options.horizon, options.model, options.level, options.fleet) == (30, "auto", 95, "forecast-test")


def _write_bad_dataset(root: Path, table: pa.Table) -> None:
    directory = root / "protocol=mqtt" / "date=2026-11-01"
    directory.mkdir(parents=True)
    pq.write_table(table, directory / "part-0.parquet")


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("empty", [], "the dataset is empty"),
        ("missing-columns", [], "missing column(s) value"),
        ("one-value", ["--cv-windows", "1"], "series mqtt/mqtt-09999/temperature has 1 value(s)"),
        ("good", ["--horizon", "0"], "--horizon: must be >= 1"),
        ("good", ["--horizon", "4000"], "--window-days 7: the window holds at most 10080 steps"),
        ("good", ["--model", "prophet"], "unknown model 'prophet'"),
        ("good", ["--level", "20"], "--level"),
    ],
)
def test_user_errors_are_one_clear_line_and_exit_2(case: str, args: list[str], message: str, dataset: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner) -> None:
    data = tmp_path / "data"
    if case == "good":
        data = dataset
    elif case == "missing-columns":
        _write_bad_dataset(data, pa.table({"device": ["d"], "sensor": ["t"], "ts": pa.array([0], pa.timestamp("us", tz="UTC"))}))
    elif case == "one-value":
        # Two good days of the 6 series, and one reading of a seventh.
        for day in ("2026-11-01", "2026-11-02"):
            shutil.copytree(dataset / "protocol=mqtt" / f"date={day}", data / "protocol=mqtt" / f"date={day}")
        one = pq.read_table(next((dataset / "protocol=mqtt" / "date=2026-11-02").glob("*/*.parquet"))).slice(0, 1)
        DatasetWriter(str(data), "mqtt").write_table(one.set_column(one.schema.get_field_index("device"), "device", pa.array(["mqtt-09999"])))
    result = runner.invoke(app, ["forecast", "--data", str(data), "--out", str(tmp_path / "out"), "--quiet", *args])
    output = result.output  # stdout and stderr together, as a terminal shows them
    assert result.exit_code == 2, output
    assert message in output
    assert "Traceback" not in output and (result.exception is None or isinstance(result.exception, SystemExit))
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error"), output


def test_generate_refuses_bad_arguments(fleet_file: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner) -> None:
    for args, message in ((["--days", "0"], "--days: must be > 0"), (["--start", "yesterday"], "--start: expected an ISO date"), (["--protocol", "zigbee"], "unknown protocol 'zigbee'")):
        result = runner.invoke(app, ["generate", str(fleet_file), "--data", str(tmp_path / "d"), "--quiet", *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_a_dataset_of_a_few_minutes_waits_for_data_and_exits_0(fleet_file: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner) -> None:
    """A new fleet's forecast: minutes of data are not a failure; the outcome says what is missing,
    on stdout and in the termination message the operator reads into status.lastForecast."""
    from sensorfleet.operator.status import last_forecast

    data = tmp_path / "young"
    made = runner.invoke(app, ["generate", str(fleet_file), "--days", "0.005", "--data", str(data), "--quiet"])  # 7.2 minutes
    assert made.exit_code == 0, made.output
    message = tmp_path / "termination-log"
    result = runner.invoke(app, ["forecast", "--data", str(data), "--out", str(tmp_path / "out"), "--fleet", str(fleet_file),
                                 "--quiet", "--termination-message", str(message)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and re.match(r"waiting for data: have [78] steps of 1min, need 1681 \(", lines[0]), result.output
    assert not (tmp_path / "out" / "metrics.json").exists()  # no report of a forecast that was not made
    outcome = json.loads(message.read_text())
    assert outcome["reason"] == "WaitingForData" and outcome["needSteps"] == 1681 and outcome["message"] == lines[0]
    # What the operator makes of that pod's termination message: a succeeded job, no forecast time.
    job = {"metadata": {"name": "f-1"}, "status": {"succeeded": 1, "completionTime": "2026-01-01T01:00:00Z"}}
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {"message": message.read_text()}}}]}}
    assert last_forecast([job], {"f-1": [pod]}) == {"job": "f-1", "result": "Succeeded", "reason": "WaitingForData", "message": lines[0]}


def test_an_empty_dataset_is_an_error_unless_waiting_for_data(tmp_path: Path, app: typer.Typer, runner: CliRunner) -> None:
    data = tmp_path / "data"
    data.mkdir()  # a fresh claim: the collectors have written nothing yet
    args = ["forecast", "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"]
    assert runner.invoke(app, args).exit_code == 2  # a user who named the wrong folder hears it
    waiting = runner.invoke(app, [*args, "--wait-for-data"])
    assert waiting.exit_code == 0, waiting.output
    assert waiting.output.startswith("waiting for data: have 0 steps of 1min, need 1681 (no readings in ")


def test_a_forecast_writes_its_headline_as_the_termination_message(forecast_out: Path) -> None:
    from sensorfleet.operator.status import last_forecast

    message = forecast_out.parent / "termination-log"
    head = json.loads((forecast_out / "metrics.json").read_text())["headline"]
    outcome = json.loads(message.read_text())
    assert outcome == {"reason": "Forecast", "headline": f"Harmonic MASE {head['mase']:.3g} ({head['mase_vs_baseline']:.3g}x SeasonalNaive), 6 series"}
    job = {"metadata": {"name": "f-2"}, "status": {"succeeded": 1, "completionTime": "2026-01-01T02:00:00Z"}}
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {"message": message.read_text()}}}]}}
    assert last_forecast([job], {"f-2": [pod]}) == {"job": "f-2", "result": "Succeeded", "time": "2026-01-01T02:00:00Z",
                                                   "reason": "Forecast", "headline": outcome["headline"]}


def test_a_termination_message_that_cannot_be_written_does_not_fail_the_forecast(forecast_out: Path, dataset: Path, fleet_file: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner) -> None:
    """Outside a pod there is no writable /dev/termination-log: the forecast stands, with a warning."""
    unwritable = tmp_path / "no-such-folder" / "termination-log"
    result = runner.invoke(app, ["forecast", "--data", str(dataset), "--out", str(tmp_path / "out"), "--fleet", str(fleet_file),
                                 "--quiet", "--termination-message", str(unwritable)])
    assert result.exit_code == 0, result.output
    assert f"warning --termination-message {unwritable}" in result.output
    assert (tmp_path / "out" / "report.html").exists()
