"""Stage 6b, report: one self-contained HTML page (no scripts, no network) that shows the plots
(PNG files next to it, referenced relatively) with the metrics tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, select_autoescape

TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>SensorFleet forecast report{% if options.fleet %}: {{ options.fleet }}{% endif %}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
 table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
 th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
 th:first-child, td:first-child { text-align: left; }
 th { background: #f2f2f2; }
 .headline td { font-size: 1.05em; }
 figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
 .better { color: #1a7f37; font-weight: 600; } .worse { color: #b42318; font-weight: 600; }
 code { background: #f6f6f6; padding: 0 0.2em; }
</style>
</head>
<body>
<h1>Forecast report{% if options.fleet %}: {{ options.fleet }}{% endif %}</h1>
<p>{{ data.series }} series, {{ data.steps }} steps of {{ data.frequency }} from {{ data.start }} to {{ data.end }};
horizon {{ options.horizon }} steps, {{ options.cv_windows }} rolling-origin CV window(s) and one hold-out window;
{{ options.level }}% prediction intervals. Generated {{ headline.generated_at }}.</p>

<h2>Headline</h2>
<table class="headline">
<tr><th>model</th><th>MAE</th><th>MASE</th><th>MASE / {{ headline.baseline }}</th><th>CV MASE / {{ headline.baseline }}</th><th>anomalies flagged (hold-out)</th></tr>
<tr><td>{{ headline.model }}</td><td>{{ fmt(headline.mae) }}</td><td>{{ fmt(headline.mase) }}</td>
<td class="{{ 'better' if headline.mase_vs_baseline is not none and headline.mase_vs_baseline < 1 else 'worse' }}">{{ fmt(headline.mase_vs_baseline) }}</td>
<td>{{ fmt(headline.cv_mase_vs_baseline) }}</td><td>{{ headline.anomalies_flagged }}</td></tr>
</table>

{% for split, title in (("holdout", "Hold-out (last " ~ options.horizon ~ " steps)"), ("cv", "Rolling-origin cross-validation")) %}
{% if metrics[split] %}
<h2>Metrics: {{ title }}</h2>
<p>Mean over {{ metrics[split].series }} series{% if split == "cv" %} and {{ metrics[split].windows }} windows{% endif %}. MASE is scaled by each series' in-sample seasonal-naive error.</p>
<table>
<tr><th>model</th>{% for m in ("mae", "rmse", "smape", "mase", "mase_vs_baseline", "beats_baseline_share") %}<th>{{ m }}</th>{% endfor %}</tr>
{% for name, row in metrics[split].models.items() %}
<tr><td>{{ name }}</td>{% for m in ("mae", "rmse", "smape", "mase", "mase_vs_baseline", "beats_baseline_share") %}<td>{{ fmt(row.get(m)) }}</td>{% endfor %}</tr>
{% endfor %}
</table>
{% for group in ("by_protocol", "by_sensor") %}
<table>
{% set rows = metrics[split][group] %}
{% set cols = (rows.values() | list)[0].keys() | list if rows else [] %}
<tr><th>{{ group | replace("by_", "") }}</th>{% for c in cols %}<th>{{ c }}</th>{% endfor %}</tr>
{% for key, row in rows.items() %}<tr><td>{{ key }}</td>{% for c in cols %}<td>{{ fmt(row[c]) }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endfor %}
{% endif %}
{% endfor %}

<h2>Anomaly flags ({{ anomalies.model }}, {{ anomalies.level }}% interval)</h2>
<p>A reading is flagged when it lies outside the interval forecast before it was taken; scored against the simulator's injected anomalies.</p>
<table>
<tr><th>windows</th><th>readings</th><th>flagged</th><th>injected</th><th>precision</th><th>recall</th><th>spike recall</th><th>stuck recall</th><th>dropouts (no value)</th></tr>
{% for key, title in (("scored_windows", "CV + hold-out"), ("holdout", "hold-out")) %}{% set a = anomalies[key] %}
<tr><td>{{ title }}</td><td>{{ a.readings }}</td><td>{{ a.flagged }}</td><td>{{ a.injected }}</td><td>{{ fmt(a.precision) }}</td><td>{{ fmt(a.recall) }}</td>
<td>{{ fmt(a.by_kind.spike.recall) }}</td><td>{{ fmt(a.by_kind.stuck.recall) }}</td><td>{{ a.dropouts_unscorable }}</td></tr>
{% endfor %}
</table>

{% if device_events and device_events.count %}
<h2>Device events</h2>
<p>{{ device_events.count }} action(s) of clients on devices in the window ({% for k, v in device_events.by_action.items() %}{{ v }} {{ k }}{% if not loop.last %}, {% endif %}{% endfor %}): setpoint writes, injected faults and resets, from the events table beside the dataset. Dotted lines in the plots mark them on the series they touched.</p>
<table>
<tr><th>time (UTC)</th><th>device</th><th>action</th><th>sensor</th><th>setpoint</th><th>fault</th><th>duration (s)</th><th>message</th></tr>
{% for e in device_events.rows %}<tr><td>{{ e.ts }}</td><td>{{ e.protocol }}/{{ e.device }}</td><td>{{ e.action }}</td><td>{{ e.sensor or "" }}</td><td>{{ fmt(e.value) if e.value is not none else "" }}</td><td>{{ e.fault or "" }}</td><td>{{ fmt(e.duration) if e.duration is not none else "" }}</td><td>{{ e.message or "" }}</td></tr>{% endfor %}
</table>
{% endif %}

<h2>Data preparation</h2>
<table>
<tr><th>readings</th><th>series</th><th>missing steps</th><th>interpolated</th><th>stuck removed</th><th>spikes removed</th><th>long gaps (&gt; {{ cleaning.max_gap_steps }} steps)</th><th>dropped series</th></tr>
<tr><td>{{ cleaning.readings }}</td><td>{{ cleaning.series }}</td><td>{{ cleaning.missing_cells }}</td><td>{{ cleaning.interpolated_cells }}</td><td>{{ cleaning.stuck_cells }}</td><td>{{ cleaning.spike_cells }}</td><td>{{ cleaning.long_gaps }}</td><td>{{ cleaning.dropped_series | length }}</td></tr>
</table>
<table>
<tr><th>cleaning detector</th><th>flagged</th><th>injected</th><th>precision</th><th>recall</th></tr>
{% for name, s in cleaning.detector_scores.items() %}<tr><td>{{ name }}</td><td>{{ s.flagged }}</td><td>{{ s.true }}</td><td>{{ fmt(s.precision) }}</td><td>{{ fmt(s.recall) }}</td></tr>{% endfor %}
</table>
{% if cleaning.long_gap_examples %}<p>Longest gaps: {% for g in cleaning.long_gap_examples[:5] %}<code>{{ g.unique_id }}</code> {{ g.steps }} steps from {{ g.start }}{% if not loop.last %}; {% endif %}{% endfor %}</p>{% endif %}

<h2>Plots</h2>
{% for plot in plots %}
<figure><img src="{{ plot.file }}" alt="{{ plot.title }}"><figcaption>{{ plot.title }}</figcaption></figure>
{% endfor %}

{% if animation %}
<h2>Animation</h2>
<p>One series played forward: live values, the forecast cone from each moment (fitted on data before it), the streaming detector's flags (×) and injected faults (○).</p>
<figure><img src="{{ animation.gif }}" alt="animation: live values with the rolling forecast cone"><figcaption>{{ animation.frames }} frames, GIF</figcaption></figure>
{% if animation.mp4 %}<figure><video src="{{ animation.mp4 }}" controls loop muted width="640"></video><figcaption>the same as MP4</figcaption></figure>{% endif %}
{% endif %}

<h2>Stage timings (s)</h2>
<table>{% for name, seconds in timings.items() %}<tr><td>{{ name }}</td><td>{{ seconds }}</td></tr>{% endfor %}</table>
<p>Files: <a href="metrics.json">metrics.json</a>, <a href="metrics_by_series.csv">metrics_by_series.csv</a>, <code>forecasts.parquet</code>.</p>
</body>
</html>
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(metrics: dict[str, Any], plots: list[dict[str, str]]) -> str:
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    template = env.from_string(TEMPLATE)
    return template.render(
        headline=metrics["headline"],
        options=metrics["options"],
        data=metrics["data"],
        metrics={"holdout": metrics.get("holdout"), "cv": metrics.get("cv")},
        anomalies=metrics["anomalies"],
        cleaning=metrics["cleaning"],
        timings=metrics.get("timings_s", {}),
        plots=plots,
        animation=metrics.get("animation"),
        device_events=metrics.get("device_events"),
        fmt=_fmt,
    )


def write_report(path: Path, metrics: dict[str, Any], plots: list[dict[str, str]]) -> Path:
    path = Path(path)
    path.write_text(render(metrics, plots), encoding="utf-8")
    return path
