"""A failed reconcile on the real API server: an object of a child's name that the fleet did not
create is left alone (a Warning Event names it, the fleet is Degraded), and once it is gone the
fleet recovers by itself — the backoff retry, not an event or the 5-minute resync, brings it back."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from sensorfleet.operator import child_meta

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NS = "sf-adopt"
FLEET = "adopt"


def wait_for(what: str, condition: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if last := condition():
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def kjson(cluster: Any, *args: str) -> Any:
    result = cluster.kubectl(*args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (body.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def test_a_foreign_object_is_never_adopted_and_the_fleet_recovers_once_it_is_gone(deployed: dict[str, Any]) -> None:
    cluster = deployed["cluster"]
    cluster.kubectl("create", "namespace", NS, check=False)
    try:
        theirs = child_meta.fleet_configmap_name(FLEET)
        cluster.kubectl("create", "configmap", theirs, "-n", NS, "--from-literal=owner=someone-else")
        fleet = {"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet",
                 "metadata": {"name": FLEET, "namespace": NS},
                 "spec": {"protocols": {"mqtt": {"devices": 3}}, "storage": {"url": "memory://adopt"}}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(fleet))

        def refused() -> list[dict[str, Any]]:
            events = kjson(cluster, "get", "events", "-n", NS, "--field-selector", "reason=NotOwned") or {"items": []}
            return events["items"]
        events = wait_for("a NotOwned Warning Event", refused, 60)
        assert events[0]["type"] == "Warning" and events[0]["involvedObject"]["name"] == FLEET
        assert f"ConfigMap {NS}/{theirs}" in events[0]["message"]
        body = wait_for("Degraded NotOwned", lambda: (lambda b: b if condition(b, "Degraded").get("reason") == "NotOwned"
                                                      else None)(kjson(cluster, "get", "sensorfleet", FLEET, "-n", NS)), 60)
        assert condition(body, "Ready")["status"] == "False"
        time.sleep(3)  # several retries have run meanwhile: the object is still untouched
        cm = kjson(cluster, "get", "configmap", theirs, "-n", NS)
        assert cm["data"] == {"owner": "someone-else"}
        assert not cm["metadata"].get("ownerReferences") and not cm["metadata"].get("labels")
        assert len(refused()) == 1  # one Event, not one per retry

        # Deleting an unlabelled object sends the operator no event; the backoff retry finds it gone.
        cluster.kubectl("delete", "configmap", theirs, "-n", NS)

        def ready() -> dict[str, Any] | None:
            b = kjson(cluster, "get", "sensorfleet", FLEET, "-n", NS)
            return b if condition(b, "Ready").get("status") == "True" else None
        wait_for("the fleet Ready by itself", ready, 90)
        ours = kjson(cluster, "get", "configmap", theirs, "-n", NS)
        assert ours["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
        assert "fleet.yaml" in ours["data"]
    finally:
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_a_fleet_deleted_and_recreated_under_its_name_owns_its_broker_secret_again(deployed: dict[str, Any]) -> None:
    """Issue 12: the recreated fleet stayed Degraded NotOwned on `<fleet>-broker-credentials`. The
    operator had cached the deleted fleet's uid as the Secret's owner (Secrets are not watched, so
    nothing cleared it) and refused the Secret the new fleet was about to create."""
    cluster = deployed["cluster"]
    namespace, name = "sf-recreate", "again"
    secret_name = child_meta.broker_secret_name(name)
    cluster.kubectl("create", "namespace", namespace, check=False)
    fleet = {"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": name, "namespace": namespace},
             "spec": {"protocols": {"mqtt": {"devices": 2}, "coap": {"enabled": False}, "opcua": {"enabled": False}},
                      "storage": {"url": "memory://recreate"}, "forecasting": {"enabled": False}}}

    def body() -> dict[str, Any] | None:
        return kjson(cluster, "get", "sensorfleet", name, "-n", namespace)

    def ready_at(generation: int) -> Any:
        def check() -> dict[str, Any] | None:
            b = body()
            ready = condition(b or {}, "Ready")
            return b if ready.get("status") == "True" and ready.get("observedGeneration") == generation else None
        return check

    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(fleet))
        first = wait_for("the first fleet Ready", ready_at(1), 90)
        # A second full pass (a spec edit; in production the 5-minute resync) reads the Secret,
        # which is when its owner was cached.
        cluster.kubectl("patch", "sensorfleet", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {"protocols": {"mqtt": {"devices": 3}}}}))
        wait_for("the edited fleet Ready", ready_at(2), 90)
        cluster.kubectl("delete", "sensorfleet", name, "-n", namespace, "--wait=true")
        # Recreated once deletion is complete: every child of the first fleet garbage-collected.
        def children_left() -> list[str]:
            listed = kjson(cluster, "get", "deployments,services,configmaps,secrets,cronjobs", "-n", namespace,
                           "-l", f"{child_meta.FLEET_LABEL}={name}") or {"items": []}
            return [f"{i['kind']}/{i['metadata']['name']}" for i in listed["items"]]
        wait_for("the first fleet's children garbage-collected", lambda: not children_left(), 90)
        assert kjson(cluster, "get", "secret", secret_name, "-n", namespace) is None

        cluster.kubectl("apply", "-f", "-", input=json.dumps(fleet))
        try:
            second = wait_for("the recreated fleet Ready", ready_at(1), 90)
        except AssertionError as error:  # before the fix: Degraded NotOwned on the broker Secret, for ever
            now = body() or {"metadata": {}}
            raise AssertionError(f"{error}; first fleet uid {first['metadata']['uid']}, recreated uid {now['metadata'].get('uid')}; "
                                 f"Degraded: {condition(now, 'Degraded')}") from None
        assert second["metadata"]["uid"] != first["metadata"]["uid"]
        assert condition(second, "Degraded")["status"] == "False", condition(second, "Degraded")
        secret = kjson(cluster, "get", "secret", secret_name, "-n", namespace)
        assert secret["metadata"]["ownerReferences"][0]["uid"] == second["metadata"]["uid"]
        events = kjson(cluster, "get", "events", "-n", namespace, "--field-selector", "reason=NotOwned") or {"items": []}
        assert not events["items"], [e["message"] for e in events["items"]]
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
