"""Fixtures of the forecasting tests: one small generated dataset (6 series x 4 days at 1 minute)
and one full `sensorfleet forecast` run over it, shared by the tests that check its outputs."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from sensorfleet.events import EventWriter
from sensorfleet.forecasting.cli import register

START = "2026-11-01"
FLEET = {
    "apiVersion": "sensorfleet.io/v1alpha1",
    "kind": "SensorFleet",
    "metadata": {"name": "forecast-test"},
    "spec": {
        "seed": 7,
        "protocols": {"mqtt": {"devices": 2, "interval": 60}, "coap": {"enabled": False}, "opcua": {"enabled": False}},
        # More anomalies than the defaults, so that 6 series x 4 days hold every kind.
        "anomalies": {"spikeProbability": 0.003, "stuckProbability": 0.01, "dropoutProbability": 0.003},
        # The plain signal (daily cycle + drift + noise): these tests check that the pipeline finds
        # a model's own family; how models fare on the realistic default signal is bench_forecast's.
        "realism": {"enabled": False},
        "forecasting": {"horizon": 60, "level": 95},
    },
}


DEVICE_EVENTS = [
    {"fleet": "forecast-test", "device": "mqtt-00000", "ts": datetime(2026, 11, 4, 12, tzinfo=timezone.utc), "action": "setpoint",
     "sensor": "temperature", "value": 24.5, "message": "mqtt-00000: temperature setpoint 24.5 degC"},
    {"fleet": "forecast-test", "device": "mqtt-00001", "ts": datetime(2026, 11, 4, 18, tzinfo=timezone.utc), "action": "fault",
     "fault": "level_shift", "duration": 600.0, "message": "mqtt-00001: InjectFault(level_shift, 600 s)"},
]


def cli_app() -> typer.Typer:
    """A throwaway app with only our commands, as the `sensorfleet` app gets them."""
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    register(app)

    @app.command("version")
    def version() -> None:  # a second command so typer keeps subcommand names
        print("test")

    return app


@pytest.fixture(scope="session")
def app() -> typer.Typer:
    return cli_app()


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def fleet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    path.write_text(yaml.safe_dump(FLEET))
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory, fleet_file: Path, app: typer.Typer, runner: CliRunner) -> Path:
    data = tmp_path_factory.mktemp("data") / "dataset"
    result = runner.invoke(app, ["generate", str(fleet_file), "--days", "4", "--data", str(data), "--start", START, "--quiet"])
    assert result.exit_code == 0, result.output
    # Two device events beside the readings, as a two-way OPC UA collector stores them: the report
    # lists them (they do not change the generated readings).
    EventWriter(str(data), "mqtt", "test").write(DEVICE_EVENTS)
    return data


@pytest.fixture(scope="session")
def forecast_out(tmp_path_factory: pytest.TempPathFactory, dataset: Path, fleet_file: Path, app: typer.Typer, runner: CliRunner) -> Path:
    out = tmp_path_factory.mktemp("forecast") / "out"
    result = runner.invoke(app, ["forecast", "--data", str(dataset), "--out", str(out), "--fleet", str(fleet_file), "--seed", "3", "--quiet",
                                 "--termination-message", str(out.parent / "termination-log")])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def start() -> datetime:
    """First moment of the generated dataset."""
    return datetime.fromisoformat(START).replace(tzinfo=timezone.utc)


@pytest.fixture(scope="session")
def fleet_document() -> dict:
    return FLEET
