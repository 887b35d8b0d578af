"""`sensorfleet compact`: compaction and retention by hand (the fleet's CronJob runs the same)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated, Optional

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    @app.command()
    def compact(
        data: Annotated[str, typer.Option("--data", help="Dataset directory or fsspec URL (s3://bucket/prefix).", show_default=False)],
        retention_days: Annotated[Optional[int], typer.Option(min=1, help="Also drop date partitions older than this many days.")] = None,
        grace_minutes: Annotated[float, typer.Option(min=0, help="An hour is closed this long after it ends (late files).")] = 10.0,
        max_rows_per_file: Annotated[int, typer.Option(min=1000, help="Rows per compacted file at most.")] = 2_000_000,
    ) -> None:
        """Merge the small files of every closed hour into files sorted by device and time
        (atomic, idempotent: killed at any point, a re-run finishes), then apply retention."""
        from sensorfleet.compaction import CompactionError, apply_retention, compact as run_compaction
        from sensorfleet.runtime import setup_logging

        setup_logging()
        logging.getLogger("sensorfleet.compaction").setLevel(logging.INFO)
        out = Console()
        try:
            result = run_compaction(data, grace=timedelta(minutes=grace_minutes), max_rows_per_file=max_rows_per_file)
        except CompactionError as exc:
            Console(stderr=True).print(f"[red]error[/red] {exc}", highlight=False)
            raise typer.Exit(2) from None
        out.print(f"compacted {result.hours_compacted} hour(s): {result.files_in} files -> {result.files_out} "
                  f"({result.rows} readings); {result.recovered} interrupted run(s) finished", highlight=False)
        if retention_days:
            dropped = apply_retention(data, retention_days)
            out.print(f"retention {retention_days} d: dropped {len(dropped)} partition(s)", highlight=False)
