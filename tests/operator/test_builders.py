"""Pure builders and status: fleet in, manifests out; no API server."""

from __future__ import annotations

import copy

import pytest

from sensorfleet.operator import builders, child_meta, status
from sensorfleet.operator.broker_builders import BrokerCredentials
from sensorfleet.operator.child_meta import BuildOptions, Owner
from sensorfleet.spec import SensorFleet

OWNER = Owner("plant", "factory", "0000-uid")
CREDS = BrokerCredentials("sensorfleet", "s3cret")


def fleet(**spec: object) -> SensorFleet:
    base: dict = {"protocols": {"mqtt": {"replicas": 2, "collectorReplicas": 2},
                                "coap": {"enabled": True, "replicas": 3, "collectorReplicas": 2},
                                "opcua": {"enabled": True}}}
    base.update(spec)
    return SensorFleet.model_validate({"metadata": {"name": "plant", "namespace": "factory"}, "spec": base})


def children(f: SensorFleet) -> dict[tuple[str, str], dict]:
    return {(c["kind"], c["metadata"]["name"]): c for c in builders.build_children(f, OWNER, BuildOptions(), CREDS)}


def containers(manifest: dict) -> list[dict]:
    spec = manifest["spec"]
    pod = spec["jobTemplate"]["spec"]["template"]["spec"] if manifest["kind"] == "CronJob" else spec["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


def test_every_child_is_labelled_owned_and_namespaced() -> None:
    for (kind, name), child in children(fleet()).items():
        meta = child["metadata"]
        assert meta["namespace"] == "factory", name
        if kind == "PersistentVolumeClaim":  # kept when the fleet is deleted: no owner (test_claims.py)
            assert "ownerReferences" not in meta and meta["labels"][child_meta.CLAIM_RETENTION_LABEL] == "Retain"
            continue
        assert meta["ownerReferences"] == [child_meta.owner_reference(OWNER)], name
        assert meta["ownerReferences"][0]["controller"] is True
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                    "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by"):
            assert meta["labels"][key], (name, key)
        assert name.startswith("plant-") or name == "plant"


def test_every_pod_is_non_root_read_only_without_capabilities_and_bounded() -> None:
    workloads = [c for c in children(fleet()).values() if c["kind"] in ("Deployment", "CronJob")]
    assert len(workloads) == 1 + 2 + 2 + 3 + 2 + 1 + 1 + 1 + 1  # broker, mqtt, coap, opcua, forecast, compaction
    for workload in workloads:
        spec = workload["spec"]
        pod = spec["jobTemplate"]["spec"]["template"]["spec"] if workload["kind"] == "CronJob" else spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["automountServiceAccountToken"] is False
        for container in containers(workload):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, workload["metadata"]["name"]


