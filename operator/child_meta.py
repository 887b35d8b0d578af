"""What every child of a fleet carries: its name, the recommended `app.kubernetes.io/*` labels
with `sensorfleet.io/fleet`, a controller ownerReference to the fleet, and the spec hash on pod
templates; with the inputs they come from (the owning fleet object, the operator-wide options).

Pure, like every *_builders module: no I/O, no kopf, no clock.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sensorfleet.spec import API_GROUP, API_VERSION, KIND, SensorFleet

OPERATOR_NAME = "sensorfleet-operator"
APP_NAME = "sensorfleet"
FLEET_LABEL = f"{API_GROUP}/fleet"
PROTOCOL_LABEL = f"{API_GROUP}/protocol"
REPLICA_LABEL = f"{API_GROUP}/replica"
HASH_ANNOTATION = f"{API_GROUP}/spec-hash"
MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
DATA_CLAIM_LABEL = f"{API_GROUP}/data-claim"
CLAIM_RETENTION_LABEL = f"{API_GROUP}/on-fleet-delete"  # `kubectl get pvc -L sensorfleet.io/on-fleet-delete`


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


def object_metadata(name: str, owner: Owner, lbls: dict[str, str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
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


def spec_sections(fleet: SensorFleet, *names: str) -> dict[str, Any]:
    spec = fleet.spec.model_dump(mode="json", by_alias=True)
    return {n: spec.get(n) for n in names}
