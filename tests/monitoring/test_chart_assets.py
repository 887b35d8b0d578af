"""The chart packages monitoring/ unchanged: the same dashboard JSON, the same alert rules."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sensorfleet"
RULES = ROOT / "monitoring" / "rules.yaml"


def _sync_module():
    spec = importlib.util.spec_from_file_location("monitoring_sync_chart", ROOT / "monitoring" / "sync_chart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync = _sync_module()


def helm_template(k8s_binaries: Path, *args: str) -> list[dict]:
    env = dict(os.environ, HELM_CACHE_HOME="/tmp/sf-helm-monitoring/cache", HELM_CONFIG_HOME="/tmp/sf-helm-monitoring/config", HELM_DATA_HOME="/tmp/sf-helm-monitoring/data")
    result = subprocess.run([str(k8s_binaries / "helm"), "template", "sf", str(CHART), *args], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_chart_dashboards_are_the_monitoring_dashboards() -> None:
    pairs = sync.dashboard_pairs()
    assert pairs, "no dashboards in monitoring/dashboards/"
    for source, copy in pairs:
        assert copy.is_file() and copy.read_bytes() == source.read_bytes(), f"{copy} differs from {source}: run `python monitoring/sync_chart.py`"
    extra = {p.name for p in (CHART / "dashboards").glob("*.json")} - {s.name for s, _ in pairs}
    assert not extra, f"dashboards in the chart that monitoring/dashboards/ does not have: {sorted(extra)}"


def test_chart_rule_template_is_generated_from_rules_yaml() -> None:
    assert sync.RULE_TEMPLATE.read_text() == sync.rule_template(RULES.read_text()), "run `python monitoring/sync_chart.py`"


def test_prometheus_rule_renders_the_same_groups(k8s_binaries: Path) -> None:
    docs = helm_template(k8s_binaries, "--set", "monitoring.prometheusRule.enabled=true", "--set", "monitoring.prometheusRule.labels.release=kube-prometheus-stack")
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert len(rules) == 1, [d["kind"] for d in docs]
    assert rules[0]["apiVersion"] == "monitoring.coreos.com/v1"
    assert rules[0]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rules[0]["spec"] == yaml.safe_load(RULES.read_text()), "the PrometheusRule's groups differ from monitoring/rules.yaml"


def test_no_prometheus_rule_by_default_and_dashboard_configmap_when_enabled(k8s_binaries: Path) -> None:
    assert not [d for d in helm_template(k8s_binaries) if d["kind"] == "PrometheusRule"]
    docs = helm_template(k8s_binaries, "--set", "monitoring.dashboards.enabled=true")
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "sensorfleet.json" in d.get("data", {})]
    assert len(maps) == 1
    assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(maps[0]["data"]["sensorfleet.json"]) == json.loads((ROOT / "monitoring" / "dashboards" / "sensorfleet.json").read_text())
