"""The SensorFleet CustomResourceDefinition, generated from the one fleet-spec model.

    python -m sensorfleet.operator.crd > crds/sensorfleets.sensorfleet.io.yaml     (or `make crd`)

The OpenAPI schema is `FleetSpec.model_json_schema(by_alias=True)` mapped to a structural OpenAPI v3
schema: `$ref`s inlined, titles dropped, `anyOf [X, null]` collapsed to X, `gt`/`lt` turned into
`exclusiveMinimum`/`exclusiveMaximum`, defaults kept (nested sections default to `{}` so the API
server fills them in). The Python validators that span several fields have a CEL twin here
(`x-kubernetes-validations`), so the API server refuses what `sensorfleet validate` refuses.
A test fails when the committed CRD differs from what this module produces.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from sensorfleet.spec import _CRON_FIELD, API_GROUP, API_VERSION, KIND, FleetSpec

PLURAL = "sensorfleets"
SINGULAR = "sensorfleet"
SHORT_NAMES = ["sf"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"
CRD_FILE = f"{CRD_NAME}.yaml"

# Cross-field rules of spec.py, as CEL. Keyed by the pydantic model whose validator they mirror.
CEL_RULES: dict[str, list[dict[str, str]]] = {
    "FleetSpec": [
        {
            # Written for the undefaulted object too (the API server checks `default: {}` as is):
            # a missing mqtt.enabled means true, a missing coap/opcua.enabled means false. A fleet
            # of third-party sources alone (spec.sources) needs no simulated protocol.
            "rule": "!has(self.protocols) || !has(self.protocols.mqtt) || !has(self.protocols.mqtt.enabled) || self.protocols.mqtt.enabled"
            " || (has(self.protocols.coap) && has(self.protocols.coap.enabled) && self.protocols.coap.enabled)"
            " || (has(self.protocols.opcua) && has(self.protocols.opcua.enabled) && self.protocols.opcua.enabled)"
            " || (has(self.sources) && ((has(self.sources.mqtt) && size(self.sources.mqtt) > 0)"
            " || (has(self.sources.opcua) && size(self.sources.opcua) > 0) || (has(self.sources.coap) && size(self.sources.coap) > 0)))",
            "message": "at least one of mqtt, coap, opcua must be enabled (set spec.protocols.<name>.enabled: true), or spec.sources must list a third-party source",
            "fieldPath": ".protocols",
        },
        {
            "rule": "!has(self.forecasting) || !has(self.forecasting.parallelism) || self.forecasting.parallelism <= 1"
            " || !has(self.storage) || !has(self.storage.url)",
            "message": "forecasting.parallelism above 1 needs a claim (storage.size), not storage.url: the shard pods merge in a folder they all mount",
            "fieldPath": ".forecasting.parallelism",
        },
    ],
    "BrokerSpec": [
        {
            "rule": "!has(self.mode) || self.mode != 'external' || has(self.url)",
            "message": "mode 'external' needs url (e.g. mqtt://host:1883)",
            "fieldPath": ".url",
        }
    ],
    # Not a rule of spec.py: local runs have TLS on the broker they start, the operator's broker
    # has no TLS listener yet (issue 13 part 4), so the cluster refuses it instead of ignoring it.
    "BrokerTlsSpec": [
        {
            "rule": "!has(self.enabled) || !self.enabled",
            "message": "the broker the operator runs has no TLS listener yet (TLS works in `sensorfleet run`); in the cluster use mode external with an mqtts:// url",
            "fieldPath": ".enabled",
        },
        {
            "rule": "!has(self.secret)",
            "message": "certificates from a Secret are not built for the cluster yet",
            "fieldPath": ".secret",
        },
    ],
    "StorageSpec": [
        {
            "rule": "!(has(self.url) && has(self.size))",
            "message": "set either url or size, not both",
        }
    ],
    "SensorSpec": [
        {"rule": "self.min < self.max", "message": "min must be below max", "fieldPath": ".min"},
        {
            "rule": "self.min <= self.baseline && self.baseline <= self.max",
            "message": "baseline must lie within [min, max]",
            "fieldPath": ".baseline",
        },
    ],
}

# The schedule validator (five cron fields) as one anchored pattern the API server checks.
_CRON_ATOM = _CRON_FIELD.removeprefix("^").removesuffix("$")
SCHEDULE_PATTERN = rf"^\s*{_CRON_ATOM}(\s+{_CRON_ATOM}){{4}}\s*$"

# Structural schemas refuse these JSON-schema keywords (or they carry no meaning for the API server).
_DROP = {"title", "additionalProperties", "$defs", "const", "discriminator"}


def _models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every pydantic model reachable from root, by class name (the keys of `$defs`)."""
    found: dict[str, type[BaseModel]] = {}

    def visit(model: type[BaseModel]) -> None:
        if model.__name__ in found:
            return
        found[model.__name__] = model
        for field in model.model_fields.values():
            for arg in _type_args(field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    visit(arg)

    visit(root)
    return found


def _type_args(annotation: Any) -> list[Any]:
    args = [annotation]
    for sub in getattr(annotation, "__args__", ()) or ():
        args.extend(_type_args(sub))
    return args


def _factory_default(model: type[BaseModel], alias: str) -> Any:
    """The default of a `default_factory` field: `{}` for a section (the API server then fills in
    its fields' own defaults), the dumped value otherwise (e.g. the default sensors)."""
    for name, field in model.model_fields.items():
        if (field.alias or name) == alias and field.default_factory is not None:
            value = field.default_factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                return {}
            from pydantic import TypeAdapter

            return TypeAdapter(field.annotation).dump_python(value, mode="json", by_alias=True)
    return None


def _convert(node: dict[str, Any], defs: dict[str, Any], models: dict[str, type[BaseModel]],
             model_name: str | None = None) -> dict[str, Any]:
    node = copy.deepcopy(node)
    ref_target: str | None = None
    if "$ref" in node:
        ref_target = node.pop("$ref").rsplit("/", 1)[-1]
        merged = copy.deepcopy(defs[ref_target])
        merged.update(node)  # the property's own description wins over the model's
        node = merged
        model_name = ref_target
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot map a union of {len(branches)} types to a structural schema: {branches}")
        branch = branches[0]
        if "$ref" in branch:
            model_name = branch["$ref"].rsplit("/", 1)[-1]
        inner = _convert(branch, defs, models, model_name)
        for key, value in node.items():
            if key != "default" or value is not None:
                inner[key] = value
        node = inner
    if node.get("default", 0) is None:
        del node["default"]
    for key in _DROP & node.keys():
        del node[key]
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"] = node.pop("exclusiveMinimum")
        node["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"] = node.pop("exclusiveMaximum")
        node["exclusiveMaximum"] = True
    if node.get("type") == "object" and "properties" in node:
        model = models.get(model_name or "")
        properties = {}
        for key, child in node["properties"].items():
            converted = _convert(child, defs, models)
            if "default" not in converted and model is not None:
                default = _factory_default(model, key)
                if default is not None:
                    converted["default"] = default
            properties[key] = converted
        node["properties"] = properties
        if model_name in CEL_RULES:
            node["x-kubernetes-validations"] = copy.deepcopy(CEL_RULES[model_name])
    if node.get("type") == "array" and "items" in node:
        node["items"] = _convert(node["items"], defs, models)
        if "description" not in node["items"] and node.get("description"):
            node["items"]["description"] = f"One item of: {node['description']}"
    return node


def spec_schema() -> dict[str, Any]:
    """The structural OpenAPI v3 schema of `.spec`, from FleetSpec."""
    raw = FleetSpec.model_json_schema(by_alias=True)
    defs = raw.get("$defs", {})
    models = _models(FleetSpec)
    schema = _convert(raw, defs, models, "FleetSpec")
    schema["description"] = (
        "Desired state of a simulated sensor fleet: sensors and their signal model, the devices per "
        "protocol (MQTT, CoAP, OPC UA), the broker, the dataset and the forecasting job."
    )
    forecasting = schema["properties"]["forecasting"]["properties"]
    forecasting["schedule"]["pattern"] = SCHEDULE_PATTERN
    # Sensors are keyed by name: the API server refuses duplicates and server-side apply merges by name.
    sensors = schema["properties"]["sensors"]
    sensors["x-kubernetes-list-type"] = "map"
    sensors["x-kubernetes-list-map-keys"] = ["name"]
    return schema


def _condition_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A standard Kubernetes condition.",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "description": "`Ready`, `Progressing` or `Degraded`."},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"], "description": "Whether the condition holds."},
            "reason": {"type": "string", "description": "One CamelCase word saying why."},
            "message": {"type": "string", "description": "What happened, for a human."},
            "observedGeneration": {"type": "integer", "description": "The `.metadata.generation` this condition was computed for."},
            "lastTransitionTime": {"type": "string", "format": "date-time", "description": "When the status last changed."},
        },
    }


