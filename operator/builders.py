"""Pure builders: one SensorFleet in, the manifests of all its children out.

No I/O, no kopf, no clock: the same fleet, owner and credentials give the same manifests, so the
handlers can server-side apply them on every reconcile without changing anything that did not
change. Each child carries the recommended `app.kubernetes.io/*` labels, `sensorfleet.io/fleet`,
and a controller ownerReference to the fleet (Kubernetes garbage-collects it with its owner).

Per fleet:
    <fleet>-fleet                      ConfigMap   the manifest, mounted at /etc/sensorfleet/fleet.yaml
    <fleet>-broker-config / -broker-credentials / -broker (Deployment + Service)   Mosquitto, when MQTT
                                       is enabled and the broker is not external
    <fleet>-<proto>-simulator-<i>      Deployment (1 pod: its replica index picks its device shard)
                                       + Service for CoAP / OPC UA (they are servers)
    <fleet>-<proto>-collector-<i>      Deployment (1 pod: a stable MQTT client id / its own targets)
    <fleet>-src-<name>                 Deployment per third-party source (spec.sources; source_builders.py)
    <fleet>-data                       PersistentVolumeClaim, unless spec.storage.url is set; kept when
                                       the fleet is deleted unless storage.claimRetention.whenDeleted: Delete
    <fleet>-forecast                   CronJob, when forecasting is enabled
    <fleet>-compact                    CronJob: compaction of closed hours, retention (spec.storage)
    <fleet>-metrics                    headless Service over all metrics ports; PodMonitor on request
    <fleet>-network                    NetworkPolicy: the fleet's pods take traffic only from each
                                       other (metrics from the configured namespace)

Pod templates carry a hash of the part of the spec that the process reads, so an edit rolls only
the pods it concerns (more MQTT devices restart MQTT simulators, not the CoAP collector).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from sensorfleet.broker import mosquitto_config
from sensorfleet.spec import API_GROUP, API_VERSION, KIND, PROTOCOLS, SecretKeyRef, SensorFleet, dump_fleet

OPERATOR_NAME = "sensorfleet-operator"
APP_NAME = "sensorfleet"
FLEET_LABEL = f"{API_GROUP}/fleet"
PROTOCOL_LABEL = f"{API_GROUP}/protocol"
REPLICA_LABEL = f"{API_GROUP}/replica"
HASH_ANNOTATION = f"{API_GROUP}/spec-hash"
MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"

FLEET_DIR = "/etc/sensorfleet"
FLEET_FILE = f"{FLEET_DIR}/fleet.yaml"
DATA_DIR = "/data"
DATA_CLAIM_LABEL = f"{API_GROUP}/data-claim"
CLAIM_RETENTION_LABEL = f"{API_GROUP}/on-fleet-delete"  # `kubectl get pvc -L sensorfleet.io/on-fleet-delete`
BROKER_USERNAME = "sensorfleet"
MQTT_PORT = 1883
MOSQUITTO_UID = 1883  # the `mosquitto` user of the eclipse-mosquitto image
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

# Requests/limits per role: the floor of every pod, small enough for kind on a laptop. Simulators
# and collectors grow from there with the devices they serve (see pod_resources).
RESOURCES: dict[str, dict[str, dict[str, str]]] = {
    "simulator": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"cpu": "1", "memory": "384Mi"}},
    "collector": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "768Mi"}},
    "broker": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
    "forecast": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
    "init": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
}


@dataclass(frozen=True)
class Owner:
    """The fleet object the children belong to (namespace for the children, uid for ownerReferences)."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class BuildOptions:
    """Operator-wide settings (from the chart's values / the operator's flags), not per fleet."""

    image: str = "sensorfleet:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    extra_labels: dict[str, str] = field(default_factory=dict)
    # NetworkPolicy per fleet; metrics ports are open to pods of this namespace ("" = any namespace).
    network_policy: bool = True
    metrics_namespace: str = ""


@dataclass(frozen=True)
class BrokerCredentials:
    username: str
    password: str


# --------------------------------------------------------------------------------------------
# names and labels
# --------------------------------------------------------------------------------------------


def fleet_configmap_name(fleet: str) -> str:
    return f"{fleet}-fleet"


def broker_name(fleet: str) -> str:
    return f"{fleet}-broker"


def broker_secret_name(fleet: str) -> str:
    return f"{fleet}-broker-credentials"


def broker_config_name(fleet: str) -> str:
    return f"{fleet}-broker-config"


def simulator_name(fleet: str, protocol: str, replica: int) -> str:
    return f"{fleet}-{protocol}-simulator-{replica}"


def collector_name(fleet: str, protocol: str, replica: int) -> str:
    return f"{fleet}-{protocol}-collector-{replica}"


