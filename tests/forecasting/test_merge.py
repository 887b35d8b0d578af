"""Sharded forecasting: `forecast --jobs N` (N processes + merge) and `--shard i/N
--merge-when-done` (the Indexed Job's pods) write the same outputs as one run over every series."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import typer
from typer.testing import CliRunner

# Differ by nature between two runs (or name the sharding itself).
VOLATILE = ("options", "timings_s", "peak_rss_mb", "shards")


def comparable(metrics: dict) -> dict:
    kept = {k: v for k, v in metrics.items() if k not in VOLATILE}
    kept["headline"] = {k: v for k, v in metrics["headline"].items() if k != "generated_at"}
    return kept


def assert_same_outputs(merged: Path, single: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(merged / "forecasts.parquet"), pd.read_parquet(single / "forecasts.parquet"))
    pd.testing.assert_frame_equal(pd.read_csv(merged / "metrics_by_series.csv"), pd.read_csv(single / "metrics_by_series.csv"))
    assert comparable(json.loads((merged / "metrics.json").read_text())) == comparable(json.loads((single / "metrics.json").read_text()))
    pictures = sorted(p.name for p in single.iterdir() if p.suffix in (".png", ".gif", ".mp4"))
    assert pictures and sorted(p.name for p in merged.iterdir() if p.suffix in (".png", ".gif", ".mp4")) == pictures
    for name in pictures:  # the same series drawn from the same numbers: the same pixels
        assert (merged / name).read_bytes() == (single / name).read_bytes(), name


def test_jobs_over_shards_equal_one_run(dataset: Path, fleet_file: Path, forecast_out: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner) -> None:
    out = tmp_path / "jobs"
    result = runner.invoke(app, ["forecast", "--data", str(dataset), "--out", str(out), "--fleet", str(fleet_file), "--seed", "3", "--jobs", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert_same_outputs(out, forecast_out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["options"]["shards"] == 2 and sum(s["series"] for s in metrics["shards"].values()) == 6
    assert "Forecast report" in (out / "report.html").read_text()


def test_the_last_shard_to_finish_merges(dataset: Path, fleet_file: Path, forecast_out: Path, tmp_path: Path, app: typer.Typer, runner: CliRunner) -> None:
    """Six shards of six series, as six pods of an Indexed Job would run them: two shards are
    empty (crc32 mod 6 of the ids), the others hold one to three series."""
    out = tmp_path / "pods"
    common = ["forecast", "--data", str(dataset), "--out", str(out), "--fleet", str(fleet_file), "--seed", "3", "--merge-when-done", "--quiet"]
    # A stale shard of an earlier run with another N is ignored.
    stale = runner.invoke(app, [*common, "--shard", "2/3", "--run-id", "earlier"])
    assert stale.exit_code == 0, stale.output
    for index in (5, 4, 3, 2, 1):
        result = runner.invoke(app, [*common, "--shard", f"{index}/6", "--run-id", "job-7"])
        assert result.exit_code == 0 and "last shard to finish" in result.output, result.output
        assert not (out / "metrics.json").exists()
    assert json.loads((out / "shards" / "4" / "shard.json").read_text())["empty"] is True
    last = runner.invoke(app, [*common, "--shard", "0/6", "--run-id", "job-7"])
    assert last.exit_code == 0, last.output
    assert_same_outputs(out, forecast_out)
    assert json.loads((out / "metrics.json").read_text())["options"]["shards"] == 6
    # `forecast-merge` merges the same shards again, and names a missing one.
    again = runner.invoke(app, ["forecast-merge", "--out", str(tmp_path / "again"), "--shards", str(out / "shards"), "--run-id", "job-7", "--quiet"])
    assert again.exit_code == 0, again.output
    assert_same_outputs(tmp_path / "again", forecast_out)
    shutil.rmtree(out / "shards" / "1")
    missing = runner.invoke(app, ["forecast-merge", "--out", str(tmp_path / "x"), "--shards", str(out / "shards"), "--run-id", "job-7", "--quiet"])
    assert missing.exit_code == 2 and "1/6" in missing.output, missing.output
