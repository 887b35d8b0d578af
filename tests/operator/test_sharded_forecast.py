"""`spec.forecasting.parallelism` on a real control plane: the forecast CronJob's Job is an
Indexed Job whose pods (kwok plays their kubelet) each get their completion index, run their
shard `$(JOB_COMPLETION_INDEX)/N` with the Job's name as run id, and the Job completes only when
every index has."""

from __future__ import annotations

import json
from typing import Any

import pytest

import devcluster
from sensorfleet.operator import child_meta
from tests.operator.conftest import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NS = "sf-shards"
FLEET = "sharded"
SHARDS = 3


def kjson(cluster: devcluster.Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def test_parallelism_makes_the_forecast_an_indexed_job_of_shards(deployed: dict[str, Any]) -> None:
    cluster: devcluster.Cluster = deployed["cluster"]
    cluster.kubectl("create", "namespace", NS, check=False)
    # The shard pods merge in the claim's folder (object storage is refused with parallelism > 1):
    # a static volume bound to the fleet's claim, as kwok's nodes have no provisioner.
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "sf-shards-claim"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/tmp/sf-shards-claim"},
                 "persistentVolumeReclaimPolicy": "Retain", "claimRef": {"namespace": NS, "name": child_meta.data_claim_name(FLEET)}}}))
    fleet = {"apiVersion": "sensorfleet.io/v1alpha1", "kind": "SensorFleet", "metadata": {"name": FLEET, "namespace": NS},
             "spec": {"storage": {"size": "1Gi", "claimRetention": {"whenDeleted": "Delete"}}, "protocols": {"coap": {"enabled": False}, "opcua": {"enabled": False}},
                      "forecasting": {"parallelism": SHARDS}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(fleet))
    name = child_meta.forecast_name(FLEET)
    try:
        cron = wait_for("the forecast CronJob", lambda: next((c for c in kjson(cluster, "get", "cronjobs", "-n", NS)["items"] if c["metadata"]["name"] == name), None), 90)
        template = cron["spec"]["jobTemplate"]["spec"]
        assert (template["completionMode"], template["completions"], template["parallelism"]) == ("Indexed", SHARDS, SHARDS)
        cluster.kubectl("create", "job", "forecast-sharded", "-n", NS, f"--from=cronjob/{name}")
        pods = wait_for(f"{SHARDS} shard pods", lambda: (items := kjson(cluster, "get", "pods", "-n", NS, "-l", "batch.kubernetes.io/job-name=forecast-sharded")["items"])
                        and len(items) == SHARDS and items, 60)
        indexes = sorted(int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]) for p in pods)
        assert indexes == list(range(SHARDS))
        for pod in pods:
            container = pod["spec"]["containers"][0]
            args, env = container["args"], {e["name"]: e for e in container["env"]}
            assert args[args.index("--shard") + 1] == f"$(JOB_COMPLETION_INDEX)/{SHARDS}" and "--merge-when-done" in args
            # The Job controller sets the index in the pod's env; the run id comes from the Job's label.
            assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/job-completion-index']")
            assert pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "forecast-sharded"
        job = wait_for("the Indexed Job to complete", lambda: (j := kjson(cluster, "get", "job", "forecast-sharded", "-n", NS))["status"].get("succeeded") == SHARDS and j, 90)
        assert job["status"]["completedIndexes"] == f"0-{SHARDS - 1}"
        last = wait_for("lastForecast of the Indexed Job", lambda: kjson(cluster, "get", "sensorfleet", FLEET, "-n", NS).get("status", {}).get("lastForecast"), 60)
        assert last["job"] == "forecast-sharded" and last["result"] == "Succeeded"
    finally:
        cluster.kubectl("delete", "sensorfleet", FLEET, "-n", NS, "--wait=false", check=False)
        cluster.kubectl("delete", "job", "forecast-sharded", "-n", NS, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", "sf-shards-claim", "--wait=false", check=False)
