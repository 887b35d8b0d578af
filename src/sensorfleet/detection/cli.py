"""`sensorfleet detect`, added to the main typer app by `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)
out = Console()


def detect(
    data: Annotated[Optional[str], typer.Option("--data", help="Dataset directory or fsspec URL (as written by the collectors or `generate`).", show_default=False)] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="A recording `timestamp,value[,label]` (label 1/0 or a fault kind) instead of a dataset.", show_default=False)] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory for scores.parquet and detect.json.")] = Path("detect"),
    window_days: Annotated[float, typer.Option("--window-days", help="Days of the dataset read (its latest days).")] = 7.0,
    protocol: Annotated[Optional[list[str]], typer.Option("--protocol", "-p", help="Only these protocols (repeatable).", show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Flag readings whose anomaly_score reaches this (0..1).", show_default=False)] = None,
    no_evaluate: Annotated[bool, typer.Option("--no-evaluate", help="Skip NAB scoring even where labels exist.")] = False,
) -> None:
    """Score every reading causally (each score uses only readings up to its own time) with the
    ensemble of residual, stuck-run, shift, variance and gap detectors; with labels (the dataset's
    `anomaly` column or the CSV's `label`), score it the NAB way beside NAB's reference detectors."""
    from sensorfleet.detection.run import DEFAULT_THRESHOLD, DetectInputError, detect as run_detect, read_csv

    if (data is None) == (csv is None):
        err.print("[red]error[/red] give exactly one of --data URL or --csv FILE", highlight=False)
        raise typer.Exit(2)
    chosen = DEFAULT_THRESHOLD if threshold is None else threshold
    if not 0.0 <= chosen <= 1.0:
        err.print(f"[red]error[/red] --threshold: must be between 0 and 1, got {chosen}", highlight=False)
        raise typer.Exit(2)
    try:
        if csv is not None:
            readings = read_csv(csv)
        else:
            from sensorfleet.forecasting.errors import ForecastInputError
            from sensorfleet.forecasting.load import read_readings

            try:
                readings = read_readings(data, window_days, protocol)
            except ForecastInputError as exc:
                raise DetectInputError(str(exc)) from None
        result = run_detect(readings, out_dir, threshold=chosen, evaluate=not no_evaluate)
    except DetectInputError as exc:
        err.print(f"[red]error[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    report = result.report
    out.print(f"scored {report['readings']:,} readings of {report['series']} series "
              f"({report['readings_per_second'] or 0:,.0f} readings/s); {report['flagged']:,} flagged at {chosen:g}; "
              f"written to {out_dir}", highlight=False)
    if "nab" in report:
        table = Table(title=f"NAB scores ({report['nab']['windows']} labelled windows; null = 0, perfect = 100)")
        for column in ("detector", "standard", "reward low FP", "reward low FN"):
            table.add_column(column, justify="right")
        for name, profiles in report["nab"]["detectors"].items():
            table.add_row(name, *(f"{profiles[p]['score']:.1f}" for p in ("standard", "reward_low_fp", "reward_low_fn")))
        out.print(table)
        kinds = Table(title="ensemble per fault kind (standard-profile threshold)")
        for column in ("kind", "events", "recall", "precision"):
            kinds.add_column(column, justify="right")
        for kind, row in report["nab"]["per_kind"].items():
            if not kind.startswith("_"):
                kinds.add_row(kind, str(row["events"]), f"{row['recall']:.2f}", "n/a" if row["precision"] is None else f"{row['precision']:.2f}")
        out.print(kinds)


def register(app: typer.Typer) -> None:
    app.command("detect")(detect)
