"""The pieces every workload of a fleet is made of: hardened pods (non-root, read-only root
filesystem with emptyDirs where the app writes, no service-account token), the app container,
environment variables filled from Secrets, probes, and the one-pod Deployment.
"""

from __future__ import annotations

from typing import Any

from sensorfleet.operator.child_meta import (
    HASH_ANNOTATION,
    BuildOptions,
    Owner,
    data_claim_name,
    fleet_configmap_name,
    labels,
    object_metadata,
    selector_labels,
)
from sensorfleet.operator.sizing import pod_resources
from sensorfleet.operator.storage_builders import DATA_DIR, claim_is_single_node, same_node_as_claim_users
from sensorfleet.spec import SecretKeyRef, SensorFleet

FLEET_DIR = "/etc/sensorfleet"
FLEET_FILE = f"{FLEET_DIR}/fleet.yaml"
APP_UID = 10001  # the `sensorfleet` user of the project image (see Dockerfile)
HOME_DIR = "/home/sensorfleet"  # its HOME; an emptyDir in pods, as the root filesystem is read-only

# Environment variables the processes read their secrets from (simulators/opcua.py, runtime.py,
# forecasting/models.py; tests/operator checks that the names agree).
ENV_MQTT_USERNAME, ENV_MQTT_PASSWORD = "SENSORFLEET_MQTT_USERNAME", "SENSORFLEET_MQTT_PASSWORD"
ENV_OPCUA_USERNAME, ENV_OPCUA_PASSWORD = "SENSORFLEET_OPCUA_USERNAME", "SENSORFLEET_OPCUA_PASSWORD"
ENV_NIXTLA_API_KEY = "NIXTLA_API_KEY"

# Every place the app writes to outside the dataset, on the pod's emptyDirs: the OPC UA PKI (a
# self-signed certificate made on first start), numba's and other caches, matplotlib's config.
WRITABLE_ENV = {
    "HOME": HOME_DIR,
    "XDG_CACHE_HOME": f"{HOME_DIR}/.cache",
    "NUMBA_CACHE_DIR": f"{HOME_DIR}/.cache/numba",
    "MPLCONFIGDIR": f"{HOME_DIR}/.config/matplotlib",
    "SENSORFLEET_OPCUA_PKI": f"{HOME_DIR}/.local/share/sensorfleet/opcua-pki",
}


def container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _fleet_volume(fleet: str) -> dict[str, Any]:
    return {"name": "fleet", "configMap": {"name": fleet_configmap_name(fleet)}}


def _tmp_volume() -> dict[str, Any]:
    return {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}


def _home_volume() -> dict[str, Any]:
    return {"name": "home", "emptyDir": {"sizeLimit": "256Mi"}}


def _app_mounts(with_data: bool) -> list[dict[str, Any]]:
    mounts = [
        {"name": "fleet", "mountPath": FLEET_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": HOME_DIR},
    ]
    if with_data:
        mounts.append({"name": "data", "mountPath": DATA_DIR})
    return mounts


def secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    """An environment variable the kubelet fills from a Secret key (never a literal value)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def storage_env(fleet: SensorFleet) -> list[dict[str, Any]]:
    """S3 endpoint, region and keys for every process that reads or writes the dataset: plain
    values for the endpoint and region, secretKeyRef for the keys (never in args or status)."""
    storage = fleet.spec.storage
    env: list[dict[str, Any]] = []
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    if storage.credentials:
        env += [secret_env("AWS_ACCESS_KEY_ID", storage.credentials.access_key_id),
                secret_env("AWS_SECRET_ACCESS_KEY", storage.credentials.secret_access_key)]
    return env


def metrics_args(fleet: SensorFleet) -> list[str]:
    return ["--metrics-port", str(fleet.spec.monitoring.port)] if fleet.spec.monitoring.enabled else []


def metrics_ports(fleet: SensorFleet) -> list[dict[str, Any]]:
    if not fleet.spec.monitoring.enabled:
        return []
    return [{"name": "metrics", "containerPort": fleet.spec.monitoring.port, "protocol": "TCP"}]


def _probes(fleet: SensorFleet, role: str) -> dict[str, Any]:
    if not fleet.spec.monitoring.enabled:
        return {}
    # A collector is ready while it can write the dataset store: /readyz answers 503 with the cause
    # while writes fail (collectors/backpressure.py); the fleet's StorageDegraded follows it.
    ready_path = "/readyz" if role == "collector" else "/metrics"
    return {
        "readinessProbe": {"httpGet": {"path": ready_path, "port": "metrics"}, "periodSeconds": 10, "failureThreshold": 3},
        # /healthz fails once a vital thread (network loop, writer) has died, which an open port would not show.
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "initialDelaySeconds": 20, "periodSeconds": 10, "failureThreshold": 3},
    }


def app_container(name: str, args: list[str], role: str, options: BuildOptions, env: list[dict[str, Any]],
                   ports: list[dict[str, Any]], fleet: SensorFleet, with_data: bool,
                   protocol: str | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": ["sensorfleet"],
        "args": args,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"},
                *({"name": k, "value": v} for k, v in WRITABLE_ENV.items()), *env],
        "ports": ports,
        "resources": pod_resources(fleet, role, protocol),
        "securityContext": container_security(),
        "volumeMounts": _app_mounts(with_data),
        **_probes(fleet, role),
    }
    return container


def app_pod_spec(fleet: SensorFleet, container: dict[str, Any], with_data: bool) -> dict[str, Any]:
    volumes = [_fleet_volume(fleet.name), _tmp_volume(), _home_volume()]
    if with_data:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": data_claim_name(fleet.name)}})
    pod = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security(APP_UID),
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": volumes,
    }
    if with_data and claim_is_single_node(fleet):
        pod["affinity"] = same_node_as_claim_users(fleet)
    return pod


def single_pod_deployment(
    name: str,
    owner: Owner,
    component: str,
    extra_labels: dict[str, str],
    pod_spec: dict[str, Any],
    template_hash: str,
    options: BuildOptions,
    strategy: str = "RollingUpdate",
    pod_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    lbls = labels(owner.name, component, options, **extra_labels)
    selector = {**selector_labels(owner.name, component), **extra_labels}
    deployment_strategy: dict[str, Any] = {"type": strategy}
    if strategy == "RollingUpdate":
        # One pod per shard: replace it, never run two copies of the same devices / client id.
        deployment_strategy["rollingUpdate"] = {"maxSurge": 0, "maxUnavailable": 1}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_metadata(name, owner, lbls),
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 3,
            "strategy": deployment_strategy,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**lbls, **(pod_labels or {})}, "annotations": {HASH_ANNOTATION: template_hash}},
                "spec": pod_spec,
            },
        },
    }
