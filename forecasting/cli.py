"""`sensorfleet generate` and `sensorfleet forecast`, added to the main typer app by `register(app)`.

Imports of pandas, statsforecast and matplotlib happen inside the commands, so that every other
`sensorfleet` subcommand starts without paying for them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)
out = Console()


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load_fleet(path: Path):
    from sensorfleet.spec import FleetSpecError, load_fleet

    try:
        return load_fleet(path)
    except FleetSpecError as exc:
        for line in exc.errors:
            err.print(f"[red]error[/red] {exc.source}: {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def generate(
    fleet: Annotated[Path, typer.Argument(help="SensorFleet manifest (YAML) whose devices, sensors, anomalies and seed are used.", show_default=False)],
    days: Annotated[float, typer.Option("--days", "-d", help="Days of readings to write.")] = 7.0,
    data: Annotated[str, typer.Option("--data", help="Dataset directory or fsspec URL to write into.")] = "data",
    start: Annotated[Optional[str], typer.Option("--start", help="First moment (ISO date or date-time, UTC); default: midnight UTC DAYS days ago.", show_default=False)] = None,
    interval: Annotated[Optional[float], typer.Option("--interval", help="Seconds between readings of a device, for every protocol (default: each protocol's spec interval).", show_default=False)] = None,
    protocol: Annotated[Optional[list[str]], typer.Option("--protocol", "-p", help="Only these protocols (repeatable; default: the enabled ones).", show_default=False)] = None,
    devices: Annotated[Optional[int], typer.Option("--devices", help="Override every protocol's device count.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Override spec.seed of the signal model.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Write the dataset a fleet would have collected over DAYS days, straight from the signal model
    (same schema and Parquet layout as the collectors; injected anomalies in the `anomaly` column)."""
    from rich.progress import Progress

    from sensorfleet.forecasting.generate import generate_dataset, parse_start

    spec_fleet = _load_fleet(fleet)
    if seed is not None:
        if not 0 <= seed <= 2**31 - 1:
            raise _fail(f"--seed: must be between 0 and {2**31 - 1}, got {seed}")
        spec_fleet = spec_fleet.model_copy(update={"spec": spec_fleet.spec.model_copy(update={"seed": seed})})
    if devices is not None and devices < 1:
        raise _fail(f"--devices: must be >= 1, got {devices}")
    try:
        begin = parse_start(start) if start else None
        with Progress(console=err, transient=True, disable=quiet) as bar:
            task = bar.add_task("generating readings", total=None)
            summary = generate_dataset(
                spec_fleet, data, days, start=begin, interval=interval, protocols=protocol, devices=devices,
                on_chunk=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"--data {data}: {exc}") from None
    table = Table(title=f"generated {spec_fleet.name}: {summary.start:%Y-%m-%d %H:%M} to {summary.end:%Y-%m-%d %H:%M} UTC")
    for column in ("protocol", "series", "readings", "files"):
        table.add_column(column, justify="right")
    for name in summary.rows:
        table.add_row(name, f"{summary.series[name]:,}", f"{summary.rows[name]:,}", str(summary.files[name]))
    out.print(table)
    out.print("injected anomalies: " + ", ".join(f"{k} {v:,}" for k, v in summary.anomalies.items()) + f"; dataset: {data}", highlight=False)


