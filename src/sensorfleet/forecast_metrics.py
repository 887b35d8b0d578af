"""The forecast job's headline figures as Prometheus metrics.

The forecast job is a CronJob: it runs for a minute and exits, so Prometheus cannot scrape it.
Two ways get its figures to Prometheus (docs/monitoring.md):

* **pull (default)** — `sensorfleet forecast-exporter --reports DIR --port P` serves the newest
  `metrics.json` under DIR, per fleet, on /metrics. It re-reads the files at every scrape (only
  those whose mtime changed), so it needs no schedule of its own and shows a report the moment the
  job has written it. A report that cannot be read is counted, never served as zeros.
* **push (optional)** — when `SENSORFLEET_PUSHGATEWAY_URL` is set, `push_from_env()` pushes the
  same gauges to a Pushgateway at the end of the job (grouping key: job, fleet), and a failed run
  pushes `sensorfleet_forecast_last_failure_timestamp_seconds`.

Metrics (labels `fleet`, and `model` where the figure is per model; the baseline SeasonalNaive is
one of the models):

    sensorfleet_forecast_mae{fleet,model}                    hold-out mean absolute error
    sensorfleet_forecast_mase{fleet,model}                   hold-out mean absolute scaled error
    sensorfleet_forecast_mase_vs_baseline{fleet,model}       MASE / the baseline's MASE (< 1: better)
    sensorfleet_forecast_anomalies_flagged{fleet,model}      readings outside the prediction interval (hold-out)
    sensorfleet_forecast_series{fleet}                       series forecast
    sensorfleet_forecast_last_success_timestamp_seconds{fleet}   when the report was generated
    sensorfleet_forecast_invalid_reports                     metrics.json files that could not be read
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REPORT_NAME = "metrics.json"
PUSHGATEWAY_ENV = "SENSORFLEET_PUSHGATEWAY_URL"
PUSH_JOB = "sensorfleet-forecast"
DEFAULT_PORT = 9470


class ReportShapeError(ValueError):
    """A metrics.json that is not what `sensorfleet forecast` writes; the message names the field."""


@dataclass(frozen=True)
class ModelFigures:
    mae: float | None
    mase: float | None
    mase_vs_baseline: float | None


@dataclass(frozen=True)
class ForecastReport:
    """The headline of one forecast run, as read from its metrics.json."""

    fleet: str
    path: Path
    generated_at: float  # Unix seconds
    model: str  # the model the job chose (the headline)
    models: dict[str, ModelFigures]  # hold-out figures per model, baseline included
    anomalies_flagged: int | None
    series: int | None


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportShapeError(f"{where}: expected a number or null, got {value!r}")
    return float(value) if math.isfinite(value) else None


def _object(doc: Any, key: str, where: str) -> dict[str, Any]:
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, dict):
        raise ReportShapeError(f"{where}.{key}: expected an object, got {type(value).__name__ if value is not None else 'nothing'}")
    return value


def parse_report(doc: Any, path: Path, fleet: str | None = None) -> ForecastReport:
    """A ForecastReport from the parsed metrics.json `doc`.

    The fleet comes from `options.fleet` in the report, else `fleet`, else the report's folder
    name. Raises ReportShapeError naming the first field that is missing or of the wrong type.
    """
    if not isinstance(doc, dict):
        raise ReportShapeError(f"top level: expected an object, got {type(doc).__name__}")
    headline = _object(doc, "headline", "metrics.json")
    model = headline.get("model")
    if not isinstance(model, str) or not model:
        raise ReportShapeError(f"headline.model: expected the model's name, got {model!r}")
    stamp = headline.get("generated_at")
    try:
        generated = datetime.fromisoformat(stamp).timestamp() if isinstance(stamp, str) else None
    except ValueError:
        generated = None
    if generated is None:
        raise ReportShapeError(f"headline.generated_at: expected an ISO 8601 time, got {stamp!r}")
    models: dict[str, ModelFigures] = {}
    holdout = doc.get("holdout")
    if isinstance(holdout, dict) and isinstance(holdout.get("models"), dict):
        for name, figures in holdout["models"].items():
            if not isinstance(figures, dict):
                raise ReportShapeError(f"holdout.models.{name}: expected an object, got {figures!r}")
            where = f"holdout.models.{name}"
            models[name] = ModelFigures(_number(figures.get("mae"), f"{where}.mae"), _number(figures.get("mase"), f"{where}.mase"), _number(figures.get("mase_vs_baseline"), f"{where}.mase_vs_baseline"))
    if model not in models:  # older reports: the headline alone
        models[model] = ModelFigures(_number(headline.get("mae"), "headline.mae"), _number(headline.get("mase"), "headline.mase"), _number(headline.get("mase_vs_baseline"), "headline.mase_vs_baseline"))
    flagged = _number(headline.get("anomalies_flagged"), "headline.anomalies_flagged")
    series = _number(headline.get("series"), "headline.series")
    options = doc.get("options") if isinstance(doc.get("options"), dict) else {}
    name = options.get("fleet") or fleet or path.parent.name
    return ForecastReport(str(name), path, generated, model, models, None if flagged is None else int(flagged), None if series is None else int(series))


def read_report(path: Path, fleet: str | None = None) -> ForecastReport:
    """Read and check one metrics.json (ReportShapeError with the path and field if it is wrong)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportShapeError(f"{path}: not a readable JSON file ({exc})") from None
    try:
        return parse_report(doc, path, fleet)
    except ReportShapeError as exc:
        raise ReportShapeError(f"{path}: {exc}") from None


