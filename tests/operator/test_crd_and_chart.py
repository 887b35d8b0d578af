"""The CRD is generated from the fleet spec and shipped identically in crds/ and the chart;
the chart lints, renders least-privilege RBAC and refuses bad values."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from sensorfleet.operator import crd

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / crd.CRD_FILE
CHART = REPO / "charts" / "sensorfleet"


def test_committed_crd_is_what_the_generator_produces() -> None:
    assert CRD_PATH.read_text() == crd.render_crd(), "the CRD is stale: run `make crd`"


def test_chart_ships_the_very_same_crd() -> None:
    assert (CHART / "crds" / crd.CRD_FILE).read_bytes() == CRD_PATH.read_bytes(), "run `make crd`"


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for key, child in node.get("properties", {}).items():
        out += _walk(child, f"{path}.{key}")
    if "items" in node:
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural_and_documented() -> None:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = json.dumps(schema)
    for forbidden in ('"$ref"', '"anyOf"', '"title"', '"$defs"'):
        assert forbidden not in text
    for path, node in _walk(schema["properties"]["spec"], "spec"):
        assert node.get("description"), f"{path} has no description"
        assert node.get("type") in ("object", "array", "string", "integer", "number", "boolean"), path
    spec = schema["properties"]["spec"]["properties"]
    assert spec["protocols"]["properties"]["mqtt"]["properties"]["devices"] == {
        "default": 10, "description": "Number of simulated devices speaking this protocol.", "maximum": 1000000, "minimum": 1, "type": "integer"}
    assert spec["protocols"]["properties"]["mqtt"]["properties"]["qos"]["enum"] == [0, 1]
    assert spec["protocols"]["default"] == {} and len(spec["sensors"]["default"]) == 3
    rules = {v["rule"] for _, n in _walk(schema["properties"]["spec"], "spec") for v in n.get("x-kubernetes-validations", [])}
    assert len(rules) == 8  # crd.CEL_RULES: 6 mirror spec.py, 2 refuse broker TLS in the cluster


def test_printer_columns_and_names() -> None:
    version = crd.build_crd()["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Protocols", "Devices", "Ready", "Pods", "Last Forecast", "Age"]
    assert version["subresources"] == {"status": {}}
    assert crd.build_crd()["spec"]["names"]["shortNames"] == ["sf"]


def _helm(k8s_binaries: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HELM_CACHE_HOME="/tmp/sf-helm-test/cache", HELM_CONFIG_HOME="/tmp/sf-helm-test/config",
               HELM_DATA_HOME="/tmp/sf-helm-test/data")
    result = subprocess.run([str(k8s_binaries / "helm"), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def _render(k8s_binaries: Path, *sets: str) -> list[dict[str, Any]]:
    args = ["template", "sf", str(CHART), "--namespace", "ops", "--kube-version", "1.37.0"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(_helm(k8s_binaries, *args).stdout) if d]


def test_chart_lints_and_renders_a_locked_down_operator(k8s_binaries: Path) -> None:
    _helm(k8s_binaries, "lint", "--strict", str(CHART))
    docs = _render(k8s_binaries)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Pod", "Role", "RoleBinding", "Service", "ServiceAccount"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["memory"]
    assert container["image"] == "sensorfleet:0.1.0"
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    secrets = next(r for r in role["rules"] if "secrets" in r["resources"])
    assert "list" not in secrets["verbs"] and "watch" not in secrets["verbs"]
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in role["rules"])
    test_pod = next(d for d in docs if d["kind"] == "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"


def test_watch_namespaces_limits_rbac_and_the_watch(k8s_binaries: Path) -> None:
    docs = _render(k8s_binaries, "watchNamespaces={line1,line2}", "monitoring.serviceMonitor.enabled=true",
                   "monitoring.podMonitor.enabled=true")
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    roles = sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "Role")
    assert roles == ["line1", "line2", "ops"]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=line1" in args and "--namespace=line2" in args
    assert {"ServiceMonitor", "PodMonitor"} <= {d["kind"] for d in docs}


def test_values_schema_refuses_typos(k8s_binaries: Path) -> None:
    for bad in ("replicaCount=many", "imagee.tag=1", "watchNamespaces={Bad_NS}", "image.pullPolicy=Sometimes"):
        result = _helm(k8s_binaries, "template", "sf", str(CHART), "--set", bad, check=False)
        assert result.returncode != 0 and "schema" in result.stderr.lower() + result.stdout.lower(), bad


def test_dashboards_are_packaged_from_monitoring(k8s_binaries: Path) -> None:
    """The chart packages charts/sensorfleet/dashboards/*.json (`make chart-dashboards` copies
    monitoring/dashboards/); they must not drift apart."""
    source = sorted((REPO / "monitoring" / "dashboards").glob("*.json"))
    packaged = sorted((CHART / "dashboards").glob("*.json"))
    assert [p.name for p in packaged] == [p.name for p in source], "run `make chart-dashboards`"
    for a, b in zip(source, packaged):
        assert a.read_bytes() == b.read_bytes(), f"{b} differs from {a}: run `make chart-dashboards`"
    docs = _render(k8s_binaries, "monitoring.dashboards.enabled=true")
    maps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(maps) == len(packaged)
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        json.loads(next(iter(m["data"].values())))