def test_one_deployment_per_simulator_and_collector_replica_with_stable_identity() -> None:
    c = children(fleet())
    sims = [c[("Deployment", f"plant-mqtt-simulator-{i}")] for i in range(2)]
    assert [s["spec"]["replicas"] for s in sims] == [1, 1]
    args = [s["spec"]["template"]["spec"]["containers"][0]["args"] for s in sims]
    assert args[0] == ["simulate", "mqtt", "--fleet", "/etc/sensorfleet/fleet.yaml", "--broker", "mqtt://plant-broker:1883",
                       "--replica", "0", "--metrics-port", "9100"]
    assert args[1][args[1].index("--replica") + 1] == "1"
    ids = [c[("Deployment", f"plant-mqtt-collector-{i}")]["spec"]["template"]["spec"]["containers"][0]["args"] for i in range(2)]
    assert [a[a.index("--client-id") + 1] for a in ids] == ["plant-mqtt-collector-0", "plant-mqtt-collector-1"]
    env = {e["name"]: e for e in sims[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SENSORFLEET_MQTT_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "plant-broker-credentials", "key": "password"}
    # selectors of two replicas never overlap
    assert sims[0]["spec"]["selector"] != sims[1]["spec"]["selector"]


def test_coap_and_opcua_servers_get_services_and_collectors_split_them() -> None:
    c = children(fleet())
    for i in range(3):
        service = c[("Service", f"plant-coap-simulator-{i}")]
        assert service["spec"]["ports"][0]["protocol"] == "UDP" and service["spec"]["ports"][0]["port"] == 5683
        assert service["spec"]["selector"][child_meta.REPLICA_LABEL] == str(i)
    targets = []
    for j in range(2):
        args = c[("Deployment", f"plant-coap-collector-{j}")]["spec"]["template"]["spec"]["containers"][0]["args"]
        targets += [args[k + 1] for k, a in enumerate(args) if a == "--target"]
    assert sorted(targets) == [f"coap://plant-coap-simulator-{i}:5683" for i in range(3)]
    opc = c[("Deployment", "plant-opcua-collector-0")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "opc.tcp://plant-opcua-simulator-0:4840" in opc
    assert ("Deployment", "plant-opcua-collector-1") not in c  # never more collectors than servers


def test_broker_config_secret_and_init_container() -> None:
    c = children(fleet())
    conf = c[("ConfigMap", "plant-broker-config")]["data"]["mosquitto.conf"]
    for line in ("listener 1883", "allow_anonymous false", "password_file /mosquitto/auth/passwd",
                 "max_inflight_messages 60000", "max_queued_messages 0", "persistence true"):
        assert line in conf.splitlines()
    deployment = c[("Deployment", "plant-broker")]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["command"][:4] == ["mosquitto_passwd", "-b", "-c", "/mosquitto/auth/passwd"]
    assert pod["containers"][0]["image"] == "eclipse-mosquitto:2.0.20"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    secret = c[("Secret", "plant-broker-credentials")]
    import base64
    assert base64.b64decode(secret["data"]["password"]).decode() == "s3cret"


def test_external_broker_and_storage_url() -> None:
    c = children(fleet(broker={"mode": "external", "url": "mqtt://broker.example:1883"}, storage={"url": "s3://bucket/plant"}))
    assert not [k for k in c if "broker" in k[1]]
    assert ("PersistentVolumeClaim", "plant-data") not in c
    args = c[("Deployment", "plant-mqtt-collector-0")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--data") + 1] == "s3://bucket/plant"
    assert args[args.index("--broker") + 1] == "mqtt://broker.example:1883"
    cron = c[("CronJob", "plant-forecast")]
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "forecast", "--data", "s3://bucket/plant", "--out", "s3://bucket/plant/_reports", "--fleet", "/etc/sensorfleet/fleet.yaml",
        "--wait-for-data", "--drop-short", "--termination-message", "/dev/termination-log"]


def test_claim_mounted_at_data_and_forecast_on_schedule() -> None:
    c = children(fleet(storage={"size": "2Gi"}, forecasting={"schedule": "*/15 * * * *"}))
    assert c[("PersistentVolumeClaim", "plant-data")]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    collector = c[("Deployment", "plant-mqtt-collector-0")]["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "plant-data"}} in collector["volumes"]
    cron = c[("CronJob", "plant-forecast")]
    assert cron["spec"]["schedule"] == "*/15 * * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_fleet_configmap_is_a_valid_manifest_with_defaults() -> None:
    f = fleet()
    text = children(f)[("ConfigMap", "plant-fleet")]["data"]["fleet.yaml"]
    import yaml
    reparsed = SensorFleet.model_validate(yaml.safe_load(text))
    assert reparsed.spec == f.spec and reparsed.metadata.name == "plant"


def test_a_spec_edit_changes_only_the_pod_templates_it_concerns() -> None:
    before = children(fleet())
    edited = fleet(protocols={"mqtt": {"replicas": 2, "collectorReplicas": 2, "devices": 99},
                              "coap": {"enabled": True, "replicas": 3, "collectorReplicas": 2}, "opcua": {"enabled": True}})
    after = children(edited)
    changed = sorted(k[1] for k in before if k in after and before[k] != after[k])
    assert changed == ["plant-fleet", "plant-mqtt-collector-0", "plant-mqtt-collector-1",
                       "plant-mqtt-simulator-0", "plant-mqtt-simulator-1"]


def test_builders_are_deterministic_and_do_not_mutate() -> None:
    f = fleet()
    snapshot = copy.deepcopy(f.model_dump())
    assert builders.build_children(f, OWNER, BuildOptions(), CREDS) == builders.build_children(f, OWNER, BuildOptions(), CREDS)
    assert f.model_dump() == snapshot


def test_broker_needs_credentials() -> None:
    with pytest.raises(ValueError, match="credentials"):
        builders.build_children(fleet(), OWNER, BuildOptions(), None)


def _deployment(name: str, ready: bool, generation: int = 1) -> dict:
    return {"metadata": {"name": name, "generation": generation}, "spec": {"replicas": 1},
            "status": {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1,
                       "readyReplicas": 1 if ready else 0, "availableReplicas": 1 if ready else 0}}


def test_status_ready_progressing_degraded() -> None:
    f = fleet(protocols={"mqtt": {}})
    names = ["plant-broker", "plant-mqtt-simulator-0", "plant-mqtt-collector-0"]
    waiting = status.compute_status(f, 3, [_deployment(n, n != "plant-broker") for n in names], [], [], None, "T1")
    cond = {c["type"]: c for c in waiting["conditions"]}
    assert cond["Ready"]["status"] == "False" and "plant-broker" in cond["Ready"]["message"]
    assert cond["Progressing"]["status"] == "True"
    assert all(c["observedGeneration"] == 3 for c in cond.values())
    assert waiting["protocols"]["mqtt"] == {"devices": 10, "simulators": 1, "simulatorsReady": 1, "collectors": 1, "collectorsReady": 1}
    ready = status.compute_status(f, 3, [_deployment(n, True) for n in names], [], [], waiting, "T2")
    cond2 = {c["type"]: c for c in ready["conditions"]}
    assert cond2["Ready"]["status"] == "True" and cond2["Ready"]["lastTransitionTime"] == "T2"
    assert cond2["Degraded"]["lastTransitionTime"] == "T1"  # unchanged status keeps its time
    again = status.compute_status(f, 3, [_deployment(n, True) for n in names], [], [], ready, "T3")
    assert again == ready  # nothing changed: nothing to write
    failed = status.compute_status(f, 3, [], [], [status.Failure("ApplyFailed", "PodMonitor plant: NotFound")], ready, "T4")
    cond3 = {c["type"]: c for c in failed["conditions"]}
    assert cond3["Degraded"]["status"] == "True" and cond3["Degraded"]["reason"] == "ApplyFailed"
    assert "PodMonitor" in cond3["Degraded"]["message"]


def test_last_forecast_from_jobs() -> None:
    f = fleet()
    jobs = [
        {"metadata": {"name": "plant-forecast-1"}, "status": {"succeeded": 1, "completionTime": "2026-01-01T01:00:00Z"}},
        {"metadata": {"name": "plant-forecast-2"}, "status": {"succeeded": 1, "completionTime": "2026-01-01T02:00:00Z"}},
    ]
    pods = {"plant-forecast-2": [{"status": {"containerStatuses": [{"state": {"terminated": {"message": "MASE 0.81\n"}}}]}}]}
    st = status.compute_status(f, 1, [], jobs, [], None, "T", pods_by_job=pods)
    assert st["lastForecast"] == {"job": "plant-forecast-2", "result": "Succeeded", "time": "2026-01-01T02:00:00Z", "headline": "MASE 0.81"}


def test_forecast_job_pushes_to_the_configured_pushgateway() -> None:
    def forecast_env(f: SensorFleet) -> list[dict]:
        return children(f)[("CronJob", "plant-forecast")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]

    assert not [e for e in forecast_env(fleet()) if e["name"] == "SENSORFLEET_PUSHGATEWAY_URL"]
    pushed = forecast_env(fleet(monitoring={"pushgatewayUrl": "http://pushgateway.monitoring:9091"}))
    assert {"name": "SENSORFLEET_PUSHGATEWAY_URL", "value": "http://pushgateway.monitoring:9091"} in pushed


def test_a_forecast_that_waited_for_data_keeps_the_last_forecast_time_and_is_no_problem() -> None:
    f = fleet()
    waited = '{"reason": "WaitingForData", "message": "waiting for data: have 3 steps of 1min, need 1681 (...)", "haveSteps": 3, "needSteps": 1681}'
    jobs = [{"metadata": {"name": "plant-forecast-3"}, "status": {"succeeded": 1, "completionTime": "2026-01-01T03:00:00Z"}}]
    pods = {"plant-forecast-3": [{"status": {"containerStatuses": [{"state": {"terminated": {"message": waited}}}]}}]}
    previous = {"lastForecast": {"job": "plant-forecast-2", "result": "Succeeded", "time": "2026-01-01T02:00:00Z", "reason": "Forecast"}}
    st = status.compute_status(f, 1, [], jobs, [], previous, "T", pods_by_job=pods)
    assert st["lastForecast"] == {"job": "plant-forecast-3", "result": "Succeeded", "reason": "WaitingForData",
                                  "message": "waiting for data: have 3 steps of 1min, need 1681 (...)", "time": "2026-01-01T02:00:00Z"}
    assert "lastForecast" in status.compute_status(f, 1, [], jobs, [], None, "T", pods_by_job=pods)
    assert "time" not in status.compute_status(f, 1, [], jobs, [], None, "T", pods_by_job=pods)["lastForecast"]
    degraded = {c["type"]: c for c in st["conditions"]}["Degraded"]
    assert degraded["status"] == "False"


def test_a_failed_forecast_says_why_in_degraded() -> None:
    f = fleet()
    jobs = [{"metadata": {"name": "plant-forecast-4"}, "status": {"failed": 2, "conditions": [
        {"type": "Failed", "status": "True", "lastTransitionTime": "2026-01-01T04:00:00Z"}]}}]
    log_tail = "reading dataset\nerror --model: unknown model 'prophet'\n"  # FallbackToLogsOnError: the log's tail
    pods = {"plant-forecast-4": [{"status": {"containerStatuses": [{"state": {"terminated": {"message": log_tail}}}]}}]}
    st = status.compute_status(f, 1, [], jobs, [], None, "T", pods_by_job=pods)
    assert st["lastForecast"] == {"job": "plant-forecast-4", "result": "Failed", "message": "error --model: unknown model 'prophet'"}
    degraded = {c["type"]: c for c in st["conditions"]}["Degraded"]
    assert degraded["reason"] == "ForecastFailed" and "unknown model 'prophet'" in degraded["message"]


def test_the_forecast_cronjob_waits_for_data_and_reports_through_its_termination_message() -> None:
    cron = children(fleet())[("CronJob", "plant-forecast")]
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--wait-for-data" in args and "--drop-short" in args
    assert args[args.index("--termination-message") + 1] == container["terminationMessagePath"] == "/dev/termination-log"


def test_forecast_parallelism_makes_an_indexed_job_of_shards() -> None:
    single = children(fleet())[("CronJob", "plant-forecast")]["spec"]["jobTemplate"]["spec"]
    assert "completionMode" not in single and "completions" not in single and "--shard" not in single["template"]["spec"]["containers"][0]["args"]
    job = children(fleet(forecasting={"parallelism": 4}))[("CronJob", "plant-forecast")]["spec"]["jobTemplate"]["spec"]
    assert (job["completionMode"], job["completions"], job["parallelism"], job["backoffLimit"]) == ("Indexed", 4, 4, 4)
    container = job["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--shard") + 1] == "$(JOB_COMPLETION_INDEX)/4" and "--merge-when-done" in args
    assert args[args.index("--run-id") + 1] == "$(JOB_NAME)"
    # $(JOB_NAME) expands only from the container's own env: the Job's name, from the pod's label.
    assert {"name": "JOB_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}} in container["env"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"


def test_parallelism_is_validated_with_its_field_named() -> None:
    with pytest.raises(ValueError, match="parallelism"):
        fleet(forecasting={"parallelism": 0})


def test_an_indexed_forecast_job_succeeds_when_every_index_has() -> None:
    running = {"metadata": {"name": "plant-forecast-3"}, "spec": {"completions": 4}, "status": {"succeeded": 3}}
    assert status.last_forecast([running]) is None
    done = {"metadata": {"name": "plant-forecast-3"}, "spec": {"completions": 4},
            "status": {"succeeded": 4, "completionTime": "2026-01-01T03:00:00Z", "conditions": [{"type": "Complete", "status": "True"}]}}
    assert status.last_forecast([done])["result"] == "Succeeded"


def test_storage_degraded_follows_the_collectors_readiness() -> None:
    """A collector's readiness is its /readyz (the store is writable): a rolled-out collector that
    lost its ready pod makes StorageDegraded True (and Degraded); one still starting says nothing yet."""
    f = fleet(protocols={"mqtt": {}})
    names = ["plant-broker", "plant-mqtt-simulator-0", "plant-mqtt-collector-0"]
    rolled_out = {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}

    def deployments(collector_ready: bool, collector_rolled_out: bool) -> list[dict]:
        out = [_deployment(n, n != "plant-mqtt-collector-0" or collector_ready) for n in names]
        if collector_rolled_out:
            out[2]["status"]["conditions"] = [rolled_out]
        return out

    def conditions(st: dict) -> dict:
        return {c["type"]: c for c in st["conditions"]}

    fine = conditions(status.compute_status(f, 2, deployments(True, True), [], [], None, "T1"))
    assert (fine["StorageDegraded"]["status"], fine["StorageDegraded"]["reason"]) == ("False", "StoreWritable")
    starting = conditions(status.compute_status(f, 2, deployments(False, False), [], [], None, "T1"))
    assert (starting["StorageDegraded"]["status"], starting["StorageDegraded"]["reason"]) == ("Unknown", "CollectorsStarting")
    assert starting["Degraded"]["status"] == "False"
    failing = status.compute_status(f, 2, deployments(False, True), [], [], status.compute_status(f, 2, deployments(True, True), [], [], None, "T1"), "T2")
    cond = conditions(failing)
    assert (cond["StorageDegraded"]["status"], cond["StorageDegraded"]["reason"]) == ("True", "StoreUnwritable")
    assert "plant-mqtt-collector-0 (0/1 ready)" in cond["StorageDegraded"]["message"] and cond["StorageDegraded"]["lastTransitionTime"] == "T2"
    assert cond["Degraded"]["status"] == "True" and cond["Degraded"]["reason"] == "StoreUnwritable"
    unprobed = fleet(protocols={"mqtt": {}}, monitoring={"enabled": False})
    cond = conditions(status.compute_status(unprobed, 1, deployments(True, True), [], [], None, "T1"))
    assert (cond["StorageDegraded"]["status"], cond["StorageDegraded"]["reason"]) == ("Unknown", "NoReadinessProbe")


def test_collectors_are_ready_while_they_can_store_and_their_metrics_stay_scraped() -> None:
    kids = children(fleet(protocols={"mqtt": {}}))
    collector = next(c for c in containers(kids[("Deployment", "plant-mqtt-collector-0")]) if c["name"] == "collector")
    simulator = next(c for c in containers(kids[("Deployment", "plant-mqtt-simulator-0")]) if c["name"] == "simulator")
    assert collector["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert simulator["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert kids[("Service", "plant-metrics")]["spec"]["publishNotReadyAddresses"] is True