def data_claim_name(fleet: str) -> str:
    return f"{fleet}-data"


def compaction_name(fleet: str) -> str:
    return f"{fleet}-compact"


ENV_JOB_INDEX = "JOB_COMPLETION_INDEX"  # set in every pod of an Indexed Job by the Job controller
ENV_JOB_NAME = "JOB_NAME"


def forecast_name(fleet: str) -> str:
    return f"{fleet}-forecast"


def metrics_service_name(fleet: str) -> str:
    return f"{fleet}-metrics"


def network_policy_name(fleet: str) -> str:
    return f"{fleet}-network"


def selector_labels(fleet: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP_NAME, INSTANCE: fleet, COMPONENT: component}


def child_selector(fleet: str) -> str:
    """Label selector matching every child of one fleet."""
    return f"{MANAGED_BY}={OPERATOR_NAME},{FLEET_LABEL}={fleet}"


def labels(fleet: str, component: str, options: BuildOptions, **extra: str) -> dict[str, str]:
    return {
        **options.extra_labels,
        **selector_labels(fleet, component),
        "app.kubernetes.io/part-of": APP_NAME,
        MANAGED_BY: OPERATOR_NAME,
        FLEET_LABEL: fleet,
        **extra,
    }


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, owner: Owner, lbls: dict[str, str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": lbls,
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def spec_hash(*parts: Any) -> str:
    """A short stable hash of the spec sections a process reads (pod-template annotation)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _section(fleet: SensorFleet, *names: str) -> dict[str, Any]:
    spec = fleet.spec.model_dump(mode="json", by_alias=True)
    return {n: spec.get(n) for n in names}


# --------------------------------------------------------------------------------------------
# building blocks of pods
# --------------------------------------------------------------------------------------------


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security(uid: int) -> dict[str, Any]:
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


def uses_claim(fleet: SensorFleet) -> bool:
    return not fleet.spec.storage.url


def data_location(fleet: SensorFleet) -> str:
    """`--data` of collectors and the forecast job: the mounted claim or the fsspec URL."""
    return fleet.spec.storage.url or DATA_DIR


def reports_location(fleet: SensorFleet) -> str:
    # Beside the Parquet partitions, but named with "_" so pyarrow's dataset discovery (and so a
    # user's plain `pandas.read_parquet(DATA)`) skips it as it skips "_SUCCESS"-style files.
    return data_location(fleet).rstrip("/") + "/_reports"


def uses_broker(fleet: SensorFleet) -> bool:
    """Does the operator run a Mosquitto broker for this fleet?"""
    return fleet.spec.protocols.mqtt.enabled and fleet.spec.broker.mode != "external"


def broker_port(fleet: SensorFleet) -> int:
    return fleet.spec.broker.port or MQTT_PORT


def broker_url(fleet: SensorFleet) -> str:
    if fleet.spec.broker.mode == "external" and fleet.spec.broker.url:
        return fleet.spec.broker.url
    return f"mqtt://{broker_name(fleet.name)}:{broker_port(fleet)}"


def secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    """An environment variable the kubelet fills from a Secret key (never a literal value)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _mqtt_env(fleet: SensorFleet) -> list[dict[str, Any]]:
    broker = fleet.spec.broker
    if broker.mode == "external" and broker.credentials:
        return [secret_env(ENV_MQTT_USERNAME, broker.credentials.username),
                secret_env(ENV_MQTT_PASSWORD, broker.credentials.password)]
    if not uses_broker(fleet) or not broker.authentication:
        return []
    secret = broker_secret_name(fleet.name)
    return [secret_env(ENV_MQTT_USERNAME, SecretKeyRef(name=secret, key="username")),
            secret_env(ENV_MQTT_PASSWORD, SecretKeyRef(name=secret, key="password"))]


def _opcua_env(fleet: SensorFleet) -> list[dict[str, Any]]:
    opcua = fleet.spec.protocols.opcua
    if opcua.authentication != "username" or not opcua.credentials:
        return []
    return [secret_env(ENV_OPCUA_USERNAME, opcua.credentials.username),
            secret_env(ENV_OPCUA_PASSWORD, opcua.credentials.password)]


def _protocol_env(fleet: SensorFleet, protocol: str) -> list[dict[str, Any]]:
    return _mqtt_env(fleet) if protocol == "mqtt" else _opcua_env(fleet) if protocol == "opcua" else []


def _metrics_args(fleet: SensorFleet) -> list[str]:
    return ["--metrics-port", str(fleet.spec.monitoring.port)] if fleet.spec.monitoring.enabled else []


def _metrics_port(fleet: SensorFleet) -> list[dict[str, Any]]:
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


def _deployment(
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
        "metadata": _metadata(name, owner, lbls),
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


def _app_pod_spec(fleet: SensorFleet, container: dict[str, Any], with_data: bool) -> dict[str, Any]:
    volumes = [_fleet_volume(fleet.name), _tmp_volume(), _home_volume()]
    if with_data:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": data_claim_name(fleet.name)}})
    pod = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(APP_UID),
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": volumes,
    }
    if with_data and claim_is_single_node(fleet):
        pod["affinity"] = _same_node_as_claim_users(fleet)
    return pod


def claim_is_single_node(fleet: SensorFleet) -> bool:
    """A ReadWriteOnce volume attaches to one node: every pod mounting it must run there."""
    return "ReadWriteMany" not in fleet.spec.storage.access_modes


def claim_user_labels(fleet: SensorFleet) -> dict[str, str]:
    """On every pod that mounts the data claim (the pod-affinity term matches them)."""
    return {DATA_CLAIM_LABEL: data_claim_name(fleet.name)} if uses_claim(fleet) else {}


def _same_node_as_claim_users(fleet: SensorFleet) -> dict[str, Any]:
    # Required pod affinity to the pods that mount the claim, on one hostname. The first such pod
    # matches its own term, which the scheduler accepts when no other pod matches yet; every
    # later one (collectors, the forecast and compaction jobs) follows it to its node, so a
    # ReadWriteOnce volume is never asked to attach to a second node (Multi-Attach error).
    return {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": claim_user_labels(fleet)},
        "topologyKey": "kubernetes.io/hostname",
    }]}}


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