@dataclass
class ReportFolder:
    """The newest report per fleet under a folder, re-read only when a file changed."""

    root: Path
    fleet: str | None = None  # used when a report does not name its fleet
    _cache: dict[Path, tuple[float, ForecastReport | ReportShapeError]] = field(default_factory=dict)

    def scan(self) -> tuple[dict[str, ForecastReport], list[ReportShapeError]]:
        paths = [self.root] if self.root.is_file() else sorted(self.root.rglob(REPORT_NAME)) if self.root.is_dir() else []
        seen: dict[Path, tuple[float, ForecastReport | ReportShapeError]] = {}
        for path in paths:
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue  # removed between the listing and now
            cached = self._cache.get(path)
            if cached and cached[0] == mtime:
                seen[path] = cached
                continue
            try:
                result: ForecastReport | ReportShapeError = read_report(path, self.fleet)
            except ReportShapeError as exc:
                log.warning("skipping forecast report: %s", exc)
                result = exc
            seen[path] = (mtime, result)
        self._cache = seen
        newest: dict[str, ForecastReport] = {}
        errors = []
        for _, result in seen.values():
            if isinstance(result, ReportShapeError):
                errors.append(result)
            elif result.fleet not in newest or result.generated_at > newest[result.fleet].generated_at:
                newest[result.fleet] = result
        return newest, errors


def metric_families(reports: Iterable[ForecastReport], invalid: int | None = None) -> Iterator[GaugeMetricFamily]:
    """The forecast gauges for these reports (one report per fleet)."""
    mae = GaugeMetricFamily("sensorfleet_forecast_mae", "Hold-out mean absolute error of the newest forecast run, per model.", labels=["fleet", "model"])
    mase = GaugeMetricFamily("sensorfleet_forecast_mase", "Hold-out mean absolute scaled error of the newest forecast run, per model.", labels=["fleet", "model"])
    ratio = GaugeMetricFamily("sensorfleet_forecast_mase_vs_baseline", "Hold-out MASE over the SeasonalNaive baseline's MASE (below 1: better than the baseline).", labels=["fleet", "model"])
    flagged = GaugeMetricFamily("sensorfleet_forecast_anomalies_flagged", "Readings of the hold-out window outside the model's prediction interval.", labels=["fleet", "model"])
    series = GaugeMetricFamily("sensorfleet_forecast_series", "Series the newest forecast run forecast.", labels=["fleet"])
    success = GaugeMetricFamily("sensorfleet_forecast_last_success_timestamp_seconds", "Unix time the newest successful forecast run wrote its report.", labels=["fleet"])
    for report in reports:
        for model, figures in sorted(report.models.items()):
            for family, value in ((mae, figures.mae), (mase, figures.mase), (ratio, figures.mase_vs_baseline)):
                if value is not None:
                    family.add_metric([report.fleet, model], value)
        if report.anomalies_flagged is not None:
            flagged.add_metric([report.fleet, report.model], report.anomalies_flagged)
        if report.series is not None:
            series.add_metric([report.fleet], report.series)
        success.add_metric([report.fleet], report.generated_at)
    yield from (mae, mase, ratio, flagged, series, success)
    if invalid is not None:
        bad = GaugeMetricFamily("sensorfleet_forecast_invalid_reports", "metrics.json files under the reports folder that could not be read (see the exporter's log).")
        bad.add_metric([], invalid)
        yield bad


class ForecastReportCollector(Collector):
    """A prometheus_client collector that reads the reports folder at every scrape."""

    def __init__(self, folder: ReportFolder) -> None:
        self.folder = folder

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reports, errors = self.folder.scan()
        yield from metric_families(sorted(reports.values(), key=lambda r: r.fleet), invalid=len(errors))


def exporter_registry(reports: Path, fleet: str | None = None) -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(ForecastReportCollector(ReportFolder(reports, fleet)))
    return registry


