"""The fleet's batch work, as CronJobs: `<fleet>-compact` (compaction of closed hours and
retention, spec.storage) and `<fleet>-forecast` (when forecasting is enabled; with
spec.forecasting.parallelism an Indexed Job of hash shards).
"""

from __future__ import annotations

from typing import Any

from sensorfleet.operator.child_meta import (
    HASH_ANNOTATION,
    BuildOptions,
    Owner,
    compaction_name,
    forecast_name,
    labels,
    object_metadata,
    spec_hash,
    spec_sections,
)
from sensorfleet.operator.pod_builders import ENV_NIXTLA_API_KEY, FLEET_FILE, app_container, app_pod_spec, secret_env, storage_env
from sensorfleet.operator.storage_builders import claim_user_labels, data_location, reports_location, uses_claim
from sensorfleet.spec import SensorFleet


def compaction_args(fleet: SensorFleet) -> list[str]:
    args = ["compact", "--data", data_location(fleet)]
    if fleet.spec.storage.retention_days:
        args += ["--retention-days", str(fleet.spec.storage.retention_days)]
    return args


def build_compaction_cronjob(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    """One job per fleet, not a thread in every collector: a single writer of compaction per
    dataset needs no coordination between collector replicas, the collectors' memory and CPU
    stay with intake, and a killed job is simply the next run's recovery (compaction.py)."""
    with_data = uses_claim(fleet)
    container = app_container("compact", compaction_args(fleet), "forecast", options, storage_env(fleet), [], fleet, with_data=with_data)
    for probe in ("readinessProbe", "livenessProbe"):
        container.pop(probe, None)
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    pod_spec = app_pod_spec(fleet, container, with_data=with_data)
    pod_spec["restartPolicy"] = "Never"
    lbls = labels(fleet.name, "compaction", options)
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": object_metadata(compaction_name(fleet.name), owner, lbls),
        "spec": {
            "schedule": " ".join(fleet.spec.storage.compaction_schedule.split()),
            "concurrencyPolicy": "Forbid",  # one compaction of a dataset at a time
            "startingDeadlineSeconds": 600,
            "successfulJobsHistoryLimit": 1,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": lbls},
                "spec": {
                    "backoffLimit": 2,
                    "activeDeadlineSeconds": 3000,
                    "ttlSecondsAfterFinished": 86400,
                    "template": {
                        "metadata": {"labels": {**lbls, **claim_user_labels(fleet)},
                                     "annotations": {HASH_ANNOTATION: spec_hash(spec_sections(fleet, "storage"))}},
                        "spec": pod_spec,
                    },
                },
            },
        },
    }


# Where the forecast container writes its outcome (Kubernetes' default terminationMessagePath):
# the operator reads it from the finished pod into status.lastForecast.
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
ENV_JOB_INDEX = "JOB_COMPLETION_INDEX"  # set in every pod of an Indexed Job by the Job controller
ENV_JOB_NAME = "JOB_NAME"


def forecast_args(fleet: SensorFleet) -> list[str]:
    # A young fleet's dataset (empty, or shorter than horizon + CV + a daily season) is waiting for
    # data, not a failed job; a series that started later than the others is left out of one run
    # rather than failing it (docs/forecasting.md, "A young dataset").
    args = ["forecast", "--data", data_location(fleet), "--out", reports_location(fleet), "--fleet", FLEET_FILE,
            "--wait-for-data", "--drop-short", "--termination-message", TERMINATION_MESSAGE_PATH]
    shards = fleet.spec.forecasting.parallelism
    if shards > 1:
        # Each pod of the Indexed Job forecasts its hash shard; the kubelet expands $(VAR) from the
        # container's env (JOB_COMPLETION_INDEX is set by the Job controller, JOB_NAME below).
        args += ["--shard", f"$({ENV_JOB_INDEX})/{shards}", "--merge-when-done", "--run-id", f"$({ENV_JOB_NAME})"]
    return args


def forecast_job_spec(fleet: SensorFleet, template: dict[str, Any]) -> dict[str, Any]:
    """The spec of the forecast CronJob's Job: one pod, or with `spec.forecasting.parallelism` N
    an Indexed Job of N pods (completions = parallelism = N), one hash shard each; the pod that
    finds every shard of its Job complete merges them (docs/forecasting.md, "Sharded runs")."""
    shards = fleet.spec.forecasting.parallelism
    spec: dict[str, Any] = {"backoffLimit": 1, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 86400, "template": template}
    if shards > 1:
        spec.update({"completionMode": "Indexed", "completions": shards, "parallelism": shards,
                     "backoffLimit": shards})  # about one retry per shard
    return spec


def build_forecast_cronjob(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    with_data = uses_claim(fleet)
    # A batch job is gone before Prometheus could scrape it: it pushes its figures instead.
    push = fleet.spec.monitoring.pushgateway_url
    env = [{"name": "SENSORFLEET_PUSHGATEWAY_URL", "value": push}] if push else []
    if fleet.spec.forecasting.api_key:
        env.append(secret_env(ENV_NIXTLA_API_KEY, fleet.spec.forecasting.api_key))
    env += storage_env(fleet)
    if fleet.spec.forecasting.parallelism > 1:
        # The run id the shards of one Job share: the Job's name (the label every Job pod carries).
        env.append({"name": ENV_JOB_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}})
    container = app_container("forecast", forecast_args(fleet), "forecast", options, env, [], fleet, with_data=with_data)
    for probe in ("readinessProbe", "livenessProbe"):
        container.pop(probe, None)  # a batch job serves no metrics port
    container["terminationMessagePath"] = TERMINATION_MESSAGE_PATH
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    pod_spec = app_pod_spec(fleet, container, with_data=with_data)
    pod_spec["restartPolicy"] = "Never"
    lbls = labels(fleet.name, "forecast", options)
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": object_metadata(forecast_name(fleet.name), owner, lbls),
        "spec": {
            "schedule": " ".join(fleet.spec.forecasting.schedule.split()),
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 300,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": lbls},
                "spec": forecast_job_spec(fleet, {
                    "metadata": {"labels": {**lbls, **claim_user_labels(fleet)},
                                 "annotations": {HASH_ANNOTATION: spec_hash(spec_sections(fleet, "forecasting", "storage", "monitoring"))}},
                    "spec": pod_spec,
                }),
            },
        },
    }
