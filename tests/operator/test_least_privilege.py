"""What the operator may see and touch: label-selector watches (the API server filters, not the
operator), the leader Lease by name, NetworkPolicies, no Secret enumeration; the chart wires them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml
from kopf._cogs.structs import references

from sensorfleet.operator import handlers

CHART = Path(__file__).resolve().parents[2] / "charts" / "sensorfleet"


def _render(k8s_binaries: Path, *sets: str) -> list[dict[str, Any]]:
    env = dict(os.environ, HELM_CACHE_HOME="/tmp/sf-helm-test/cache", HELM_CONFIG_HOME="/tmp/sf-helm-test/config",
               HELM_DATA_HOME="/tmp/sf-helm-test/data")
    args = ["template", "sf", str(CHART), "--namespace", "ops", "--kube-version", "1.37.0"]
    for value in sets:
        args += ["--set", value]
    out = subprocess.run([str(k8s_binaries / "helm"), *args], capture_output=True, text=True, env=env, timeout=120, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_every_child_watch_asks_the_api_server_for_labelled_objects_only() -> None:
    settings = handlers.operator_settings()
    for group, version, plural in handlers.WATCHED_CHILDREN:
        resource = references.Resource(group, version, plural)
        # The very call kopf's watcher makes to build the watch's labelSelector parameter
        # (kopf/_cogs/clients/watching.py); it fails loudly if kopf renames it.
        selectors = list(settings.watching.label_selectors.collect(resource))
        assert selectors == ["app.kubernetes.io/managed-by=sensorfleet-operator"], plural
    # The fleets themselves are watched whole.
    fleets = references.Resource("sensorfleet.io", "v1alpha1", "sensorfleets")
    assert list(settings.watching.label_selectors.collect(fleets)) == []


def _rules(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> list[dict[str, Any]]:
    return [r for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix) for r in d["rules"]]


def test_chart_grants_the_lease_by_name_networkpolicies_and_never_lists_secrets(k8s_binaries: Path) -> None:
    docs = _render(k8s_binaries, "fleetNetworkPolicy.metricsNamespace=monitoring")
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--lease-name=sf-sensorfleet-operator" in args and "--metrics-namespace=monitoring" in args
    lease_rules = [r for r in _rules(docs, "Role", "-leader-election") if "leases" in r["resources"]]
    by_name = [r for r in lease_rules if r.get("resourceNames")]
    assert by_name == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                        "resourceNames": ["sf-sensorfleet-operator"], "verbs": ["get", "update"]}]
    assert [r["verbs"] for r in lease_rules if not r.get("resourceNames")] == [["create"]]
    rules = _rules(docs, "ClusterRole")
    policies = next(r for r in rules if "networkpolicies" in r["resources"])
    assert set(policies["verbs"]) == {"get", "list", "create", "patch", "delete"}
    secrets = [r for r in rules if "secrets" in r["resources"]]
    assert secrets and all(not {"list", "watch"} & set(r["verbs"]) for r in secrets)
    off = _render(k8s_binaries, "fleetNetworkPolicy.enabled=false")
    assert "--no-network-policy" in next(d for d in off if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
