"""The dashboard's JSON model: what Grafana needs to import it, and the variables every query uses."""

from __future__ import annotations

import json
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "monitoring" / "dashboards" / "sensorfleet.json"


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(model: dict) -> list[dict]:
    return [p for p in model["panels"] if p["type"] != "row"]


def test_dashboard_imports_into_grafana() -> None:
    model = load()
    assert model["uid"] and model["title"] and model["schemaVersion"] >= 36
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(model):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def test_namespace_and_fleet_variables_match_everything_including_no_namespace() -> None:
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "fleet"):
        v = variables[name]
        # A local run has no namespace label: "All" must be `.*`, which also matches the empty value.
        assert v["includeAll"] and v["allValue"] == ".*", name
        assert v["current"]["value"] == ["$__all"], name


def test_fleet_panels_filter_by_namespace_and_fleet() -> None:
    for panel in panels(load()):
        for target in panel["targets"]:
            expr = target["expr"]
            if "sensorfleet_operator_" in expr:
                continue  # the operator serves all fleets: no fleet label
            assert 'namespace=~"$namespace"' in expr and 'fleet=~"$fleet"' in expr, f"{panel['title']}: {expr}"


def test_the_panels_the_issue_asks_for_are_there() -> None:
    exprs = " ".join(t["expr"] for p in panels(load()) for t in p["targets"])
    for needed in (
        "sensorfleet_readings_stored_total", "sensorfleet_readings_published_total", "sensorfleet_readings_lost_total",
        "sensorfleet_readings_late_total", "sensorfleet_readings_duplicate_total", "histogram_quantile(0.5, sum by (protocol, le) (rate(sensorfleet_reading_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (protocol, le) (rate(sensorfleet_reading_latency_seconds_bucket", "sensorfleet_collector_batch_lag_seconds",
        'component=~".*simulator"', 'component=~".*collector"', "sensorfleet_connected", "sensorfleet_payloads_malformed_total",
        "sensorfleet_forecast_last_success_timestamp_seconds", "sensorfleet_forecast_mae", "sensorfleet_forecast_mase", "sensorfleet_forecast_anomalies_flagged",
        "sensorfleet_operator_reconciles_total", "sensorfleet_operator_reconcile_errors_total",
    ):
        assert needed in exprs, f"no panel queries {needed}"
