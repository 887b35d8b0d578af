"""Thin kopf glue: watch fleets and their children, hand keys to the Reconciler.

No handler here changes anything in the cluster; they only tell the Reconciler (in kopf's memo)
which fleet needs a FULL pass or a STATUS refresh. kopf adds no finalizer and no annotations for
event handlers, so the fleet object is written only by the operator's status updates.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from sensorfleet.operator import child_meta
from sensorfleet.operator.crd import PLURAL
from sensorfleet.operator.kube import KubeClient
from sensorfleet.spec import API_GROUP, API_VERSION

# Children the operator watches to restore hand edits/deletions and follow their status, each
# through a label-selector watch (the API server sends only the operator's children, see
# operator_settings). Secrets are deliberately not watched (no list/watch on Secrets at all); a
# deleted broker Secret comes back on the periodic resync.
WATCHED_CHILDREN: tuple[tuple[str, str, str], ...] = (
    ("apps", "v1", "deployments"),
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
    ("", "v1", "persistentvolumeclaims"),
    ("batch", "v1", "cronjobs"),
    ("batch", "v1", "jobs"),
)
CHILD_LABELS = {child_meta.MANAGED_BY: child_meta.OPERATOR_NAME}
CHILD_SELECTOR = ",".join(f"{k}={v}" for k, v in CHILD_LABELS.items())


def make_registry(client: KubeClient) -> kopf.OperatorRegistry:
    """A registry with the operator's handlers (built per operator, no module-level state)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return client.connection_info()  # re-read on every re-login: rotated tokens are picked up

    # The handlers are coroutines: kopf runs a plain function in a thread pool, and the Reconciler's
    # queue and dicts belong to the event loop (a put from another thread does not wake a worker).
    @kopf.on.event(API_GROUP, API_VERSION, PLURAL, registry=registry)
    async def fleet_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        if type == "DELETED":
            memo.reconciler.fleet_gone(body["metadata"]["namespace"], body["metadata"]["name"], _plain(body))
        else:
            memo.reconciler.fleet_seen(_plain(body))

    for group, version, plural in WATCHED_CHILDREN:
        async def child_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
            # type None is the initial listing: it fills the Reconciler's view of Deployments/Jobs.
            memo.reconciler.child_seen(type, _plain(body))

        kopf.on.event(group, version, plural, labels=CHILD_LABELS, registry=registry,
                      id=f"child-{plural}")(child_event)
    return registry


def _plain(body: kopf.Body) -> dict[str, Any]:
    """A detached plain-dict copy (kopf's Body is a live view)."""
    return {k: _copy(v) for k, v in body.items()}


def _copy(value: Any) -> Any:
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def operator_settings(settings: kopf.OperatorSettings | None = None) -> kopf.OperatorSettings:
    settings = settings or kopf.OperatorSettings()
    settings.peering.standalone = True  # leadership comes from the Lease (lease.py), not kopf peering
    settings.scanning.disabled = True  # no cluster-wide CRD/namespace watching: least privilege
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    # Server-side filtering: without it kopf lists and watches every Deployment, ConfigMap, Job...
    # in scope and drops the unlabelled ones itself (the handlers' `labels=` filter is client-side).
    for group, version, plural in WATCHED_CHILDREN:
        settings.watching.label_selectors[group, version, plural] = CHILD_SELECTOR
    # No batching setting: kopf >= 1.45 removed time-based event batching (configuring it only
    # warns); the Reconciler's queue coalesces bursts of events itself.
    return settings