def _cpu(millis: float) -> str:
    """In the API server's canonical form (whole cores as "2"), so an apply changes nothing."""
    m = math.ceil(millis)
    return str(m // 1000) if m % 1000 == 0 else f"{m}m"


def _memory(mebibytes: float) -> str:
    mi = math.ceil(mebibytes)
    return f"{mi // 1024}Gi" if mi % 1024 == 0 else f"{mi}Mi"


# Costs per unit of work a pod does, rounded up from docs/protocols.md and the bench figures: one
# core carries ~10,000 QoS 1 messages/s through paho, a collector validates and writes ~5,000
# readings/s per core; a device's state (address-space node, tracker entry, queue) costs KiBs.
SIMULATOR_MILLICORES_PER_READING_S = 0.1
COLLECTOR_MILLICORES_PER_READING_S = 0.2
SIMULATOR_MIB_PER_DEVICE = 0.02
COLLECTOR_MIB_PER_SERIES = 0.002
COLLECTOR_MIB_PER_BATCH_ROW = 0.001
MQTT_QUEUED_MESSAGE_MIB = 0.0003  # a simulator's publish queue holds up to maxQueued messages


def pod_resources(fleet: SensorFleet, role: str, protocol: str | None = None) -> dict[str, dict[str, str]]:
    """Requests/limits of one pod: the role's floor (RESOURCES), grown with the devices per replica
    of simulators and collectors, so a 10,000-device fleet is not squeezed into a laptop's pod."""
    if protocol is None or role not in ("simulator", "collector"):
        return RESOURCES[role]
    spec = fleet.spec.protocol(protocol)
    pods = spec.replicas if role == "simulator" else collector_count(fleet, protocol)
    devices = math.ceil(spec.devices / pods)
    series = devices * len(fleet.spec.sensors)
    readings_per_second = series / spec.interval
    if role == "simulator":
        cpu = 20 + readings_per_second * SIMULATOR_MILLICORES_PER_READING_S
        memory = 64 + devices * SIMULATOR_MIB_PER_DEVICE
        queue = fleet.spec.protocols.mqtt.max_queued * MQTT_QUEUED_MESSAGE_MIB if protocol == "mqtt" else 0
        if protocol == "mqtt" and fleet.spec.protocols.mqtt.connection_per_device:
            memory += devices * SIMULATOR_MIB_PER_CONNECTION
    else:
        cpu = 20 + readings_per_second * COLLECTOR_MILLICORES_PER_READING_S
        memory = 96 + series * COLLECTOR_MIB_PER_SERIES + fleet.spec.collector.batch_size * COLLECTOR_MIB_PER_BATCH_ROW
        # While the store fails a collector holds up to maxBufferedReadings (collectors/backpressure.py).
        queue = fleet.spec.storage.max_buffered_readings * COLLECTOR_MIB_PER_BATCH_ROW
    floor = RESOURCES[role]
    cpu_request = min(max(cpu, _millis(floor["requests"]["cpu"])), 4000)
    memory_request = min(max(memory, _mebibytes(floor["requests"]["memory"])), 16384)
    return {
        "requests": {"cpu": _cpu(cpu_request), "memory": _memory(memory_request)},
        "limits": {"cpu": _cpu(max(2 * cpu_request, _millis(floor["limits"]["cpu"]))),
                   "memory": _memory(max(3 * memory_request + queue, _mebibytes(floor["limits"]["memory"])))},
    }


def _millis(quantity: str) -> float:
    return float(quantity[:-1]) if quantity.endswith("m") else float(quantity) * 1000


def _mebibytes(quantity: str) -> float:
    units = {"Mi": 1.0, "Gi": 1024.0, "Ki": 1 / 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def _app_container(name: str, args: list[str], role: str, options: BuildOptions, env: list[dict[str, Any]],
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
        "securityContext": _container_security(),
        "volumeMounts": _app_mounts(with_data),
        **_probes(fleet, role),
    }
    return container


# --------------------------------------------------------------------------------------------
# the children
# --------------------------------------------------------------------------------------------


def fleet_manifest_for_pods(fleet: SensorFleet) -> str:
    """The manifest the pods read: name and namespace only from metadata, spec with defaults filled."""
    clean = SensorFleet.model_validate(
        {"metadata": {"name": fleet.metadata.name, "namespace": fleet.metadata.namespace},
         "spec": fleet.spec.model_dump(mode="json", by_alias=True)}
    )
    return dump_fleet(clean)


def build_fleet_configmap(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(fleet_configmap_name(fleet.name), owner, labels(fleet.name, "config", options)),
        "data": {"fleet.yaml": fleet_manifest_for_pods(fleet)},
    }


# A session that is not resumed within this time (a collector replica scaled away) is dropped by
# the broker with its queue; a restarting collector pod is back within minutes.
BROKER_SESSION_EXPIRY = "1h"
BROKER_QUEUE_BYTES = 64 << 20


def broker_queue_bytes(fleet: SensorFleet) -> int:
    """Per-session queue bound: ~400,000 readings on the wire, minutes of a collector's share at
    the rates one broker carries. Fixed, so that a device-count edit never restarts the broker.
    Readings beyond it are dropped by the broker and show up as gaps (lost) in the collector's
    accounting."""
    return BROKER_QUEUE_BYTES


# connectionPerDevice (simulators/mqtt_devices.py): what one device connection costs, measured by
# bench/bench_connections.py (RSS growth over 10,000 connections, rounded up).
SIMULATOR_MIB_PER_CONNECTION = 0.02
BROKER_MIB_PER_CONNECTION = 0.02
BROKER_SPARE_CONNECTIONS = 64  # collectors, the helm test pod, a user's mosquitto_sub


def broker_max_connections(fleet: SensorFleet) -> int:
    """Mosquitto's `max_connections`: with connectionPerDevice every device is a client, so the
    bound is the devices plus the collectors plus spare; otherwise no bound (-1)."""
    mqtt = fleet.spec.protocols.mqtt
    if not (mqtt.enabled and mqtt.connection_per_device):
        return -1
    return mqtt.devices + collector_count(fleet, "mqtt") + BROKER_SPARE_CONNECTIONS


def broker_resources(fleet: SensorFleet) -> tuple[dict[str, dict[str, str]], str]:
    """The broker's requests/limits and its data volume's size limit, from the sessions it may hold
    (each up to broker_queue_bytes, held in memory and in the persistence file): scaling the
    collectors resizes (and so restarts) the broker; its persistent sessions survive that."""
    queued_mib = collector_count(fleet, "mqtt") * broker_queue_bytes(fleet) / (1 << 20)
    queued_mib += max(0, broker_max_connections(fleet)) * BROKER_MIB_PER_CONNECTION
    floor = RESOURCES["broker"]
    memory_limit = max(_mebibytes(floor["limits"]["memory"]), 64 + 2 * queued_mib)
    resources = {"requests": floor["requests"], "limits": {**floor["limits"], "memory": _memory(memory_limit)}}
    return resources, _memory(64 + 2 * queued_mib)


def mosquitto_conf(fleet: SensorFleet) -> str:
    """mosquitto.conf of the fleet's broker: the same renderer as local runs (sensorfleet.broker),
    listening on every interface, persistence on the pod's volume, the hashed password file that
    the init container writes; sessions expire and queues are bounded (sized in broker_resources)."""
    password_file = "/mosquitto/auth/passwd" if fleet.spec.broker.authentication else None
    return mosquitto_config(broker_port(fleet), None, "/mosquitto/data", password_file,
                            session_expiry=BROKER_SESSION_EXPIRY, max_queued_bytes=broker_queue_bytes(fleet),
                            max_connections=broker_max_connections(fleet))


def build_broker_config(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(broker_config_name(fleet.name), owner, labels(fleet.name, "broker", options)),
        "data": {"mosquitto.conf": mosquitto_conf(fleet)},
    }


def build_broker_secret(fleet: SensorFleet, owner: Owner, options: BuildOptions, credentials: BrokerCredentials) -> dict[str, Any]:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(broker_secret_name(fleet.name), owner, labels(fleet.name, "broker", options)),
        "data": {"username": b64(credentials.username), "password": b64(credentials.password)},
    }


def build_broker_deployment(fleet: SensorFleet, owner: Owner, options: BuildOptions, credentials: BrokerCredentials) -> dict[str, Any]:
    auth = fleet.spec.broker.authentication
    secret = broker_secret_name(fleet.name)
    mounts = [
        {"name": "config", "mountPath": "/mosquitto/config", "readOnly": True},
        {"name": "data", "mountPath": "/mosquitto/data"},
        {"name": "auth", "mountPath": "/mosquitto/auth"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    init: list[dict[str, Any]] = []
    if auth:
        init.append({
            "name": "hash-credentials",
            "image": fleet.spec.broker.image,
            "imagePullPolicy": options.image_pull_policy,
            # $(VAR) is expanded by the kubelet from env; the password never reaches the config map.
            "command": ["mosquitto_passwd", "-b", "-c", "/mosquitto/auth/passwd",
                        "$(MQTT_USERNAME)", "$(MQTT_PASSWORD)"],
            "env": [
                {"name": "MQTT_USERNAME", "valueFrom": {"secretKeyRef": {"name": secret, "key": "username"}}},
                {"name": "MQTT_PASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}}},
            ],
            "resources": RESOURCES["init"],
            "securityContext": _container_security(),
            "volumeMounts": [{"name": "auth", "mountPath": "/mosquitto/auth"}, {"name": "tmp", "mountPath": "/tmp"}],
        })
    port = broker_port(fleet)
    resources, data_limit = broker_resources(fleet)
    pod_spec = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(MOSQUITTO_UID),
        "initContainers": init,
        "containers": [{
            "name": "mosquitto",
            "image": fleet.spec.broker.image,
            "imagePullPolicy": options.image_pull_policy,
            "command": ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"],
            "ports": [{"name": "mqtt", "containerPort": port, "protocol": "TCP"}],
            "resources": resources,
            "securityContext": _container_security(),
            "readinessProbe": {"tcpSocket": {"port": "mqtt"}, "periodSeconds": 5},
            "livenessProbe": {"tcpSocket": {"port": "mqtt"}, "initialDelaySeconds": 10, "periodSeconds": 20},
            "volumeMounts": mounts,
        }],
        "volumes": [
            {"name": "config", "configMap": {"name": broker_config_name(fleet.name)}},
            {"name": "data", "emptyDir": {"sizeLimit": data_limit}},
            {"name": "auth", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        ],
    }
    # Restart the broker when its config or its credentials change (never for other spec edits).
    template_hash = spec_hash(mosquitto_conf(fleet), fleet.spec.broker.image,
                              hashlib.sha256(f"{credentials.username}:{credentials.password}".encode()).hexdigest())
    return _deployment(broker_name(fleet.name), owner, "broker", {}, pod_spec, template_hash, options, strategy="Recreate")


def build_broker_service(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(broker_name(fleet.name), owner, labels(fleet.name, "broker", options)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(fleet.name, "broker"),
            "ports": [{"name": "mqtt", "port": broker_port(fleet), "targetPort": "mqtt", "protocol": "TCP"}],
        },
    }


def simulator_args(fleet: SensorFleet, protocol: str, replica: int) -> list[str]:
    args = ["simulate", protocol, "--fleet", FLEET_FILE]
    if protocol == "mqtt":
        args += ["--broker", broker_url(fleet)]
    else:
        port = fleet.spec.protocols.coap.port if protocol == "coap" else fleet.spec.protocols.opcua.port
        args += ["--host", "0.0.0.0", "--port", str(port)]
    return [*args, "--replica", str(replica), *_metrics_args(fleet)]


def _server_port(fleet: SensorFleet, protocol: str) -> dict[str, Any]:
    if protocol == "coap":
        return {"name": "coap", "containerPort": fleet.spec.protocols.coap.port, "protocol": "UDP"}
    return {"name": "opcua", "containerPort": fleet.spec.protocols.opcua.port, "protocol": "TCP"}


def build_simulator_deployment(fleet: SensorFleet, owner: Owner, options: BuildOptions, protocol: str, replica: int) -> dict[str, Any]:
    ports = _metrics_port(fleet)
    env = _protocol_env(fleet, protocol)
    sections = ["seed", "epoch", "sensors", "anomalies", "replay", "monitoring"]
    if protocol == "mqtt":
        sections.append("broker")
    else:
        ports = [_server_port(fleet, protocol), *ports]
    container = _app_container("simulator", simulator_args(fleet, protocol, replica), "simulator", options, env, ports, fleet,
                               with_data=False, protocol=protocol)
    template_hash = spec_hash(_section(fleet, *sections), fleet.spec.protocols.model_dump(mode="json", by_alias=True)[protocol])
    return _deployment(
        simulator_name(fleet.name, protocol, replica), owner, f"{protocol}-simulator",
        {PROTOCOL_LABEL: protocol, REPLICA_LABEL: str(replica)},
        _app_pod_spec(fleet, container, with_data=False), template_hash, options,
    )


def build_simulator_service(fleet: SensorFleet, owner: Owner, options: BuildOptions, protocol: str, replica: int) -> dict[str, Any]:
    port = _server_port(fleet, protocol)
    extra = {PROTOCOL_LABEL: protocol, REPLICA_LABEL: str(replica)}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(simulator_name(fleet.name, protocol, replica), owner,
                              labels(fleet.name, f"{protocol}-simulator", options, **extra)),
        "spec": {
            "type": "ClusterIP",
            "selector": {**selector_labels(fleet.name, f"{protocol}-simulator"), **extra},
            "ports": [{"name": port["name"], "port": port["containerPort"], "targetPort": port["name"], "protocol": port["protocol"]}],
        },
    }


def collector_count(fleet: SensorFleet, protocol: str) -> int:
    """Collector pods of a protocol. CoAP/OPC UA collectors split the simulator servers between
    them, so there are never more collectors than servers; MQTT collectors share a subscription."""
    spec = fleet.spec.protocol(protocol)
    if protocol == "mqtt":
        return spec.collector_replicas
    return min(spec.collector_replicas, spec.replicas)


def collector_targets(fleet: SensorFleet, protocol: str, replica: int) -> list[str]:
    """The simulator servers collector `replica` observes: every n-th one, n = collector count."""
    spec = fleet.spec.protocol(protocol)
    count = collector_count(fleet, protocol)
    if protocol == "coap":
        return [f"coap://{simulator_name(fleet.name, 'coap', i)}:{fleet.spec.protocols.coap.port}"
                for i in range(spec.replicas) if i % count == replica]
    return [f"opc.tcp://{simulator_name(fleet.name, 'opcua', i)}:{fleet.spec.protocols.opcua.port}"
            for i in range(spec.replicas) if i % count == replica]


def collector_args(fleet: SensorFleet, protocol: str, replica: int) -> list[str]:
    args = ["collect", protocol, "--fleet", FLEET_FILE, "--data", data_location(fleet), *_metrics_args(fleet)]
    if protocol == "mqtt":
        args += ["--broker", broker_url(fleet), "--client-id", collector_name(fleet.name, "mqtt", replica)]
    else:
        for target in collector_targets(fleet, protocol, replica):
            args += ["--target", target]
    return args


def build_collector_deployment(fleet: SensorFleet, owner: Owner, options: BuildOptions, protocol: str, replica: int) -> dict[str, Any]:
    env = _protocol_env(fleet, protocol) + storage_env(fleet)
    with_data = uses_claim(fleet)
    container = _app_container("collector", collector_args(fleet, protocol, replica), "collector", options, env,
                               _metrics_port(fleet), fleet, with_data=with_data, protocol=protocol)
    # seed/epoch (with the protocol's interval and devices) define the sequence space and the values
    # the collector expects: an edit must restart it, or it reads the new readings with old state.
    sections = ["seed", "epoch", "sensors", "anomalies", "replay", "collector", "storage", "monitoring"] + (
        ["broker"] if protocol == "mqtt" else [])
    template_hash = spec_hash(_section(fleet, *sections), fleet.spec.protocols.model_dump(mode="json", by_alias=True)[protocol])
    return _deployment(
        collector_name(fleet.name, protocol, replica), owner, f"{protocol}-collector",
        {PROTOCOL_LABEL: protocol, REPLICA_LABEL: str(replica)},
        _app_pod_spec(fleet, container, with_data=with_data), template_hash, options,
        pod_labels=claim_user_labels(fleet),
    )


def build_data_claim(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    """The dataset's claim. Like a StatefulSet's claims it outlives the fleet by default: no
    ownerReference (garbage collection would delete it with the fleet), a label saying so; with
    `claimRetention.whenDeleted: Delete` it is owned like every other child."""
    storage = fleet.spec.storage
    spec: dict[str, Any] = {
        "accessModes": list(storage.access_modes),
        "resources": {"requests": {"storage": storage.size or "5Gi"}},
    }
    if storage.storage_class_name:
        spec["storageClassName"] = storage.storage_class_name
    when_deleted = storage.claim_retention.when_deleted
    meta = _metadata(data_claim_name(fleet.name), owner, labels(fleet.name, "dataset", options, **{CLAIM_RETENTION_LABEL: when_deleted}))
    if when_deleted == "Retain":
        del meta["ownerReferences"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def retains_claim(fleet: SensorFleet) -> bool:
    return uses_claim(fleet) and fleet.spec.storage.claim_retention.when_deleted == "Retain"


def compaction_args(fleet: SensorFleet) -> list[str]:
    args = ["compact", "--data", data_location(fleet)]
    if fleet.spec.storage.retention_days:
        args += ["--retention-days", str(fleet.spec.storage.retention_days)]
    return args


def build_compaction_cronjob(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    """One job per fleet, not a thread in every collector: a single writer of compaction per
    dataset needs no coordination between collector replicas, the collectors' memory and CPU
    stay with intake, and a killed job is simply the next run's recovery (compaction.py)."""
    with_data = uses_claim(fleet)
    container = _app_container("compact", compaction_args(fleet), "forecast", options, storage_env(fleet), [], fleet, with_data=with_data)
    for probe in ("readinessProbe", "livenessProbe"):
        container.pop(probe, None)
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    pod_spec = _app_pod_spec(fleet, container, with_data=with_data)
    pod_spec["restartPolicy"] = "Never"
    lbls = labels(fleet.name, "compaction", options)
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": _metadata(compaction_name(fleet.name), owner, lbls),
        "spec": {
            "schedule": " ".join(fleet.spec.storage.compaction_schedule.split()),
            "concurrencyPolicy": "Forbid",  # one compaction of a dataset at a time
            "startingDeadlineSeconds": 600,
            "successfulJobsHistoryLimit": 1,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": lbls},
                "spec": {
                    "backoffLimit": 2,
                    "activeDeadlineSeconds": 3000,
                    "ttlSecondsAfterFinished": 86400,
                    "template": {
                        "metadata": {"labels": {**lbls, **claim_user_labels(fleet)},
                                     "annotations": {HASH_ANNOTATION: spec_hash(_section(fleet, "storage"))}},
                        "spec": pod_spec,
                    },
                },
            },
        },
    }


# Where the forecast container writes its outcome (Kubernetes' default terminationMessagePath):
# the operator reads it from the finished pod into status.lastForecast.
TERMINATION_MESSAGE_PATH = "/dev/termination-log"


def forecast_args(fleet: SensorFleet) -> list[str]:
    # A young fleet's dataset (empty, or shorter than horizon + CV + a daily season) is waiting for
    # data, not a failed job; a series that started later than the others is left out of one run
    # rather than failing it (docs/forecasting.md, "A young dataset").
    args = ["forecast", "--data", data_location(fleet), "--out", reports_location(fleet), "--fleet", FLEET_FILE,
            "--wait-for-data", "--drop-short", "--termination-message", TERMINATION_MESSAGE_PATH]
    shards = fleet.spec.forecasting.parallelism
    if shards > 1:
        # Each pod of the Indexed Job forecasts its hash shard; the kubelet expands $(VAR) from the
        # container's env (JOB_COMPLETION_INDEX is set by the Job controller, JOB_NAME below).
        args += ["--shard", f"$({ENV_JOB_INDEX})/{shards}", "--merge-when-done", "--run-id", f"$({ENV_JOB_NAME})"]
    return args


def forecast_job_spec(fleet: SensorFleet, template: dict[str, Any]) -> dict[str, Any]:
    """The spec of the forecast CronJob's Job: one pod, or with `spec.forecasting.parallelism` N
    an Indexed Job of N pods (completions = parallelism = N), one hash shard each; the pod that
    finds every shard of its Job complete merges them (docs/forecasting.md, "Sharded runs")."""
    shards = fleet.spec.forecasting.parallelism
    spec: dict[str, Any] = {"backoffLimit": 1, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 86400, "template": template}
    if shards > 1:
        spec.update({"completionMode": "Indexed", "completions": shards, "parallelism": shards,
                     "backoffLimit": shards})  # about one retry per shard
    return spec


def build_forecast_cronjob(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    with_data = uses_claim(fleet)
    # A batch job is gone before Prometheus could scrape it: it pushes its figures instead.
    push = fleet.spec.monitoring.pushgateway_url
    env = [{"name": "SENSORFLEET_PUSHGATEWAY_URL", "value": push}] if push else []
    if fleet.spec.forecasting.api_key:
        env.append(secret_env(ENV_NIXTLA_API_KEY, fleet.spec.forecasting.api_key))
    env += storage_env(fleet)
    if fleet.spec.forecasting.parallelism > 1:
        # The run id the shards of one Job share: the Job's name (the label every Job pod carries).
        env.append({"name": ENV_JOB_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}})
    container = _app_container("forecast", forecast_args(fleet), "forecast", options, env, [], fleet, with_data=with_data)
    for probe in ("readinessProbe", "livenessProbe"):
        container.pop(probe, None)  # a batch job serves no metrics port
    container["terminationMessagePath"] = TERMINATION_MESSAGE_PATH
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    pod_spec = _app_pod_spec(fleet, container, with_data=with_data)
    pod_spec["restartPolicy"] = "Never"
    lbls = labels(fleet.name, "forecast", options)
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": _metadata(forecast_name(fleet.name), owner, lbls),
        "spec": {
            "schedule": " ".join(fleet.spec.forecasting.schedule.split()),
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 300,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": lbls},
                "spec": forecast_job_spec(fleet, {
                    "metadata": {"labels": {**lbls, **claim_user_labels(fleet)},
                                 "annotations": {HASH_ANNOTATION: spec_hash(_section(fleet, "forecasting", "storage", "monitoring"))}},
                    "spec": pod_spec,
                }),
            },
        },
    }


def build_metrics_service(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    """Headless Service over every pod of the fleet that serves metrics (for ServiceMonitors and
    for `kubernetes_sd_configs` role endpoints)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(metrics_service_name(fleet.name), owner, labels(fleet.name, "metrics", options)),
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
        "metadata": _metadata(fleet.name, owner, labels(fleet.name, "metrics", options)),
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
        "metadata": _metadata(network_policy_name(fleet.name), owner, labels(fleet.name, "network", options)),
        "spec": {"podSelector": fleet_pods, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def build_children(fleet: SensorFleet, owner: Owner, options: BuildOptions,
                   credentials: BrokerCredentials | None) -> list[dict[str, Any]]:
    """Every child of the fleet, in apply order (config before the pods that mount it).

    `credentials` are the broker's (existing ones are passed back in so they never change);
    required when `uses_broker(fleet)`.
    """
    children = [build_fleet_configmap(fleet, owner, options)]
    if uses_broker(fleet):
        if credentials is None:
            raise ValueError("the fleet runs a broker: pass its credentials")
        children += [
            build_broker_secret(fleet, owner, options, credentials),
            build_broker_config(fleet, owner, options),
            build_broker_service(fleet, owner, options),
            build_broker_deployment(fleet, owner, options, credentials),
        ]
    if uses_claim(fleet):
        children.append(build_data_claim(fleet, owner, options))
    for protocol in PROTOCOLS:
        spec = fleet.spec.protocol(protocol)
        if not spec.enabled:
            continue
        for replica in range(spec.replicas):
            if protocol != "mqtt":
                children.append(build_simulator_service(fleet, owner, options, protocol, replica))
            children.append(build_simulator_deployment(fleet, owner, options, protocol, replica))
        for replica in range(collector_count(fleet, protocol)):
            children.append(build_collector_deployment(fleet, owner, options, protocol, replica))
    from sensorfleet.operator.source_builders import build_source_collectors  # built on this module's pieces

    children += build_source_collectors(fleet, owner, options)
    if fleet.spec.forecasting.enabled:
        children.append(build_forecast_cronjob(fleet, owner, options))
    children.append(build_compaction_cronjob(fleet, owner, options))
    if fleet.spec.monitoring.enabled:
        children.append(build_metrics_service(fleet, owner, options))
        if fleet.spec.monitoring.pod_monitor:
            children.append(build_pod_monitor(fleet, owner, options))
    if options.network_policy:
        children.append(build_network_policy(fleet, owner, options))
    return children


def fleet_from_body(body: dict[str, Any]) -> SensorFleet:
    """The SensorFleet model of a custom object as the API server returns it."""
    meta = body.get("metadata", {})
    return SensorFleet.model_validate({
        "apiVersion": body.get("apiVersion", f"{API_GROUP}/{API_VERSION}"),
        "kind": KIND,
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": body.get("spec") or {},
    })


def owner_from_body(body: dict[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def desired_pods(fleet: SensorFleet) -> dict[str, dict[str, int]]:
    """Per enabled protocol: how many simulator and collector pods the fleet should run."""
    return {
        p: {"simulators": fleet.spec.protocol(p).replicas, "collectors": collector_count(fleet, p)}
        for p in fleet.spec.enabled_protocols()
    }
