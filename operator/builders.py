"""Pure builders: one SensorFleet in, the manifests of all its children out.

No I/O, no kopf, no clock: the same fleet, owner and credentials give the same manifests, so the
handlers can server-side apply them on every reconcile without changing anything that did not
change. Each child carries the recommended `app.kubernetes.io/*` labels, `sensorfleet.io/fleet`,
and a controller ownerReference to the fleet (Kubernetes garbage-collects it with its owner).

Per fleet, and the module that builds it:
    <fleet>-fleet                      ConfigMap   the manifest, mounted at /etc/sensorfleet/fleet.yaml
                                                   (here)
    <fleet>-broker-config / -broker-credentials / -broker (Deployment + Service)   Mosquitto, when MQTT
                                       is enabled and the broker is not external (broker_builders)
    <fleet>-<proto>-simulator-<i>      Deployment (1 pod: its replica index picks its device shard)
                                       + Service for CoAP / OPC UA (they are servers) (workload_builders)
    <fleet>-<proto>-collector-<i>      Deployment (1 pod: a stable MQTT client id / its own targets)
                                       (workload_builders)
    <fleet>-src-<name>                 Deployment per third-party source (spec.sources; source_builders)
    <fleet>-data                       PersistentVolumeClaim, unless spec.storage.url is set; kept when
                                       the fleet is deleted unless storage.claimRetention.whenDeleted:
                                       Delete (storage_builders)
    <fleet>-forecast                   CronJob, when forecasting is enabled (job_builders)
    <fleet>-compact                    CronJob: compaction of closed hours, retention (spec.storage)
                                       (job_builders)
    <fleet>-metrics                    headless Service over all metrics ports; PodMonitor on request
                                       (network_builders)
    <fleet>-network                    NetworkPolicy: the fleet's pods take traffic only from each
                                       other (metrics from the configured namespace) (network_builders)

Shared pieces: child_meta (names, labels, ownerReference, spec hash, Owner, BuildOptions),
pod_builders (hardened pods, the app container, the one-pod Deployment), sizing (pod counts and
requests/limits).

Pod templates carry a hash of the part of the spec that the process reads, so an edit rolls only
the pods it concerns (more MQTT devices restart MQTT simulators, not the CoAP collector).
"""

from __future__ import annotations

from typing import Any

from sensorfleet.operator.broker_builders import (
    BrokerCredentials,
    build_broker_config,
    build_broker_deployment,
    build_broker_secret,
    build_broker_service,
    uses_broker,
)
from sensorfleet.operator.child_meta import BuildOptions, Owner, fleet_configmap_name, labels, object_metadata
from sensorfleet.operator.job_builders import build_compaction_cronjob, build_forecast_cronjob
from sensorfleet.operator.network_builders import build_metrics_service, build_network_policy, build_pod_monitor
from sensorfleet.operator.sizing import collector_count
from sensorfleet.operator.source_builders import build_source_collectors
from sensorfleet.operator.storage_builders import build_data_claim, uses_claim
from sensorfleet.operator.workload_builders import build_collector_deployment, build_simulator_deployment, build_simulator_service
from sensorfleet.spec import API_GROUP, API_VERSION, KIND, PROTOCOLS, SensorFleet, dump_fleet


def fleet_manifest_for_pods(fleet: SensorFleet) -> str:
    """The manifest the pods read: name and namespace only from metadata, spec with defaults filled."""
    clean = SensorFleet.model_validate(
        {"metadata": {"name": fleet.metadata.name, "namespace": fleet.metadata.namespace},
         "spec": fleet.spec.model_dump(mode="json", by_alias=True)}
    )
    return dump_fleet(clean)


def build_fleet_configmap(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(fleet_configmap_name(fleet.name), owner, labels(fleet.name, "config", options)),
        "data": {"fleet.yaml": fleet_manifest_for_pods(fleet)},
    }


def build_children(fleet: SensorFleet, owner: Owner, options: BuildOptions,
                   credentials: BrokerCredentials | None) -> list[dict[str, Any]]:
    """Every child of the fleet, in apply order (config before the pods that mount it).

    `credentials` are the broker's (existing ones are passed back in so they never change);
    required when `uses_broker(fleet)`.
    """
    children = [build_fleet_configmap(fleet, owner, options)]
    if uses_broker(fleet):
        if credentials is None:
            raise ValueError("the fleet runs a broker: pass its credentials")
        children += [
            build_broker_secret(fleet, owner, options, credentials),
            build_broker_config(fleet, owner, options),
            build_broker_service(fleet, owner, options),
            build_broker_deployment(fleet, owner, options, credentials),
        ]
    if uses_claim(fleet):
        children.append(build_data_claim(fleet, owner, options))
    for protocol in PROTOCOLS:
        spec = fleet.spec.protocol(protocol)
        if not spec.enabled:
            continue
        for replica in range(spec.replicas):
            if protocol != "mqtt":
                children.append(build_simulator_service(fleet, owner, options, protocol, replica))
            children.append(build_simulator_deployment(fleet, owner, options, protocol, replica))
        for replica in range(collector_count(fleet, protocol)):
            children.append(build_collector_deployment(fleet, owner, options, protocol, replica))
    children += build_source_collectors(fleet, owner, options)
    if fleet.spec.forecasting.enabled:
        children.append(build_forecast_cronjob(fleet, owner, options))
    children.append(build_compaction_cronjob(fleet, owner, options))
    if fleet.spec.monitoring.enabled:
        children.append(build_metrics_service(fleet, owner, options))
        if fleet.spec.monitoring.pod_monitor:
            children.append(build_pod_monitor(fleet, owner, options))
    if options.network_policy:
        children.append(build_network_policy(fleet, owner, options))
    return children


def fleet_from_body(body: dict[str, Any]) -> SensorFleet:
    """The SensorFleet model of a custom object as the API server returns it."""
    meta = body.get("metadata", {})
    return SensorFleet.model_validate({
        "apiVersion": body.get("apiVersion", f"{API_GROUP}/{API_VERSION}"),
        "kind": KIND,
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": body.get("spec") or {},
    })


def owner_from_body(body: dict[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
