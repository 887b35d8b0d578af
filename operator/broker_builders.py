"""The fleet's Mosquitto broker, when MQTT is enabled and the broker is not external:
`<fleet>-broker-config` (mosquitto.conf), `<fleet>-broker-credentials` (Secret) and
`<fleet>-broker` (Deployment + Service), sized from the sessions it may hold.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from sensorfleet.broker import mosquitto_config
from sensorfleet.operator.child_meta import (
    BuildOptions,
    Owner,
    broker_config_name,
    broker_name,
    broker_secret_name,
    labels,
    object_metadata,
    selector_labels,
    spec_hash,
)
from sensorfleet.operator.pod_builders import container_security, pod_security, single_pod_deployment
from sensorfleet.operator.sizing import RESOURCES, collector_count, memory_quantity, parse_mebibytes
from sensorfleet.spec import SensorFleet

BROKER_USERNAME = "sensorfleet"
MQTT_PORT = 1883
MOSQUITTO_UID = 1883  # the `mosquitto` user of the eclipse-mosquitto image


@dataclass(frozen=True)
class BrokerCredentials:
    username: str
    password: str


# A session that is not resumed within this time (a collector replica scaled away) is dropped by
# the broker with its queue; a restarting collector pod is back within minutes.
BROKER_SESSION_EXPIRY = "1h"
BROKER_QUEUE_BYTES = 64 << 20
BROKER_MIB_PER_CONNECTION = 0.02
BROKER_SPARE_CONNECTIONS = 64  # collectors, the helm test pod, a user's mosquitto_sub


def uses_broker(fleet: SensorFleet) -> bool:
    """Does the operator run a Mosquitto broker for this fleet?"""
    return fleet.spec.protocols.mqtt.enabled and fleet.spec.broker.mode != "external"


def broker_port(fleet: SensorFleet) -> int:
    return fleet.spec.broker.port or MQTT_PORT


def broker_url(fleet: SensorFleet) -> str:
    if fleet.spec.broker.mode == "external" and fleet.spec.broker.url:
        return fleet.spec.broker.url
    return f"mqtt://{broker_name(fleet.name)}:{broker_port(fleet)}"


def broker_queue_bytes(fleet: SensorFleet) -> int:
    """Per-session queue bound: ~400,000 readings on the wire, minutes of a collector's share at
    the rates one broker carries. Fixed, so that a device-count edit never restarts the broker.
    Readings beyond it are dropped by the broker and show up as gaps (lost) in the collector's
    accounting."""
    return BROKER_QUEUE_BYTES


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
    collectors resizes (and so restarts) the broker. Known defect (seen on a real node): the new
    pod starts with an empty data emptyDir, so every session and what it queued is gone; see
    docs/reliability.md."""
    queued_mib = collector_count(fleet, "mqtt") * broker_queue_bytes(fleet) / (1 << 20)
    queued_mib += max(0, broker_max_connections(fleet)) * BROKER_MIB_PER_CONNECTION
    floor = RESOURCES["broker"]
    memory_limit = max(parse_mebibytes(floor["limits"]["memory"]), 64 + 2 * queued_mib)
    resources = {"requests": floor["requests"], "limits": {**floor["limits"], "memory": memory_quantity(memory_limit)}}
    return resources, memory_quantity(64 + 2 * queued_mib)


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
        "metadata": object_metadata(broker_config_name(fleet.name), owner, labels(fleet.name, "broker", options)),
        "data": {"mosquitto.conf": mosquitto_conf(fleet)},
    }


def build_broker_secret(fleet: SensorFleet, owner: Owner, options: BuildOptions, credentials: BrokerCredentials) -> dict[str, Any]:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": object_metadata(broker_secret_name(fleet.name), owner, labels(fleet.name, "broker", options)),
        "data": {"username": b64(credentials.username), "password": b64(credentials.password)},
    }


def build_broker_service(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(broker_name(fleet.name), owner, labels(fleet.name, "broker", options)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(fleet.name, "broker"),
            "ports": [{"name": "mqtt", "port": broker_port(fleet), "targetPort": "mqtt", "protocol": "TCP"}],
        },
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
            "securityContext": container_security(),
            "volumeMounts": [{"name": "auth", "mountPath": "/mosquitto/auth"}, {"name": "tmp", "mountPath": "/tmp"}],
        })
    port = broker_port(fleet)
    resources, data_limit = broker_resources(fleet)
    pod_spec = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security(MOSQUITTO_UID),
        "initContainers": init,
        "containers": [{
            "name": "mosquitto",
            "image": fleet.spec.broker.image,
            "imagePullPolicy": options.image_pull_policy,
            "command": ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"],
            "ports": [{"name": "mqtt", "containerPort": port, "protocol": "TCP"}],
            "resources": resources,
            "securityContext": container_security(),
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
    return single_pod_deployment(broker_name(fleet.name), owner, "broker", {}, pod_spec, template_hash, options, strategy="Recreate")