def forecast(
    data: Annotated[str, typer.Option("--data", help="Dataset directory or fsspec URL (as written by the collectors or `generate`).")] = "data",
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Directory or fsspec URL (e.g. s3://bucket/fleet/_reports) for forecasts.parquet, metrics.json, plots and report.html.")] = "out",
    horizon: Annotated[Optional[int], typer.Option("--horizon", help="Steps to forecast (default: spec.forecasting.horizon or 60).", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="auto|harmonic|mstl|autoets|seasonalnaive|timegpt (default: auto = harmonic).", show_default=False)] = None,
    fleet: Annotated[Optional[Path], typer.Option("--fleet", "-f", help="SensorFleet manifest: defaults from its spec.forecasting.", show_default=False)] = None,
    level: Annotated[Optional[int], typer.Option("--level", help="Prediction-interval level in percent; readings outside are flagged (default 95).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every random choice (series sampled for the plots).")] = 0,
    frequency: Annotated[Optional[str], typer.Option("--frequency", help="Resampling frequency, e.g. 1min, 15s, 1h (default 1min).", show_default=False)] = None,
    window_days: Annotated[Optional[float], typer.Option("--window-days", help="Days of history read (default 7).", show_default=False)] = None,
    cv_windows: Annotated[int, typer.Option("--cv-windows", help="Rolling-origin cross-validation windows before the hold-out.")] = 3,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Forecast the series as N hash shards in N processes, then merge them into one report in OUT (shards in OUT/shards/<i>).")] = 1,
    protocol: Annotated[Optional[list[str]], typer.Option("--protocol", "-p", help="Only these protocols (repeatable).", show_default=False)] = None,
    drop_short: Annotated[bool, typer.Option("--drop-short", help="Skip series too short for the horizon instead of failing.")] = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Only the hash shard i/N of the series (crc32 of protocol/device/sensor mod N), e.g. 0/4.", show_default=False)] = None,
    wait_for_data: Annotated[bool, typer.Option("--wait-for-data", help="An empty dataset is young (waiting, exit 0), not an error: for a fleet's CronJob whose collectors may not have written yet.")] = False,
    termination_message: Annotated[Optional[Path], typer.Option("--termination-message", help="Also write the outcome as one JSON object to this file (a pod's terminationMessagePath: the operator reads it into status.lastForecast).", show_default=False)] = None,
    merge_when_done: Annotated[bool, typer.Option("--merge-when-done", help="With --shard: write the shard to OUT/shards/<i>; the shard that finds all N complete merges them into OUT (the Indexed Job's pods).")] = False,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="With --merge-when-done: the id shared by the shards of one run (e.g. the Job's name); shards of other runs are not merged.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Forecast every series of the dataset, score the forecasts (hold-out and rolling-origin CV
    against SeasonalNaive), flag readings outside the prediction interval, and write the report."""
    from sensorfleet.forecasting.destination import is_remote, staged

    if jobs < 1:
        raise _fail(f"--jobs: must be >= 1, got {jobs}")
    if jobs > 1 and shard is not None:
        raise _fail("--jobs: runs every shard itself; leave out --shard (or --jobs for one shard)")
    if merge_when_done and shard is None:
        raise _fail("--merge-when-done: needs --shard i/N")
    if merge_when_done and is_remote(out_dir):
        raise _fail(f"--out {out_dir}: --merge-when-done needs a folder every shard's pod shares (a claim); "
                    "an object-store URL takes one pod (spec.forecasting.parallelism: 1) or --jobs N in one pod")
    spec_fleet = _load_fleet(fleet) if fleet else None
    with staged(out_dir) as (folder, publish):
        _forecast(spec_fleet, data, folder, out_dir, publish, horizon=horizon, model=model, level=level, seed=seed,
                  frequency=frequency, window_days=window_days, cv_windows=cv_windows, jobs=jobs, protocol=protocol,
                  drop_short=drop_short, shard=shard, wait_for_data=wait_for_data, termination_message=termination_message,
                  merge_when_done=merge_when_done, run_id=run_id, quiet=quiet)


def _forecast(spec_fleet, data: str, out_dir: Path, destination: str, publish: Callable[[], list[str]], *, horizon, model, level, seed, frequency,
              window_days, cv_windows, jobs, protocol, drop_short, shard, wait_for_data, termination_message,
              merge_when_done, run_id, quiet) -> None:
    from sensorfleet.forecasting.errors import ForecastInputError, NotEnoughData
    from sensorfleet.forecasting.fanout import run_jobs, run_shard_then_merge
    from sensorfleet.forecasting.pipeline import ForecastOptions, Progress, headline_text, outcome_message, run_forecast

    options = ForecastOptions.from_fleet(
        spec_fleet, data=data, out=out_dir, horizon=horizon, model=model, level=level, frequency=frequency, window_days=window_days,
        cv_windows=cv_windows, seed=seed, protocols=protocol, drop_short=drop_short, shard=shard, run_id=run_id,
        wait_for_data=wait_for_data,
    )

    def report_outcome(reason: str, **fields: object) -> None:
        if termination_message is None:
            return
        try:
            termination_message.write_text(outcome_message(reason, **fields))
        except OSError as exc:  # e.g. /dev/termination-log outside a pod: the forecast itself stands
            err.print(f"[yellow]warning[/yellow] --termination-message {termination_message}: {exc.strerror or exc}", highlight=False, soft_wrap=True)

    from sensorfleet.forecast_metrics import push_from_env

    fleet_name = spec_fleet.name if spec_fleet else None
    try:
        options.check()
        if jobs > 1:
            run = run_jobs(options, jobs, Progress(enabled=not quiet))
        elif merge_when_done:
            merged = run_shard_then_merge(options, Progress(enabled=not quiet))
            if merged is None:
                # No termination message: the pod that merges reports the run's outcome.
                out.print(f"shard {shard} written to {out_dir / 'shards'}; the last shard to finish writes the merged report", highlight=False)
                return
            run = merged
        else:
            run = run_forecast(options, Progress(enabled=not quiet))
    except NotEnoughData as young:  # a young dataset: nothing failed, nothing to push
        out.print(str(young), highlight=False, soft_wrap=True)
        report_outcome("WaitingForData", message=str(young), haveSteps=young.have, needSteps=young.need)
        return
    except ForecastInputError as exc:
        push_from_env(None, fleet_name, failed=True)  # a no-op unless SENSORFLEET_PUSHGATEWAY_URL is set
        report_outcome("Failed", message=str(exc))
        raise _fail(str(exc)) from None
    except Exception as exc:  # the TimeGPT service: an HTTP failure is not a bug of ours
        push_from_env(None, fleet_name, failed=True)
        if type(exc).__module__.startswith(("nixtla", "httpx", "tenacity")):
            report_outcome("Failed", message=f"TimeGPT request failed ({type(exc).__name__})")
            raise _fail(f"TimeGPT request failed ({type(exc).__name__}): {exc}", code=1) from None
        raise
    push_from_env(Path(options.out), fleet_name)
    try:
        publish()
    except OSError as exc:
        report_outcome("Failed", message=f"--out {destination}: upload failed: {exc}")
        raise _fail(f"--out {destination}: upload failed: {exc}", code=1) from None
    head = run.metrics["headline"]
    report_outcome("Forecast", headline=headline_text(head))
    table = Table(title=f"forecast: {head['series']} series, horizon {options.horizon}, written to {destination}")
    for column in ("model", "MAE", "MASE", f"MASE / {head['baseline']}", "CV MASE ratio", "anomalies flagged"):
        table.add_column(column, justify="right")

    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    table.add_row(head["model"], show(head["mae"]), show(head["mase"]), show(head["mase_vs_baseline"]), show(head["cv_mase_vs_baseline"]), str(head["anomalies_flagged"]))
    out.print(table)
    out.print(f"report: {destination.rstrip('/')}/report.html", highlight=False)


def forecast_merge(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory the merged forecasts.parquet, metrics.json, plots and report.html are written to.")] = Path("out"),
    shards: Annotated[Optional[Path], typer.Option("--shards", help="Directory of the shard outputs (default OUT/shards).", show_default=False)] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="Merge the shards of this run (default: the newest shard's run).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Merge the outputs of `forecast --shard i/N --merge-when-done` (all N) into one report, the
    same as one run over every series would write."""
    from sensorfleet.forecasting.errors import ForecastInputError
    from sensorfleet.forecasting.fanout import merge_into
    from sensorfleet.forecasting.pipeline import Progress

    try:
        run = merge_into(shards or out_dir / "shards", out_dir, Progress(enabled=not quiet), run_id)
    except ForecastInputError as exc:
        raise _fail(str(exc)) from None
    head = run.metrics["headline"]
    out.print(f"merged {run.metrics['options']['shards']} shards, {head['series']} series: {head['model']} MASE / {head['baseline']} "
              f"{head['mase_vs_baseline']}; report: {out_dir / 'report.html'}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `generate`, `forecast` and `forecast-merge` to the `sensorfleet` app."""
    app.command("generate")(generate)
    app.command("forecast")(forecast)
    app.command("forecast-merge")(forecast_merge)
