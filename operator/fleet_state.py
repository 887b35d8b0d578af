"""What the operator remembers of one fleet between reconcile passes, and how it reads the owner
and the version of a child the API server returned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sensorfleet.operator.status import Failure

Key = tuple[str, str]  # (namespace, fleet name)

# Kinds whose state the status is computed from (kept from the watch, see Reconciler.observed).
STATUS_KINDS = ("Deployment", "Job")


@dataclass
class FleetState:
    body: dict[str, Any]
    reconciled_generation: int | None = None
    applied: dict[tuple[str, str], tuple[str, int | None]] = field(default_factory=dict)  # (kind, name) -> (rv, generation)
    desired: set[tuple[str, str]] = field(default_factory=set)  # (kind, name) of the last apply
    refused: set[tuple[str, str]] = field(default_factory=set)  # (kind, name) left alone: not ours
    failures: list[Failure] = field(default_factory=list)  # of the last FULL pass, until the next one
    forecast_pods: tuple[str, list[dict[str, Any]]] | None = None  # (job uid, its pods) of the newest finished forecast


def controller_uid(meta: dict[str, Any]) -> str | None:
    return next((ref.get("uid") for ref in meta.get("ownerReferences") or [] if ref.get("controller")), None)


def resource_version(body: dict[str, Any]) -> int:
    """resourceVersion as a number (etcd's revision); -1 when absent or not numeric."""
    try:
        return int(body.get("metadata", {}).get("resourceVersion", ""))
    except ValueError:
        return -1