def status_schema() -> dict[str, Any]:
    counts = {
        "type": "object",
        "description": "Ready and desired pods of one protocol's simulators and collectors.",
        "properties": {
            "devices": {"type": "integer", "description": "Simulated devices of this protocol."},
            "simulators": {"type": "integer", "description": "Desired simulator pods."},
            "simulatorsReady": {"type": "integer", "description": "Simulator pods ready."},
            "collectors": {"type": "integer", "description": "Desired collector pods."},
            "collectorsReady": {"type": "integer", "description": "Collector pods ready."},
        },
    }
    return {
        "type": "object",
        "description": "Observed state of the fleet, written by the operator.",
        "properties": {
            "observedGeneration": {"type": "integer", "description": "The generation last reconciled."},
            "conditions": {
                "type": "array",
                "description": "`Ready`, `Progressing` and `Degraded`, each with observedGeneration.",
                "items": _condition_schema(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "protocols": {
                "type": "object",
                "description": "Per enabled protocol: devices and ready simulators/collectors.",
                "additionalProperties": counts,
            },
            "enabledProtocols": {"type": "string", "description": "Enabled protocols, comma-separated (printer column)."},
            "devices": {"type": "integer", "description": "Simulated devices over all protocols."},
            "ready": {"type": "string", "description": "Ready pods / desired pods (printer column)."},
            "brokerEndpoint": {"type": "string", "description": "MQTT URL of the fleet's broker inside the cluster."},
            "dataset": {"type": "string", "description": "Where the Parquet dataset lives (PVC name or URL)."},
            "dataClaim": {
                "type": "object",
                "description": "The data PersistentVolumeClaim, and what deleting the fleet does to it.",
                "properties": {
                    "name": {"type": "string", "description": "Name of the claim."},
                    "onFleetDelete": {"type": "string", "enum": ["Retain", "Delete"], "description": "Retain: the claim (the dataset) outlives the fleet; Delete: it goes with it."},
                },
            },
            "lastForecast": {
                "type": "object",
                "description": "The last forecasting job that finished.",
                "properties": {
                    "time": {"type": "string", "format": "date-time", "description": "When it last succeeded."},
                    "job": {"type": "string", "description": "Name of the Job."},
                    "result": {"type": "string", "description": "`Succeeded` or `Failed`."},
                    "reason": {"type": "string", "description": "What the job's container reported: `Forecast` (a forecast was made), `WaitingForData` (the dataset is still too young: nothing failed), `Failed`."},
                    "headline": {"type": "string", "description": "Headline of the forecast (from the container's termination message), e.g. `Harmonic MASE 0.81 (0.93x SeasonalNaive), 24 series`."},
                    "message": {"type": "string", "description": "Why no forecast was made, e.g. `waiting for data: have 12 steps of 1min, need 1681 (...)`, or the error of a failed job."},
                },
            },
        },
    }


def build_crd() -> dict[str, Any]:
    """The full CustomResourceDefinition manifest."""
    root = {
        "type": "object",
        "description": "A fleet of simulated industrial sensors (MQTT, CoAP, OPC UA) with its broker, "
        "collectors, Parquet dataset and forecasting job, run by the SensorFleet operator.",
        "properties": {
            "apiVersion": {"type": "string", "description": "`sensorfleet.io/v1alpha1`."},
            "kind": {"type": "string", "description": "`SensorFleet`."},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [
            {
                "rule": "size(self.metadata.name) <= 40",
                "message": "metadata.name: at most 40 characters, so the names of the fleet's children stay valid",
            }
        ],
    }
    columns = [
        {"name": "Protocols", "type": "string", "jsonPath": ".status.enabledProtocols", "description": "Enabled protocols."},
        {"name": "Devices", "type": "integer", "jsonPath": ".status.devices", "description": "Simulated devices."},
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status', "description": "The Ready condition."},
        {"name": "Pods", "type": "string", "jsonPath": ".status.ready", "priority": 1, "description": "Ready / desired pods."},
        {"name": "Last Forecast", "type": "date", "jsonPath": ".status.lastForecast.time", "description": "Last forecast made (a job that only waited for data does not change it)."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "sensorfleet", "app.kubernetes.io/part-of": "sensorfleet"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["all", "sensorfleet"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


HEADER = "# GENERATED by `python -m sensorfleet.operator.crd` (make crd) from sensorfleet.spec.FleetSpec. Do not edit.\n"


def render_crd() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main() -> int:
    sys.stdout.write(render_crd())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
