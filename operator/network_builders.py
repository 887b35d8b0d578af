"""How the fleet's pods are reached: `<fleet>-metrics` (headless Service over every metrics
port), a PodMonitor on request, and `<fleet>-network` (NetworkPolicy: the fleet's pods take
traffic only from each other, metrics from the configured namespace).
"""

from __future__ import annotations

from typing import Any

from sensorfleet.operator.child_meta import (
    APP_NAME,
    INSTANCE,
    BuildOptions,
    Owner,
    labels,
    metrics_service_name,
    network_policy_name,
    object_metadata,
)
from sensorfleet.spec import SensorFleet


def build_metrics_service(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    """Headless Service over every pod of the fleet that serves metrics (for ServiceMonitors and
    for `kubernetes_sd_configs` role endpoints)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(metrics_service_name(fleet.name), owner, labels(fleet.name, "metrics", options)),
        "spec": {
            "clusterIP": "None",
            # A collector whose store fails is not ready, and exactly then its metrics matter.
            "publishNotReadyAddresses": True,
            "selector": {"app.kubernetes.io/name": APP_NAME, INSTANCE: fleet.name},
            "ports": [{"name": "metrics", "port": fleet.spec.monitoring.port, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }


def build_pod_monitor(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": object_metadata(fleet.name, owner, labels(fleet.name, "metrics", options)),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": APP_NAME, INSTANCE: fleet.name}},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def build_network_policy(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    """Ingress to the fleet's pods only from the fleet's own pods (simulators, broker, collectors
    talk among themselves), plus the metrics port from `options.metrics_namespace` (any namespace
    when empty) for Prometheus. Egress is left open: storage may be an S3 endpoint anywhere."""
    fleet_pods = {"matchLabels": {"app.kubernetes.io/name": APP_NAME, INSTANCE: fleet.name}}
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": fleet_pods}]}]
    if fleet.spec.monitoring.enabled:
        namespaces: dict[str, Any] = (
            {"matchLabels": {"kubernetes.io/metadata.name": options.metrics_namespace}} if options.metrics_namespace else {})
        ingress.append({"from": [{"namespaceSelector": namespaces}],
                        "ports": [{"protocol": "TCP", "port": fleet.spec.monitoring.port}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_metadata(network_policy_name(fleet.name), owner, labels(fleet.name, "network", options)),
        "spec": {"podSelector": fleet_pods, "policyTypes": ["Ingress"], "ingress": ingress},
    }
