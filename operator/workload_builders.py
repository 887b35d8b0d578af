"""The simulated fleet's workloads, per enabled protocol: `<fleet>-<proto>-simulator-<i>`
Deployments (a replica index picks its device shard; CoAP and OPC UA ones also get a Service, as
they are servers) and `<fleet>-<proto>-collector-<i>` Deployments (a stable MQTT client id, or
their share of the simulator servers).
"""

from __future__ import annotations

from typing import Any

from sensorfleet.operator.broker_builders import broker_url, uses_broker
from sensorfleet.operator.child_meta import (
    PROTOCOL_LABEL,
    REPLICA_LABEL,
    BuildOptions,
    Owner,
    broker_secret_name,
    collector_name,
    labels,
    object_metadata,
    selector_labels,
    simulator_name,
    spec_hash,
    spec_sections,
)
from sensorfleet.operator.pod_builders import (
    ENV_MQTT_PASSWORD,
    ENV_MQTT_USERNAME,
    ENV_OPCUA_PASSWORD,
    ENV_OPCUA_USERNAME,
    FLEET_FILE,
    app_container,
    app_pod_spec,
    metrics_args,
    metrics_ports,
    secret_env,
    single_pod_deployment,
    storage_env,
)
from sensorfleet.operator.sizing import collector_count
from sensorfleet.operator.storage_builders import claim_user_labels, data_location, uses_claim
from sensorfleet.spec import SecretKeyRef, SensorFleet


def _mqtt_env(fleet: SensorFleet) -> list[dict[str, Any]]:
    broker = fleet.spec.broker
    if broker.mode == "external" and broker.credentials:
        return [secret_env(ENV_MQTT_USERNAME, broker.credentials.username),
                secret_env(ENV_MQTT_PASSWORD, broker.credentials.password)]
    if not uses_broker(fleet) or not broker.authentication:
        return []
    secret = broker_secret_name(fleet.name)
    return [secret_env(ENV_MQTT_USERNAME, SecretKeyRef(name=secret, key="username")),
            secret_env(ENV_MQTT_PASSWORD, SecretKeyRef(name=secret, key="password"))]


def _opcua_env(fleet: SensorFleet) -> list[dict[str, Any]]:
    opcua = fleet.spec.protocols.opcua
    if opcua.authentication != "username" or not opcua.credentials:
        return []
    return [secret_env(ENV_OPCUA_USERNAME, opcua.credentials.username),
            secret_env(ENV_OPCUA_PASSWORD, opcua.credentials.password)]


def _protocol_env(fleet: SensorFleet, protocol: str) -> list[dict[str, Any]]:
    return _mqtt_env(fleet) if protocol == "mqtt" else _opcua_env(fleet) if protocol == "opcua" else []


def simulator_args(fleet: SensorFleet, protocol: str, replica: int) -> list[str]:
    args = ["simulate", protocol, "--fleet", FLEET_FILE]
    if protocol == "mqtt":
        args += ["--broker", broker_url(fleet)]
    else:
        port = fleet.spec.protocols.coap.port if protocol == "coap" else fleet.spec.protocols.opcua.port
        args += ["--host", "0.0.0.0", "--port", str(port)]
    return [*args, "--replica", str(replica), *metrics_args(fleet)]


def _server_port(fleet: SensorFleet, protocol: str) -> dict[str, Any]:
    if protocol == "coap":
        return {"name": "coap", "containerPort": fleet.spec.protocols.coap.port, "protocol": "UDP"}
    return {"name": "opcua", "containerPort": fleet.spec.protocols.opcua.port, "protocol": "TCP"}