def serve_forecast_metrics(reports: Path, port: int, host: str = "0.0.0.0", fleet: str | None = None):
    """Serve /metrics for the reports under `reports` in a background thread; returns the server.

    A port in use raises OSError naming it."""
    try:
        server, thread = start_http_server(port, addr=host, registry=exporter_registry(reports, fleet))
    except OSError as exc:
        raise OSError(exc.errno, f"metrics port {host}:{port} is not available ({exc.strerror})") from None
    return server, thread


# --- push ---------------------------------------------------------------------------------------


def push_report(gateway: str, report: ForecastReport, timeout: float = 10.0) -> None:
    """Push one report's gauges to a Pushgateway (grouping key job=sensorfleet-forecast, fleet)."""
    from prometheus_client import push_to_gateway

    registry = CollectorRegistry()

    class _Once(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            yield from metric_families([report])

    registry.register(_Once())
    # push (PUT) replaces the group: figures of a model no longer run disappear. The failure
    # timestamp lives in the same group, so a successful run also clears an earlier failure.
    push_to_gateway(gateway, job=PUSH_JOB, grouping_key={"fleet": report.fleet}, registry=registry, timeout=timeout)


def push_failure(gateway: str, fleet: str, when: float, timeout: float = 10.0) -> None:
    """Record a failed run: sets sensorfleet_forecast_last_failure_timestamp_seconds, keeps the
    last success's figures (POST adds to the group instead of replacing it)."""
    from prometheus_client import Gauge, pushadd_to_gateway

    registry = CollectorRegistry()
    gauge = Gauge("sensorfleet_forecast_last_failure_timestamp_seconds", "Unix time of the last failed forecast run.", ["fleet"], registry=registry)
    gauge.labels(fleet).set(when)
    pushadd_to_gateway(gateway, job=PUSH_JOB, grouping_key={"fleet": fleet}, registry=registry, timeout=timeout)


def push_from_env(out: Path | None, fleet: str | None, *, failed: bool = False, environ: Mapping[str, str] = os.environ) -> bool:
    """What the forecast job calls at its end: push to $SENSORFLEET_PUSHGATEWAY_URL if it is set.

    `out` is the job's output folder (its metrics.json is pushed); with `failed=True` a failure is
    recorded for `fleet` instead. Returns whether anything was pushed. A Pushgateway that does not
    answer is logged, never turns a successful forecast into a failed job.
    """
    import time

    gateway = environ.get(PUSHGATEWAY_ENV, "").strip()
    if not gateway:
        return False
    try:
        if failed:
            if not fleet:
                log.warning("forecast failed but the fleet is unknown; nothing pushed to %s", gateway)
                return False
            push_failure(gateway, fleet, time.time())
        else:
            if out is None:
                raise ValueError("push_from_env: `out` (the job's output folder) is required for a successful run")
            push_report(gateway, read_report(Path(out) / REPORT_NAME, fleet))
    except (OSError, ReportShapeError) as exc:
        log.warning("could not push forecast metrics to %s: %s", gateway, exc)
        return False
    return True


# --- CLI ----------------------------------------------------------------------------------------


def register(app) -> None:
    """Add `sensorfleet forecast-exporter` to the main CLI (see sensorfleet.cli._register_plugins)."""
    @app.command("forecast-exporter")
    def forecast_exporter(
        reports: Annotated[Path, typer.Option(help="Folder searched (recursively) for the forecast job's metrics.json, or one metrics.json.")],
        port: Annotated[int, typer.Option(help="Port of the Prometheus /metrics endpoint.")] = DEFAULT_PORT,
        host: Annotated[str, typer.Option(help="Address the metrics endpoint binds to.")] = "0.0.0.0",
        fleet: Annotated[Optional[str], typer.Option(help="Fleet name for reports that do not name their fleet (default: the report's folder name).")] = None,
        duration: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,
    ) -> None:
        """Serve the newest forecast report per fleet (MAE, MASE, anomalies, last success) to Prometheus."""
        import signal
        import threading

        from rich.console import Console

        from sensorfleet.runtime import setup_logging

        setup_logging()
        err = Console(stderr=True)
        if not reports.exists():
            err.print(f"[yellow]warning[/yellow] --reports {reports}: does not exist yet; serving no forecast figures until a report appears", highlight=False)
        try:
            server, _ = serve_forecast_metrics(reports, port, host, fleet)
        except OSError as exc:
            err.print(f"[red]error[/red] {exc}", highlight=False)
            raise typer.Exit(2) from None
        found, _ = ReportFolder(reports, fleet).scan()  # logs each report it cannot read
        Console().print(f"forecast exporter: http://{host}:{port}/metrics  ({len(found)} fleet(s) in {reports})", highlight=False)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait(duration)
        server.shutdown()


def main() -> None:  # pragma: no cover - `python -m sensorfleet.forecast_metrics --reports DIR`
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
