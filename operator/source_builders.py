"""Pure builders of the collectors of third-party sources (spec.sources): one Deployment each,
`<fleet>-src-<name>`, running `sensorfleet collect <protocol> --source <name>`.

Apart from workload_builders.py (which holds the simulated fleet's simulators and collectors)
and built from the same pieces (pod_builders, child_meta); the same rules: no I/O, no kopf, the
same fleet gives the same manifests.
"""

from __future__ import annotations

from typing import Any

from sensorfleet.operator.child_meta import PROTOCOL_LABEL, BuildOptions, Owner, spec_hash, spec_sections
from sensorfleet.operator.pod_builders import ENV_MQTT_PASSWORD, ENV_MQTT_USERNAME, ENV_OPCUA_PASSWORD, ENV_OPCUA_USERNAME, FLEET_FILE, app_container, app_pod_spec, metrics_args, metrics_ports, secret_env, single_pod_deployment, storage_env
from sensorfleet.operator.storage_builders import claim_user_labels, data_location, uses_claim
from sensorfleet.sources import MqttSource, OpcuaSource
from sensorfleet.spec import SensorFleet

SOURCE_LABEL = "sensorfleet.io/source"


def source_collector_name(fleet: str, source: str) -> str:
    return f"{fleet}-src-{source}"


def source_collector_names(fleet: SensorFleet) -> list[str]:
    """The Deployments of the fleet's source collectors (status counts them like any collector)."""
    return [source_collector_name(fleet.name, s.name) for s in fleet.spec.sources.all()]


def source_collector_args(fleet: SensorFleet, protocol: str, source: str) -> list[str]:
    return ["collect", protocol, "--fleet", FLEET_FILE, "--data", data_location(fleet), *metrics_args(fleet), "--source", source]


def _credentials_env(source: Any) -> list[dict[str, Any]]:
    """The source's username and password from its Secret keys (never a literal)."""
    if getattr(source, "credentials", None) is None:  # CoAP sources have none
        return []
    if isinstance(source, MqttSource):
        names = (ENV_MQTT_USERNAME, ENV_MQTT_PASSWORD)
    elif isinstance(source, OpcuaSource):
        names = (ENV_OPCUA_USERNAME, ENV_OPCUA_PASSWORD)
    else:
        return []
    return [secret_env(names[0], source.credentials.username), secret_env(names[1], source.credentials.password)]


def build_source_collector_deployment(fleet: SensorFleet, owner: Owner, options: BuildOptions, protocol: str, source_name: str) -> dict[str, Any]:
    source = fleet.spec.sources.named(source_name)
    with_data = uses_claim(fleet)
    container = app_container("collector", source_collector_args(fleet, protocol, source_name), "collector", options,
                              _credentials_env(source) + storage_env(fleet), metrics_ports(fleet), fleet, with_data=with_data)
    # Only what this process reads: its own source, batching, storage and metrics; an edit of the
    # simulators or of another source leaves it running.
    template_hash = spec_hash(spec_sections(fleet, "collector", "storage", "monitoring"), protocol, source.model_dump(mode="json", by_alias=True))
    return single_pod_deployment(
        source_collector_name(fleet.name, source_name), owner, f"{protocol}-source-collector",
        {PROTOCOL_LABEL: protocol, SOURCE_LABEL: source_name},
        app_pod_spec(fleet, container, with_data=with_data), template_hash, options,
        pod_labels=claim_user_labels(fleet),
    )


def build_source_collectors(fleet: SensorFleet, owner: Owner, options: BuildOptions) -> list[dict[str, Any]]:
    """A collector Deployment per third-party source, in spec order (mqtt, opcua, coap)."""
    return [build_source_collector_deployment(fleet, owner, options, protocol, source.name)
            for protocol in ("mqtt", "opcua", "coap") for source in getattr(fleet.spec.sources, protocol)]