def build_simulator_deployment(fleet: SensorFleet, owner: Owner, options: BuildOptions, protocol: str, replica: int) -> dict[str, Any]:
    ports = metrics_ports(fleet)
    env = _protocol_env(fleet, protocol)
    sections = ["seed", "epoch", "sensors", "anomalies", "replay", "monitoring"]
    if protocol == "mqtt":
        sections.append("broker")
    else:
        ports = [_server_port(fleet, protocol), *ports]
    container = app_container("simulator", simulator_args(fleet, protocol, replica), "simulator", options, env, ports, fleet,
                              with_data=False, protocol=protocol)
    # Not collectorReplicas: the simulators never read it, and a restart leaves a gap in every
    # series (the ticks of the restart are never produced).
    protocol_spec = {k: v for k, v in fleet.spec.protocols.model_dump(mode="json", by_alias=True)[protocol].items() if k != "collectorReplicas"}
    template_hash = spec_hash(spec_sections(fleet, *sections), protocol_spec)
    return single_pod_deployment(
        simulator_name(fleet.name, protocol, replica), owner, f"{protocol}-simulator",
        {PROTOCOL_LABEL: protocol, REPLICA_LABEL: str(replica)},
        app_pod_spec(fleet, container, with_data=False), template_hash, options,
    )


def build_simulator_service(fleet: SensorFleet, owner: Owner, options: BuildOptions, protocol: str, replica: int) -> dict[str, Any]:
    port = _server_port(fleet, protocol)
    extra = {PROTOCOL_LABEL: protocol, REPLICA_LABEL: str(replica)}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(simulator_name(fleet.name, protocol, replica), owner,
                                    labels(fleet.name, f"{protocol}-simulator", options, **extra)),
        "spec": {
            "type": "ClusterIP",
            "selector": {**selector_labels(fleet.name, f"{protocol}-simulator"), **extra},
            "ports": [{"name": port["name"], "port": port["containerPort"], "targetPort": port["name"], "protocol": port["protocol"]}],
        },
    }


def collector_targets(fleet: SensorFleet, protocol: str, replica: int) -> list[str]:
    """The simulator servers collector `replica` observes: every n-th one, n = collector count."""
    spec = fleet.spec.protocol(protocol)
    count = collector_count(fleet, protocol)
    if protocol == "coap":
        return [f"coap://{simulator_name(fleet.name, 'coap', i)}:{fleet.spec.protocols.coap.port}"
                for i in range(spec.replicas) if i % count == replica]
    return [f"opc.tcp://{simulator_name(fleet.name, 'opcua', i)}:{fleet.spec.protocols.opcua.port}"
            for i in range(spec.replicas) if i % count == replica]


def collector_args(fleet: SensorFleet, protocol: str, replica: int) -> list[str]:
    args = ["collect", protocol, "--fleet", FLEET_FILE, "--data", data_location(fleet), *metrics_args(fleet)]
    if protocol == "mqtt":
        args += ["--broker", broker_url(fleet), "--client-id", collector_name(fleet.name, "mqtt", replica)]
    else:
        for target in collector_targets(fleet, protocol, replica):
            args += ["--target", target]
    return args


def build_collector_deployment(fleet: SensorFleet, owner: Owner, options: BuildOptions, protocol: str, replica: int) -> dict[str, Any]:
    env = _protocol_env(fleet, protocol) + storage_env(fleet)
    with_data = uses_claim(fleet)
    container = app_container("collector", collector_args(fleet, protocol, replica), "collector", options, env,
                              metrics_ports(fleet), fleet, with_data=with_data, protocol=protocol)
    # seed/epoch (with the protocol's interval and devices) define the sequence space and the values
    # the collector expects: an edit must restart it, or it reads the new readings with old state.
    sections = ["seed", "epoch", "sensors", "anomalies", "replay", "collector", "storage", "monitoring"] + (
        ["broker"] if protocol == "mqtt" else [])
    template_hash = spec_hash(spec_sections(fleet, *sections), fleet.spec.protocols.model_dump(mode="json", by_alias=True)[protocol])
    return single_pod_deployment(
        collector_name(fleet.name, protocol, replica), owner, f"{protocol}-collector",
        {PROTOCOL_LABEL: protocol, REPLICA_LABEL: str(replica)},
        app_pod_spec(fleet, container, with_data=with_data), template_hash, options,
        pod_labels=claim_user_labels(fleet),
    )
