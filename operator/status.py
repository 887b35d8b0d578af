"""Pure status: the fleet's `.status` from the children's real state (no I/O, clock passed in).

Conditions follow the Kubernetes convention (`type`, `status`, `reason`, `message`,
`observedGeneration`, `lastTransitionTime`); `lastTransitionTime` only moves when `status` does,
so an unchanged fleet computes an identical status and the handler writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sensorfleet.operator import broker_builders, child_meta, sizing, storage_builders
from sensorfleet.operator.source_builders import source_collector_names
from sensorfleet.spec import SensorFleet


@dataclass(frozen=True)
class Failure:
    """A reconcile step that failed: shown as Degraded and emitted as a Warning Event."""

    reason: str
    message: str


def _deployment_ready(deployment: dict[str, Any]) -> bool:
    """Rolled out to the current template and its one pod ready."""
    meta, spec, status = deployment.get("metadata", {}), deployment.get("spec", {}), deployment.get("status", {})
    want = spec.get("replicas", 1)
    return (
        status.get("observedGeneration", 0) >= meta.get("generation", 1)
        and status.get("updatedReplicas", 0) >= want
        and status.get("readyReplicas", 0) >= want
        and status.get("availableReplicas", 0) >= want
        and status.get("replicas", 0) <= want
    )


def _deployment_failure(deployment: dict[str, Any]) -> str | None:
    for condition in deployment.get("status", {}).get("conditions", []):
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return f"{deployment['metadata']['name']}: {condition.get('message', 'replica failure')}"
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return f"{deployment['metadata']['name']}: rollout exceeded its progress deadline"
    return None


def _rolled_out(deployment: dict[str, Any]) -> bool:
    """Its current template became available once: the Deployment controller keeps Progressing at
    NewReplicaSetAvailable until the next rollout, also when a pod loses its readiness later."""
    meta, status = deployment.get("metadata", {}), deployment.get("status", {})
    return status.get("observedGeneration", 0) >= meta.get("generation", 1) and any(
        c.get("type") == "Progressing" and c.get("reason") == "NewReplicaSetAvailable" for c in status.get("conditions", []))


def storage_condition(fleet: SensorFleet, deployments: dict[str, dict[str, Any]]) -> tuple[str, str, str]:
    """(status, reason, message) of StorageDegraded, from the collectors' readiness: a collector's
    readinessProbe is its /readyz, which fails only while its writes to the dataset store fail
    (collectors/backpressure.py). A rolled-out collector Deployment that lost ready pods is a
    collector that cannot store; one still rolling out says nothing yet."""
    if not fleet.spec.monitoring.enabled:
        return "Unknown", "NoReadinessProbe", "spec.monitoring.enabled is false: collectors serve no /readyz to tell"
    failing, starting = [], []
    names = [child_meta.collector_name(fleet.name, protocol, i) for protocol, pods in sizing.desired_pods(fleet).items() for i in range(pods["collectors"])]
    for name in names + source_collector_names(fleet):  # a source's collector writes the same store
        deployment = deployments.get(name)
        if deployment is not None and _deployment_ready(deployment):
            continue
        if deployment is not None and _rolled_out(deployment):
            status = deployment.get("status", {})
            failing.append(f"{name} ({status.get('readyReplicas', 0)}/{deployment.get('spec', {}).get('replicas', 1)} ready)")
        else:
            starting.append(name)
    if failing:
        return ("True", "StoreUnwritable",
                f"collector(s) {', '.join(sorted(failing))} lost readiness after rolling out: their /readyz fails while writes to the "
                f"dataset store fail (or a pod is restarting). Writes are retried and readings buffered up to "
                f"spec.storage.maxBufferedReadings; the collector's log and /readyz name the path or endpoint and the errno")
    if starting:
        return "Unknown", "CollectorsStarting", f"waiting for {', '.join(sorted(starting)[:5])} to become ready once"
    return "False", "StoreWritable", "every collector writes to the dataset store"


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int,
               previous: dict[str, dict[str, Any]], now: str) -> dict[str, Any]:
    return _tristate_condition(kind, "True" if ok else "False", reason, message, generation, previous, now)


def _tristate_condition(kind: str, status: str, reason: str, message: str, generation: int,
                        previous: dict[str, dict[str, Any]], now: str) -> dict[str, Any]:
    before = previous.get(kind)
    changed = before is None or before.get("status") != status
    return {"type": kind, "status": status, "reason": reason, "message": message[:1000], "observedGeneration": generation,
            "lastTransitionTime": now if changed else before.get("lastTransitionTime", now)}  # type: ignore[union-attr]


def forecast_outcome(message: str | None) -> dict[str, Any]:
    """What a forecast container's termination message says: the JSON object `sensorfleet forecast
    --termination-message` writes (reason Forecast with a headline, WaitingForData or Failed with a
    message), or, from an older image, plain text whose last line is the headline."""
    if not message or not message.strip():
        return {}
    try:
        doc = json.loads(message)
    except ValueError:
        return {"headline": message.strip().splitlines()[-1][:200]}
    if not isinstance(doc, dict):
        return {"headline": message.strip().splitlines()[-1][:200]}
    out = {k: str(doc[k])[:500] for k in ("reason", "headline", "message") if doc.get(k) not in (None, "")}
    if "headline" in out:
        out["headline"] = out["headline"][:200]
    return out


def newest_finished_job(jobs: list[dict[str, Any]]) -> tuple[dict[str, Any], str, str] | None:
    """(job, result, when) of the forecast Job that finished last; result Succeeded or Failed."""
    finished = []
    for job in jobs:
        status = job.get("status", {})
        # An Indexed Job (spec.forecasting.parallelism) has succeeded when every index has.
        if (status.get("succeeded") or 0) >= (job.get("spec", {}).get("completions") or 1):
            finished.append((status.get("completionTime") or "", job, "Succeeded"))
        elif any(c.get("type") == "Failed" and c.get("status") == "True" for c in status.get("conditions", [])):
            when = next((c.get("lastTransitionTime") for c in status.get("conditions", []) if c.get("type") == "Failed"), "")
            finished.append((when or "", job, "Failed"))
    if not finished:
        return None
    when, job, result = max(finished, key=lambda item: item[0])
    return job, result, when


def last_forecast(jobs: list[dict[str, Any]], pods_by_job: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any] | None:
    """The newest finished forecast Job: when, which, how it went, and what its container's
    termination message says (headline of a forecast; why it waited for data)."""
    newest = newest_finished_job(jobs)
    if newest is None:
        return None
    job, result, when = newest
    name = job["metadata"]["name"]
    out: dict[str, Any] = {"job": name, "result": result}
    if when:
        out["time"] = when
    for pod in (pods_by_job or {}).get(name, []):
        for container in pod.get("status", {}).get("containerStatuses", []):
            said = forecast_outcome((container.get("state", {}).get("terminated") or {}).get("message"))
            if result == "Failed":  # the error line (ours, or the log's last line)
                said = {"message": said["message"] if "message" in said else said["headline"]} if said else {}
            out.update(said)
    if out.get("reason") == "WaitingForData":
        out.pop("time", None)  # `time` is the last forecast made; the caller keeps the previous one
    return out


def compute_status(
    fleet: SensorFleet,
    generation: int,
    deployments: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    failures: list[Failure],
    previous: dict[str, Any] | None,
    now: str,
    claim: dict[str, Any] | None = None,
    pods_by_job: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The whole `.status` for a fleet whose children are `deployments` (and forecast `jobs`)."""
    previous = previous or {}
    prev_conditions = {c["type"]: c for c in previous.get("conditions", []) if "type" in c}
    by_name = {d["metadata"]["name"]: d for d in deployments}
    protocols: dict[str, dict[str, int]] = {}
    total_desired = total_ready = 0
    not_ready: list[str] = []
    problems = [f"{f.reason}: {f.message}" for f in failures]

    def count(names: list[str]) -> int:
        nonlocal total_desired, total_ready
        ready = 0
        for name in names:
            total_desired += 1
            deployment = by_name.get(name)
            if deployment is not None and _deployment_ready(deployment):
                ready += 1
            else:
                not_ready.append(name)
            failure = _deployment_failure(deployment) if deployment is not None else None
            if failure:
                problems.append(f"RolloutFailed: {failure}")
        total_ready += ready
        return ready

    for protocol, pods in sizing.desired_pods(fleet).items():
        sims = [child_meta.simulator_name(fleet.name, protocol, i) for i in range(pods["simulators"])]
        cols = [child_meta.collector_name(fleet.name, protocol, i) for i in range(pods["collectors"])]
        protocols[protocol] = {
            "devices": fleet.spec.protocol(protocol).devices,
            "simulators": len(sims),
            "simulatorsReady": count(sims),
            "collectors": len(cols),
            "collectorsReady": count(cols),
        }
    count(source_collector_names(fleet))  # third-party sources: one collector each
    if broker_builders.uses_broker(fleet):
        count([child_meta.broker_name(fleet.name)])
    if claim is not None and claim.get("status", {}).get("phase") not in (None, "Bound", "Pending"):
        problems.append(f"ClaimLost: {claim['metadata']['name']} is {claim['status']['phase']}")

    storage, storage_reason, storage_message = storage_condition(fleet, by_name)
    if storage == "True":
        problems.append(f"{storage_reason}: {storage_message}")

    forecast = last_forecast(jobs, pods_by_job) if fleet.spec.forecasting.enabled else None
    if forecast and forecast["result"] == "Failed":
        problems.append(f"ForecastFailed: job {forecast['job']} failed" + (f": {forecast['message']}" if forecast.get("message") else ""))
    # `time` is the last *successful* forecast: keep the previous one if the newest job failed or
    # only waited for data (a young dataset is not a problem: no Degraded).
    if forecast and (forecast["result"] == "Failed" or forecast.get("reason") == "WaitingForData"):
        prior = previous.get("lastForecast") or {}
        forecast = {**forecast, **({"time": prior["time"]} if prior.get("time") else {})}
        if "time" not in prior:
            forecast.pop("time", None)

    ready = not not_ready and not failures
    degraded = bool(problems)
    progressing = bool(not_ready) and not failures
    ready_msg = (f"all {total_desired} pods ready" if ready
                 else f"{total_ready}/{total_desired} pods ready; waiting for {', '.join(sorted(not_ready)[:5])}"
                 + ("…" if len(not_ready) > 5 else "") if not failures
                 else "children could not be applied: " + "; ".join(f.message for f in failures)[:500])
    conditions = [
        _condition("Ready", ready, "AllPodsReady" if ready else ("ReconcileFailed" if failures else "PodsNotReady"),
                   ready_msg, generation, prev_conditions, now),
        _condition("Progressing", progressing, "RollingOut" if progressing else "Stable",
                   f"rolling out {len(not_ready)} deployment(s)" if progressing else "every child matches the spec",
                   generation, prev_conditions, now),
        _condition("Degraded", degraded, problems[0].split(":", 1)[0] if degraded else "AsExpected",
                   "; ".join(problems)[:1000] if degraded else "no failures", generation, prev_conditions, now),
        _tristate_condition("StorageDegraded", storage, storage_reason, storage_message, generation, prev_conditions, now),
    ]
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": conditions,
        "protocols": protocols,
        "enabledProtocols": ",".join(fleet.spec.enabled_protocols()),
        "devices": sum(fleet.spec.protocol(p).devices for p in fleet.spec.enabled_protocols()),
        "ready": f"{total_ready}/{total_desired}",
        "brokerEndpoint": broker_builders.broker_url(fleet) if fleet.spec.protocols.mqtt.enabled else "",
        "dataset": fleet.spec.storage.url or f"pvc/{child_meta.data_claim_name(fleet.name)}",
    }
    if storage_builders.uses_claim(fleet):
        status["dataClaim"] = {"name": child_meta.data_claim_name(fleet.name),
                               "onFleetDelete": fleet.spec.storage.claim_retention.when_deleted}
    if forecast:
        status["lastForecast"] = forecast
    if status["brokerEndpoint"] and broker_builders.uses_broker(fleet):
        host = f"{child_meta.broker_name(fleet.name)}.{fleet.metadata.namespace}.svc"
        status["brokerEndpoint"] = f"mqtt://{host}:{broker_builders.broker_port(fleet)}"
    return status


def same_status(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Equal for the purpose of writing: ignores nothing, but tolerates key order."""
    return (a or {}) == (b or {})


def ready_condition(status: dict[str, Any] | None) -> str:
    for condition in (status or {}).get("conditions", []):
        if condition.get("type") == "Ready":
            return condition.get("status", "Unknown")
    return "Unknown"
