"""`spec.sources`: devices SensorFleet did not simulate, collected into the same dataset.

Each source is one collector process (one pod in the cluster) that reads a third-party server or
broker and maps what it receives to readings: device, sensor, value, unit and source timestamp.
Third-party devices have no SensorFleet sequence number, so their readings are stored with `seq`
null; the collector counts what it received, stored and refused (by reason) instead of gaps.
See docs/protocols.md, "Third-party devices".
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from sensorfleet.mapping import TimestampFormat, TopicPattern, check_pointer, template_names
from sensorfleet.spec_base import _DNS_LABEL, CredentialsRef, SpecModel

# A source's pod is `<fleet>-src-<name>`: a 40-character fleet name leaves this much of a label.
SOURCE_NAME_LENGTH = 18
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"  # a device or sensor name as stored
_TEMPLATE = r"^[A-Za-z0-9_.:\-{}]{1,128}$"
_UNIT = r"^[^\s]{0,16}$"
_NODE_ID = r"^(ns=\d+;|nsu=[^;]+;)?[isgb]=.+$"
_BROWSE_PATH = r"^\d+:[^/]+(/\d+:[^/]+)*$"


class SourceBase(SpecModel):
    name: Annotated[str, Field(pattern=_DNS_LABEL, max_length=SOURCE_NAME_LENGTH, description="Name of the source (lower-case DNS label, at most 18 characters): names its collector process and pod (`<fleet>-src-<name>`).")]


class MqttMapping(SpecModel):
    """One kind of message: which topics, and where device, sensor, value and time are in them."""

    topic: Annotated[str, Field(description="Topic pattern: an MQTT filter (`+` one level, `#` the rest) whose levels may be named, e.g. `plant/{site}/{device}/{sensor}`; the broker is subscribed with every `{name}` as `+`.")]
    device: Annotated[str, Field(default="{device}", pattern=_TEMPLATE, description="Device id: text with `{name}` placeholders of the topic pattern, e.g. `{site}-{device}`.")]
    sensor: Annotated[str, Field(default="{sensor}", pattern=_TEMPLATE, description="Sensor name: text with `{name}` placeholders of the topic pattern, or a fixed name when one message carries one sensor's value.")]
    value: Annotated[str, Field(default="", description="JSON pointer (RFC 6901) to the value in the payload, e.g. `/data/temp`; empty: the payload is the value (a bare JSON number).")]
    timestamp: Annotated[str | None, Field(default=None, description="JSON pointer to the source timestamp, e.g. `/ts`; unset: the time the collector received the message.")]
    timestamp_format: Annotated[TimestampFormat, Field(default="iso8601", description="`iso8601` (with a zone: `Z` or `+01:00`), `unixSeconds` or `unixMilliseconds`.")]
    unit: Annotated[str, Field(default="", pattern=_UNIT, description="Engineering unit stored with every value (empty: unknown).")]

    @field_validator("topic")
    @classmethod
    def _topic_parses(cls, value: str) -> str:
        TopicPattern.parse(value)
        return value

    @field_validator("value", "timestamp")
    @classmethod
    def _pointers(cls, value: str | None) -> str | None:
        return None if value is None else check_pointer(value)

    @model_validator(mode="after")
    def _templates_use_the_topics_names(self) -> MqttMapping:
        names = TopicPattern.parse(self.topic).names
        for field in ("device", "sensor"):
            unknown = [n for n in template_names(getattr(self, field)) if n not in names]
            if unknown:
                known = ", ".join(f"{{{n}}}" for n in names) or "none"
                raise ValueError(f"{field}: {{{unknown[0]}}} is not a named level of topic {self.topic!r} (its names: {known})")
        return self


class MqttSource(SourceBase):
    url: Annotated[str, Field(pattern=r"^mqtts?://[^\s]+$", description="The broker the devices publish to, e.g. `mqtt://broker.plant:1883`.")]
    credentials: Annotated[CredentialsRef | None, Field(default=None, description="Username and password at the broker, from Secret keys; the collector gets them as SENSORFLEET_MQTT_USERNAME / _PASSWORD (local runs: set those variables).")]
    qos: Annotated[Literal[0, 1], Field(default=1, description="QoS of the subscription. With 1 the session is persistent and a message is acknowledged once its readings are written (at least once: no sequence numbers, so a message redelivered after a crash is stored again).")]
    mappings: Annotated[list[MqttMapping], Field(min_length=1, max_length=64, description="What to subscribe to and how to read it. A message is read by every mapping whose topic pattern matches it (e.g. two mappings for two values of one JSON document).")]


class OpcuaNode(SpecModel):
    """One variable of the server: by node id or by browse path, and what it is."""

    node_id: Annotated[str | None, Field(default=None, pattern=_NODE_ID, description="Node id in the OPC UA string form, e.g. `ns=1;s=Boiler.Temperature`, `ns=2;i=1001` or `nsu=urn:plant;s=T1`.")]
    browse_path: Annotated[str | None, Field(default=None, pattern=_BROWSE_PATH, description="Browse path from the Objects folder, `<namespace index>:<browse name>` per level, e.g. `1:Boiler/1:Temperature`.")]
    device: Annotated[str, Field(pattern=_NAME, description="Device id stored with its values.")]
    sensor: Annotated[str, Field(pattern=_NAME, description="Sensor name stored with its values.")]
    unit: Annotated[str, Field(default="", pattern=_UNIT, description="Engineering unit stored with every value (empty: unknown).")]

    @model_validator(mode="after")
    def _one_address(self) -> OpcuaNode:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError("set exactly one of nodeId and browsePath")
        return self


class OpcuaSource(SourceBase):
    endpoint: Annotated[str, Field(pattern=r"^opc\.tcp://[^\s/]+(/[^\s]*)?$", description="Endpoint URL of the server, e.g. `opc.tcp://plc.plant:4840`.")]
    authentication: Annotated[Literal["anonymous", "username"], Field(default="anonymous", description="`anonymous`, or `username` with SENSORFLEET_OPCUA_USERNAME / _PASSWORD (in Kubernetes from `credentials`).")]
    security: Annotated[Literal["None", "Basic256Sha256"], Field(default="None", description="Security policy of the connection: `None` (the server must offer it), or `Basic256Sha256` with the collector's own self-signed application certificate (made once under SENSORFLEET_OPCUA_PKI, URI `urn:sensorfleet:<fleet>:source-<name>`), which the server must trust. The server's certificate is not checked against a trust list.")]
    security_mode: Annotated[Literal["Sign", "SignAndEncrypt"], Field(default="SignAndEncrypt", description="With `security: Basic256Sha256`: sign only, or sign and encrypt every message.")]
    credentials: Annotated[CredentialsRef | None, Field(default=None, description="With `authentication: username` in Kubernetes: the Secret keys of the username and password.")]
    publishing_interval: Annotated[float, Field(default=1.0, ge=0.05, le=60, description="Publishing interval of the subscription, in seconds.")]
    sampling_interval: Annotated[float, Field(default=0.0, ge=0, le=3600, description="Sampling interval the server is asked for, in seconds (0: as fast as the server reports changes).")]
    nodes: Annotated[list[OpcuaNode], Field(min_length=1, max_length=100_000, description="The variables to collect.")]

    @model_validator(mode="after")
    def _series_unique(self) -> OpcuaSource:
        seen: set[tuple[str, str]] = set()
        for index, node in enumerate(self.nodes):
            if (node.device, node.sensor) in seen:
                raise ValueError(f"nodes[{index}]: device {node.device!r} sensor {node.sensor!r} is already given to another node")
            seen.add((node.device, node.sensor))
        return self


class CoapResource(SpecModel):
    uri: Annotated[str, Field(pattern=r"^coap://[^\s/]+/[^\s]*$", description="The resource, e.g. `coap://sensor.plant:5683/temp` (a query is kept: `/time?ticks`).")]
    device: Annotated[str, Field(pattern=_NAME, description="Device id stored with its values.")]
    sensor: Annotated[str, Field(pattern=_NAME, description="Sensor name stored with its values.")]
    unit: Annotated[str, Field(default="", pattern=_UNIT, description="Engineering unit stored with every value (empty: unknown).")]
    format: Annotated[Literal["number", "json"], Field(default="number", description="`number`: the payload is a plain number in text (`21.5`); `json`: a JSON document read with `value` / `timestamp`.")]
    value: Annotated[str, Field(default="", description="With `format: json`: JSON pointer (RFC 6901) to the value; empty: the document is the value.")]
    timestamp: Annotated[str | None, Field(default=None, description="With `format: json`: JSON pointer to the source timestamp; unset: the time of the notification.")]
    timestamp_format: Annotated[TimestampFormat, Field(default="iso8601", description="`iso8601`, `unixSeconds` or `unixMilliseconds`.")]

    @field_validator("value", "timestamp")
    @classmethod
    def _pointers(cls, value: str | None) -> str | None:
        return None if value is None else check_pointer(value)

    @model_validator(mode="after")
    def _pointers_need_json(self) -> CoapResource:
        if self.format == "number" and (self.value or self.timestamp):
            raise ValueError("value and timestamp (JSON pointers) need format: json")
        return self


class CoapSource(SourceBase):
    resources: Annotated[list[CoapResource], Field(min_length=1, max_length=10_000, description="The resources to observe (RFC 7641). One the server does not let us observe is polled every `pollInterval`.")]
    poll_interval: Annotated[float, Field(default=10.0, ge=0.1, le=86400, description="Seconds between two GETs of a resource the server does not let us observe.")]

    @model_validator(mode="after")
    def _series_unique(self) -> CoapSource:
        seen: set[tuple[str, str]] = set()
        for index, resource in enumerate(self.resources):
            if (resource.device, resource.sensor) in seen:
                raise ValueError(f"resources[{index}]: device {resource.device!r} sensor {resource.sensor!r} is already given to another resource")
            seen.add((resource.device, resource.sensor))
        return self


class SourcesSpec(SpecModel):
    mqtt: Annotated[list[MqttSource], Field(default_factory=list, max_length=64, description="Brokers third-party devices publish JSON to, with the mapping of their messages.")]
    opcua: Annotated[list[OpcuaSource], Field(default_factory=list, max_length=64, description="Third-party OPC UA servers and the variables to collect.")]
    coap: Annotated[list[CoapSource], Field(default_factory=list, max_length=64, description="Third-party CoAP resources to observe.")]

    @model_validator(mode="after")
    def _names_unique(self) -> SourcesSpec:
        names = [s.name for s in self.all()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"source names must be unique across mqtt, opcua and coap; repeated: {', '.join(repeated)}")
        return self

    def all(self) -> list[MqttSource | OpcuaSource | CoapSource]:
        return [*self.mqtt, *self.opcua, *self.coap]

    def protocol_of(self, name: str) -> str:
        for protocol in ("mqtt", "opcua", "coap"):
            if any(s.name == name for s in getattr(self, protocol)):
                return protocol
        raise KeyError(name)

    def named(self, name: str) -> MqttSource | OpcuaSource | CoapSource:
        for source in self.all():
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.all()) or "none"
        raise KeyError(f"spec.sources has no source named {name!r} (its sources: {known})")
