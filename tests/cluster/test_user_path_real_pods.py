"""The user's path with real containers on sf-node-0: `helm install` runs the operator as a pod from
the image (identity and hardening enforced by the runtime); `kubectl apply -f examples/fleet.yaml`
(unchanged) becomes Ready with every pod on the real node; readings land on the claim (bound by the
default StorageClass) with no gap and no duplicate. Then, on that one fleet, in order: a forecast
Job made from its CronJob on the young dataset succeeds and says it waits for data; `helm test`
passes; a deleted collector pod comes back and nothing is lost or doubled; with two days of
history generated onto the claim inside a pod, the forecast Job writes report.html and
metrics.json next to the data and its headline becomes status.lastForecast; deleting the fleet
removes its pods and keeps the claim.

It sits in tests/cluster so that it runs before tests/operator, whose session-wide operator (a
local process, cluster-wide) would otherwise reconcile these fleets too.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import devcluster
from devcluster import deploy
from sensorfleet.collectors.base import SequenceSpace
from sensorfleet.dataset import read_dataset
from sensorfleet.operator import child_meta, pod_builders

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
FLEET = "demo"  # examples/fleet.yaml's name
READY_TIMEOUT = 600  # image import, a first start of Python in every pod, on a loaded 2-core machine


def fleet_ready(cluster: devcluster.Cluster, namespace: str) -> dict[str, Any] | None:
    body = cluster.kubectl_json("get", "sensorfleet", FLEET, "-n", namespace)
    conditions = body.get("status", {}).get("conditions", [])
    return body if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else None


def diagnosis(cluster: devcluster.Cluster, namespace: str) -> str:
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
    events = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
    status = cluster.kubectl("get", "sensorfleet", FLEET, "-n", namespace, "-o", "jsonpath={.status}", check=False).stdout
    return f"status: {status}\npods:\n{pods}\nevents:\n{events[-4000:]}"


@pytest.fixture(scope="module")
def real(k8s_cluster: devcluster.Cluster) -> Iterator[dict[str, Any]]:
    if not k8s_cluster.owned or k8s_cluster.node is None:
        pytest.skip("needs the local harness's real node (SENSORFLEET_USE_KUBECONFIG points elsewhere)")
    suffix = uuid.uuid4().hex[:5]
    system, fleets, release = f"sf-real-system-{suffix}", f"sf-real-{suffix}", f"sf-real-{suffix}"
    deploy.load_images_into_node(k8s_cluster)
    devcluster.real_pods_namespace(k8s_cluster, fleets)
    operator = deploy.install_operator_pod(k8s_cluster, namespace=system, release=release,
                                           extra=["--set", f"watchNamespaces={{{fleets}}}"])
    try:
        yield {"cluster": k8s_cluster, "system": system, "fleets": fleets, "release": release, "operator": operator}
    finally:
        k8s_cluster.kubectl("delete", "namespace", fleets, "--wait=true", "--timeout=120s", check=False, timeout=180)
        k8s_cluster.helm("uninstall", release, "--namespace", system, check=False)
        k8s_cluster.kubectl("delete", "namespace", system, "--wait=false", check=False)


def test_the_operator_runs_as_a_pod_with_the_charts_identity_and_hardening(real: dict[str, Any]) -> None:
    cluster, system, pod = real["cluster"], real["system"], real["operator"]
    assert pod["spec"]["nodeName"] == devcluster.NODE_NAME
    assert pod["spec"]["serviceAccountName"] == f"{real['release']}-sensorfleet-operator"  # the chart's own
    name = pod["metadata"]["name"]
    # enforced by the runtime, not only written in the manifest
    assert cluster.kubectl("exec", "-n", system, name, "--", "id", "-u").stdout.strip() == "10001"
    write = cluster.kubectl("exec", "-n", system, name, "--", "sh", "-c", "touch /opt/x", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr + write.stdout
    log = cluster.kubectl("logs", "-n", system, name).stdout
    assert log, "the operator pod logs"


def test_the_example_fleet_unchanged_becomes_ready_and_stores_readings_without_gaps(real: dict[str, Any]) -> None:
    cluster, fleets = real["cluster"], real["fleets"]
    cluster.kubectl("apply", "-n", fleets, "-f", str(REPO / "examples" / "fleet.yaml"))
    try:
        devcluster.wait_for(lambda: fleet_ready(cluster, fleets), timeout=READY_TIMEOUT, interval=3,
                            what="the example fleet to be Ready")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{diagnosis(cluster, fleets)}") from None
    pods = cluster.kubectl_json("get", "pods", "-n", fleets)["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    assert running and all(p["spec"]["nodeName"] == devcluster.NODE_NAME for p in running)
    (readings,) = devcluster.wait_for(lambda: _readings(cluster, fleets, minimum=200), timeout=300, interval=5,
                                      what="readings on the claim")
    assert_no_gaps_or_duplicates(readings)


def _claim_folder(cluster: devcluster.Cluster, namespace: str) -> Path:
    claims = cluster.kubectl_json("get", "pvc", "-n", namespace)["items"]
    (claim,) = [c for c in claims if c["metadata"]["name"].startswith(FLEET)]
    assert claim["status"]["phase"] == "Bound"
    assert claim["spec"]["storageClassName"] == devcluster.STORAGE_CLASS
    volume = cluster.kubectl_json("get", "pv", claim["spec"]["volumeName"])
    return Path((volume["spec"].get("hostPath") or volume["spec"]["local"])["path"])


def _readings(cluster: devcluster.Cluster, namespace: str, minimum: int, since: datetime | None = None) -> tuple[Any] | None:
    """(frame,) once the claim holds `minimum` readings taken at or after `since` (a tuple: a
    DataFrame has no truth value)."""
    frame = read_dataset(str(_claim_folder(cluster, namespace)), start=since)
    return (frame,) if len(frame) >= minimum else None


def assert_no_gaps_or_duplicates(frame: Any) -> None:
    for (protocol, device, sensor), group in frame.groupby(["protocol", "device", "sensor"]):
        seq = group["seq"].astype(int).sort_values()
        assert seq.is_unique, f"duplicates in {protocol}/{device}/{sensor}"
        missing = int(seq.iloc[-1] - seq.iloc[0] + 1 - len(seq))
        assert missing == 0, f"{missing} readings missing in {protocol}/{device}/{sensor}"


# --- on the Ready example fleet, in file order ----------------------------------------------------

JOB_TIMEOUT = 600  # a cold Python + pandas start and the forecast itself, in a pod on a loaded machine


def _created(cluster: devcluster.Cluster, namespace: str) -> datetime:
    stamp = cluster.kubectl_json("get", "sensorfleet", FLEET, "-n", namespace)["metadata"]["creationTimestamp"]
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _run_forecast_job(cluster: devcluster.Cluster, namespace: str, job: str) -> dict[str, Any]:
    """`kubectl create job --from=cronjob/<fleet>-forecast` and wait until it finished; its pods."""
    cluster.kubectl("create", "job", job, "-n", namespace, f"--from=cronjob/{child_meta.forecast_name(FLEET)}")

    def finished() -> dict[str, Any] | None:
        status = cluster.kubectl_json("get", "job", job, "-n", namespace).get("status", {})
        done = [c["type"] for c in status.get("conditions", []) if c["type"] in ("Complete", "Failed") and c["status"] == "True"]
        return {"result": done[0]} if done else None

    try:
        outcome = devcluster.wait_for(finished, timeout=JOB_TIMEOUT, interval=3, what=f"job {job} to finish")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{diagnosis(cluster, namespace)}") from None
    logs = cluster.kubectl("logs", "-n", namespace, f"job/{job}", check=False).stdout
    assert outcome["result"] == "Complete", f"job {job} failed:\n{logs[-3000:]}\n{diagnosis(cluster, namespace)}"
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={job}")["items"]
    assert pods and all(p["spec"]["nodeName"] == devcluster.NODE_NAME for p in pods)
    return {"logs": logs, "pods": pods}


def _last_forecast_of(cluster: devcluster.Cluster, namespace: str, job: str) -> dict[str, Any]:
    def shown() -> dict[str, Any] | None:
        last = cluster.kubectl_json("get", "sensorfleet", FLEET, "-n", namespace).get("status", {}).get("lastForecast", {})
        return last if last.get("job") == job and last.get("reason") else None
    return devcluster.wait_for(shown, timeout=60, interval=2, what=f"status.lastForecast of job {job}")


def test_a_forecast_job_on_the_young_dataset_succeeds_and_says_it_waits_for_data(real: dict[str, Any]) -> None:
    cluster, fleets = real["cluster"], real["fleets"]
    ran = _run_forecast_job(cluster, fleets, "demo-forecast-young")
    assert "waiting for data: have" in ran["logs"], ran["logs"][-2000:]
    last = _last_forecast_of(cluster, fleets, "demo-forecast-young")
    assert last["result"] == "Succeeded" and last["reason"] == "WaitingForData"
    assert last["message"].startswith("waiting for data: have ") and "need 1681" in last["message"]
    assert "time" not in last  # no forecast has been made yet
    body = cluster.kubectl_json("get", "sensorfleet", FLEET, "-n", fleets)
    degraded = next(c for c in body["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "False", degraded


def test_helm_test_passes_against_the_operator_pod(real: dict[str, Any]) -> None:
    cluster = real["cluster"]
    result = cluster.helm("test", real["release"], "--namespace", real["system"], "--logs", "--timeout", "300s", check=False, timeout=360)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Phase:\s+Succeeded", result.stdout) and "operator healthy:" in result.stdout, result.stdout


def test_a_deleted_collector_pod_comes_back_and_nothing_is_lost_or_doubled(real: dict[str, Any]) -> None:
    cluster, fleets = real["cluster"], real["fleets"]
    selector = f"{child_meta.FLEET_LABEL}={FLEET},{child_meta.COMPONENT}=mqtt-collector"
    (old,) = [p for p in cluster.kubectl_json("get", "pods", "-n", fleets, "-l", selector)["items"]
              if not p["metadata"].get("deletionTimestamp")]
    since = _created(cluster, fleets)
    (before,) = _readings(cluster, fleets, minimum=0, since=since)
    cluster.kubectl("delete", "pod", old["metadata"]["name"], "-n", fleets, "--wait=true", timeout=180)

    def replaced() -> dict[str, Any] | None:
        pods = cluster.kubectl_json("get", "pods", "-n", fleets, "-l", selector)["items"]
        fresh = [p for p in pods if p["metadata"]["uid"] != old["metadata"]["uid"] and any(
            c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
        return fresh[0] if fresh else None
    new = devcluster.wait_for(replaced, timeout=READY_TIMEOUT, interval=3, what="a new MQTT collector pod Ready")
    assert new["spec"]["nodeName"] == devcluster.NODE_NAME
    # The new collector catches up on what the broker kept for its session, then goes on.
    mqtt_before = int((before["protocol"] == "mqtt").sum())
    (after,) = devcluster.wait_for(lambda: (lambda r: r if r and int((r[0]["protocol"] == "mqtt").sum()) >= mqtt_before + 2000 else None)(
        _readings(cluster, fleets, minimum=0, since=since)), timeout=300, interval=5, what="MQTT readings after the restart")
    assert_no_gaps_or_duplicates(after)


def test_with_history_on_the_claim_the_forecast_job_reports_and_fills_last_forecast(real: dict[str, Any]) -> None:
    cluster, fleets = real["cluster"], real["fleets"]
    # Two days of history, as the fleet would have collected them before it was created, written
    # onto the claim from inside a pod of the fleet (its image, its user, its mount). At 60 s a
    # reading: another sequence space than the live 1 s readings, which the collectors ignore.
    end = _created(cluster, fleets) - timedelta(seconds=60)
    start = end - timedelta(days=2)
    selector = f"{child_meta.FLEET_LABEL}={FLEET},{child_meta.COMPONENT}=mqtt-collector"
    pod = next(p for p in cluster.kubectl_json("get", "pods", "-n", fleets, "-l", selector)["items"] if not p["metadata"].get("deletionTimestamp"))
    cluster.kubectl("exec", "-n", fleets, pod["metadata"]["name"], "--", "sensorfleet", "generate", pod_builders.FLEET_FILE,
                    "--days", "2", "--start", start.strftime("%Y-%m-%dT%H:%M:%S"), "--interval", "60", "--data", "/data", "--quiet",
                    timeout=300)
    started = time.monotonic()
    ran = _run_forecast_job(cluster, fleets, "demo-forecast-history")
    took = time.monotonic() - started
    reports = _claim_folder(cluster, fleets) / "_reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    html = (reports / "report.html").read_text()
    drawn = re.findall(r'<img src="([^"]+)"', html)
    assert "forecast_vs_actual.png" in drawn and all((reports / name).stat().st_size > 1000 for name in drawn), drawn
    head = metrics["headline"]
    assert head["series"] == (50 + 20 + 20) * 3 and metrics["data"]["steps"] >= 2 * 1440, metrics["data"]
    last = _last_forecast_of(cluster, fleets, "demo-forecast-history")
    assert last["result"] == "Succeeded" and last["reason"] == "Forecast" and last["time"], last
    assert last["headline"].startswith(f"{head['model']} MASE ") and f"{head['series']} series" in last["headline"], last
    print(f"forecast job with 2 days of history: {took:.0f}s")


# --- spec edits and scaling on the running fleet (issue 12) ----------------------------------------

EDIT_TIMEOUT = 600  # every pod of the fleet restarts: a cold Python start each, on a loaded 2-core machine
EDITED_EPOCH = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _patch_and_wait(cluster: devcluster.Cluster, namespace: str, patch: dict[str, Any]) -> datetime:
    """Merge-patch the fleet and wait until it is Ready at the new generation; when it was patched."""
    patched_at = datetime.now(timezone.utc)
    body = json.loads(cluster.kubectl("patch", "sensorfleet", FLEET, "-n", namespace, "--type", "merge",
                                      "-p", json.dumps(patch), "-o", "json").stdout)
    generation = body["metadata"]["generation"]

    def ready() -> bool:
        status = cluster.kubectl_json("get", "sensorfleet", FLEET, "-n", namespace).get("status", {})
        return any(c["type"] == "Ready" and c["status"] == "True" and c.get("observedGeneration") == generation
                   for c in status.get("conditions", []))
    try:
        devcluster.wait_for(ready, timeout=EDIT_TIMEOUT, interval=3, what=f"the fleet Ready at generation {generation}")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{diagnosis(cluster, namespace)}") from None
    return patched_at


def _running_pods(cluster: devcluster.Cluster, namespace: str, component: str) -> list[dict[str, Any]]:
    selector = f"{child_meta.FLEET_LABEL}={FLEET},{child_meta.COMPONENT}={component}"
    return [p for p in cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]


def _collector_counts(cluster: devcluster.Cluster, namespace: str, protocol: str) -> list[dict[str, float]]:
    """Per running collector pod of `protocol`: its readings counters, read from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = []
    for pod in _running_pods(cluster, namespace, f"{protocol}-collector"):
        port = next(p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", []) if p["name"] == "metrics")
        text = cluster.kubectl("exec", "-n", namespace, pod["metadata"]["name"], "--", "python", "-c",
                               f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/metrics').read().decode())").stdout
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("sensorfleet_readings_") and sample.name.endswith("_total"):
                    key = sample.name.removeprefix("sensorfleet_readings_").removesuffix("_total")
                    totals[key] = totals.get(key, 0.0) + sample.value
        counts.append(totals)
    return counts


def assert_collectors_lost_and_doubled_nothing(cluster: devcluster.Cluster, namespace: str, protocols: list[str]) -> None:
    for protocol in protocols:
        counts = _collector_counts(cluster, namespace, protocol)
        assert counts and all(c.get("stored", 0) > 0 for c in counts), (protocol, counts)
        for c in counts:
            # lost_total counts a gap when it is seen; late_total what of it arrived after all
            assert c.get("lost", 0) - c.get("late", 0) == 0 and c.get("duplicate", 0) == 0, (protocol, c)


def _space_rows(frame: Any, protocol: str, epoch: datetime, interval: float) -> Any:
    rows = frame[frame["protocol"] == protocol]
    return rows[SequenceSpace(epoch, interval).holds(rows["ts"], rows["seq"]).to_numpy()]


def _in_space(cluster: devcluster.Cluster, namespace: str, since: datetime, wanted: dict[str, tuple[datetime, float, int, int]]) -> tuple[Any] | None:
    """(frame,) once, for each protocol, every one of its `devices` has `per_series` readings of
    every sensor in the space (epoch, interval)."""
    frame = read_dataset(str(_claim_folder(cluster, namespace)), start=since)
    for protocol, (epoch, interval, devices, per_series) in wanted.items():
        counts = _space_rows(frame, protocol, epoch, interval).groupby(["device", "sensor"]).size()
        if len(counts) < devices * 3 or counts.min() < per_series:
            return None
    return (frame,)


def _wait_in_space(cluster: devcluster.Cluster, namespace: str, since: datetime, wanted: dict[str, tuple[datetime, float, int, int]]) -> Any:
    try:
        (frame,) = devcluster.wait_for(lambda: _in_space(cluster, namespace, since, wanted), timeout=EDIT_TIMEOUT,
                                       interval=5, what=f"readings in the edited sequence spaces {wanted}")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{diagnosis(cluster, namespace)}") from None
    return frame


@pytest.mark.timeout(1200)  # every pod of the fleet restarts
def test_seed_and_epoch_edit_restarts_the_fleet_into_a_new_sequence_space_with_nothing_lost(real: dict[str, Any]) -> None:
    cluster, fleets = real["cluster"], real["fleets"]
    since = _patch_and_wait(cluster, fleets, {"spec": {"seed": 7, "epoch": EDITED_EPOCH.isoformat().replace("+00:00", "Z")}})
    wanted = {p: (EDITED_EPOCH, 1.0, 50 if p == "mqtt" else 20, 20) for p in ("mqtt", "coap", "opcua")}
    frame = _wait_in_space(cluster, fleets, since - timedelta(minutes=5), wanted)
    for protocol in wanted:
        assert_no_gaps_or_duplicates(_space_rows(frame, protocol, EDITED_EPOCH, 1.0))
    assert_collectors_lost_and_doubled_nothing(cluster, fleets, ["mqtt", "coap", "opcua"])


@pytest.mark.timeout(1200)  # every MQTT pod restarts
def test_interval_devices_and_replicas_edit_starts_a_new_sequence_space_without_gap_or_duplicate(real: dict[str, Any]) -> None:
    cluster, fleets = real["cluster"], real["fleets"]
    mqtt = {"devices": 60, "interval": 0.5, "replicas": 2}  # the broker stays: see the note at the end
    since = _patch_and_wait(cluster, fleets, {"spec": {"protocols": {"mqtt": mqtt}}})
    assert len(_running_pods(cluster, fleets, "mqtt-simulator")) == 2
    _wait_in_space(cluster, fleets, since - timedelta(minutes=5), {"mqtt": (EDITED_EPOCH, 0.5, 60, 40)})
    assert_collectors_lost_and_doubled_nothing(cluster, fleets, ["mqtt"])

    frame = _wait_in_space(cluster, fleets, since - timedelta(minutes=5), {"mqtt": (EDITED_EPOCH, 0.5, 60, 200)})
    assert_no_gaps_or_duplicates(_space_rows(frame, "mqtt", EDITED_EPOCH, 0.5))
    assert_collectors_lost_and_doubled_nothing(cluster, fleets, ["mqtt"])
    # Not tested here: collectorReplicas. Changing it restarts the broker (its memory grows with
    # the sessions) and the new broker pod starts with an empty data emptyDir, so every session and
    # what it queued is gone (seen on this node: the collector logs "session present: False").
    # docs/reliability.md lists it as a known defect; the hand-over itself is tested with local
    # processes (tests/spine/test_mqtt_delivery.py).


def test_deleting_the_fleet_removes_its_pods_and_keeps_the_claim(real: dict[str, Any]) -> None:
    cluster, fleets = real["cluster"], real["fleets"]
    folder = _claim_folder(cluster, fleets)
    cluster.kubectl("delete", "sensorfleet", FLEET, "-n", fleets, "--wait=true", timeout=180)

    def pods_gone() -> bool:
        return not cluster.kubectl_json("get", "pods", "-n", fleets, "-l", f"{child_meta.FLEET_LABEL}={FLEET}")["items"]
    devcluster.wait_for(pods_gone, timeout=300, interval=3, what="every pod of the fleet gone")
    claim = cluster.kubectl_json("get", "pvc", child_meta.data_claim_name(FLEET), "-n", fleets)
    assert claim["status"]["phase"] == "Bound" and not claim["metadata"].get("ownerReferences")
    assert claim["metadata"]["labels"][child_meta.CLAIM_RETENTION_LABEL] == "Retain"
    assert len(read_dataset(str(folder))) > 0  # the dataset is still there for a fleet of the same name
