"""`sensorfleet forecast --shard i/N`: hash shards of the series that together cover the dataset once."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import typer
from typer.testing import CliRunner


def test_shards_partition_the_series_and_are_stable(dataset: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner) -> None:
    seen = []
    for i in range(2):
        out = tmp_path / f"shard{i}"
        result = runner.invoke(app, ["forecast", "--data", str(dataset), "--out", str(out), "--shard", f"{i}/2", "--quiet"])
        assert result.exit_code == 0, result.output
        table = pd.read_parquet(out / "forecasts.parquet", columns=["unique_id"])
        seen.append(set(table["unique_id"]))
        assert json.loads((out / "metrics.json").read_text())["options"]["shard"] == f"{i}/2"
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 6  # every series of the dataset, once
    again = runner.invoke(app, ["forecast", "--data", str(dataset), "--out", str(tmp_path / "again"), "--shard", "0/2", "--quiet"])
    assert again.exit_code == 0 and set(pd.read_parquet(tmp_path / "again" / "forecasts.parquet", columns=["unique_id"])["unique_id"]) == seen[0]


def test_a_bad_shard_is_named(dataset: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner) -> None:
    for bad in ("2/2", "x/3", "1"):
        result = runner.invoke(app, ["forecast", "--data", str(dataset), "--out", str(tmp_path / "o"), "--shard", bad, "--quiet"])
        assert result.exit_code == 2 and "--shard" in result.output, result.output
