"""Collect every bench/results/*.json into bench/results/report.html (tables + plots, offline)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(rows: dict) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def mqtt_plots(result: dict) -> str:
    out = []
    throughput = result.get("throughput", [])
    if throughput:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        labels = [f"{t.get('mode', 'perDevice')}\n{t['devices']} dev / {t['interval_s']} s" for t in throughput]
        ax.bar(labels, [t["stored_readings_per_s"] for t in throughput], color=["tab:green" if t["zero_loss"] else "tab:red" for t in throughput])
        ax.axhline(25000, ls="--", color="grey", label="target 25,000 readings/s")
        ax.set_ylabel("readings/s stored (green: zero loss)")
        ax.legend()
        out.append(_png(fig))
    capacity = result.get("capacity", [])
    if capacity:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot([c["devices"] for c in capacity], [c["peak_rss_mib"] for c in capacity], marker="o")
        ax.axhline(1024, ls="--", color="grey", label="1 GiB")
        ax.set_xlabel("devices at 1 Hz (sensorfleet run)")
        ax.set_ylabel("peak RSS of all processes (MiB)")
        ax.legend()
        out.append(_png(fig))
    return "".join(out)


def frontier_plot(result: dict) -> str:
    """MASE against seconds per series of every model of bench_frontier (green: the Pareto front)."""
    models = result.get("models", {})
    if not models:
        return ""
    front = set(result.get("pareto_front", []))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in models.items():
        seconds = max(r["seconds_per_series"], 1e-5)  # log axis: a vectorised fit can round to 0
        ax.scatter(seconds, r["mase"], color="tab:green" if name in front else "tab:grey", zorder=3)
        ax.annotate(name, (seconds, r["mase"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per series (fit + forecast, one process)")
    ax.set_ylabel("MASE (hold-out)")
    sample = result.get("sample", {})
    ax.set_title(f"accuracy-time frontier: {sample.get('series')} series, {sample.get('frequency')}, horizon {sample.get('horizon')} "
                 f"(load {result.get('load_average', {}).get('start')})", fontsize=9)
    ax.grid(alpha=0.3)
    return _png(fig)


def main() -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    sections = []
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        headline = result.get("headline") or {k: v for k, v in result.items() if not isinstance(v, dict | list)}
        plots = {"mqtt": mqtt_plots, "frontier": frontier_plot}.get(path.stem, lambda _: "")(result)
        sections.append(
            f"<section><h2>{html.escape(path.stem)}</h2>{_table(headline)}{plots}"
            f"<details><summary>all figures</summary><pre>{html.escape(json.dumps(result, indent=2))}</pre></details></section>"
        )
    page = (
        "<!doctype html><meta charset=utf-8><title>SensorFleet benchmarks</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left}img{display:block;margin:1em 0}</style>"
        "<h1>SensorFleet benchmarks</h1><p>Each figure is compared with a reference measured in the same run on the same machine.</p>"
        + "".join(sections)
    )
    target = RESULTS / "report.html"
    target.write_text(page)
    print(f"wrote {target}")
    return target


if __name__ == "__main__":
    main()
