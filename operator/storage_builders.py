"""Where a fleet's dataset lives: the `<fleet>-data` PersistentVolumeClaim (unless
spec.storage.url is set), whether it outlives the fleet, and keeping every pod that mounts a
ReadWriteOnce claim on one node.
"""

from __future__ import annotations

from typing import Any

from sensorfleet.operator.child_meta import (
    CLAIM_RETENTION_LABEL,
    DATA_CLAIM_LABEL,
    BuildOptions,
    Owner,
    data_claim_name,
    labels,
    object_metadata,
)
from sensorfleet.spec import SensorFleet

DATA_DIR = "/data"


def uses_claim(fleet: SensorFleet) -> bool:
    return not fleet.spec.storage.url


def retains_claim(fleet: SensorFleet) -> bool:
    return uses_claim(fleet) and fleet.spec.storage.claim_retention.when_deleted == "Retain"


def data_location(fleet: SensorFleet) -> str:
    """`--data` of collectors and the forecast job: the mounted claim or the fsspec URL."""
    return fleet.spec.storage.url or DATA_DIR


def reports_location(fleet: SensorFleet) -> str:
    # Beside the Parquet partitions, but named with "_" so pyarrow's dataset discovery (and so a
    # user's plain `pandas.read_parquet(DATA)`) skips it as it skips "_SUCCESS"-style files.
    return data_location(fleet).rstrip("/") + "/_reports"


def claim_is_single_node(fleet: SensorFleet) -> bool:
    """A ReadWriteOnce volume attaches to one node: every pod mounting it must run there."""
    return "ReadWriteMany" not in fleet.spec.storage.access_modes


def claim_user_labels(fleet: SensorFleet) -> dict[str, str]:
    """On every pod that mounts the data claim (the pod-affinity term matches them)."""
    return {DATA_CLAIM_LABEL: data_claim_name(fleet.name)} if uses_claim(fleet) else {}


def same_node_as_claim_users(fleet: SensorFleet) -> dict[str, Any]:
    # Required pod affinity to the pods that mount the claim, on one hostname. The first such pod
    # matches its own term, which the scheduler accepts when no other pod matches yet; every
    # later one (collectors, the forecast and compaction jobs) follows it to its node, so a
    # ReadWriteOnce volume is never asked to attach to a second node (Multi-Attach error).
    return {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": claim_user_labels(fleet)},
        "topologyKey": "kubernetes.io/hostname",
    }]}}


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
    meta = object_metadata(data_claim_name(fleet.name), owner, labels(fleet.name, "dataset", options, **{CLAIM_RETENTION_LABEL: when_deleted}))
    if when_deleted == "Retain":
        del meta["ownerReferences"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}
