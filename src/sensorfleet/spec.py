"""The fleet spec: one pydantic model with defaults, bounds and a description on every field.

It is the single source of truth for `sensorfleet run`, `sensorfleet validate`, the simulators and
collectors, the forecasting job and the CRD's OpenAPI schema (see `sensorfleet.operator.crd`).
Field names are camelCase on the wire (YAML / Kubernetes) and snake_case in Python.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sensorfleet.sources import SourcesSpec
from sensorfleet.spec_base import _CRON_FIELD, _DNS_LABEL, _SECRET_NAME, _SENSOR_NAME, CredentialsRef, SecretKeyRef, SpecModel

MAX_CONNECTIONS_PER_PROCESS = 15_000  # connectionPerDevice: below a 20,000 open-file limit, with room for the rest
API_GROUP = "sensorfleet.io"
API_VERSION = "v1alpha1"
KIND = "SensorFleet"
PROTOCOLS: tuple[str, ...] = ("mqtt", "coap", "opcua")


class SensorSpec(SpecModel):
    name: Annotated[str, Field(pattern=_SENSOR_NAME, description="Sensor name, e.g. `temperature`; part of MQTT topics and OPC UA browse names.")]
    unit: Annotated[str, Field(min_length=1, max_length=16, description="Engineering unit, e.g. `degC`, `%RH`, `hPa`.")]
    baseline: Annotated[float, Field(description="Mean value around which the signal moves, in `unit`.")]
    daily_amplitude: Annotated[float, Field(default=0.0, ge=0, description="Half the peak-to-trough swing of the daily cycle, in `unit`.")]
    peak_hour: Annotated[float, Field(default=15.0, ge=0, lt=24, description="UTC hour of day at which the daily cycle peaks. Opposite peak hours give anti-correlated sensors.")]
    noise: Annotated[float, Field(default=0.0, ge=0, description="Standard deviation of the Gaussian noise added to every reading, in `unit`.")]
    drift_per_day: Annotated[float, Field(default=0.0, description="Slow linear drift in `unit` per day since `spec.epoch`, scaled per device between 0.5x and 1.5x.")]
    device_spread: Annotated[float, Field(default=0.0, ge=0, description="Standard deviation of a fixed per-device offset of the baseline, in `unit`.")]
    noise_coupling: Annotated[float, Field(default=0.0, ge=-1, le=1, description="Correlation of this sensor's noise with the first sensor's noise (e.g. -0.7 for relative humidity against temperature).")]
    resolution: Annotated[float | None, Field(default=None, ge=0, description="Reading resolution in `unit` (values are rounded to a multiple of it) when `spec.realism` is enabled; unset: `noise x spec.realism.quantization`.")]
    min: Annotated[float, Field(description="Physical lower bound; readings are clamped to it.")]
    max: Annotated[float, Field(description="Physical upper bound; readings are clamped to it.")]

    @model_validator(mode="after")
    def _bounds_hold_baseline(self) -> SensorSpec:
        if self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        if not self.min <= self.baseline <= self.max:
            raise ValueError(f"baseline ({self.baseline}) must lie within [min, max] = [{self.min}, {self.max}]")
        return self


class AnomalySpec(SpecModel):
    spike_probability: Annotated[float, Field(default=0.001, ge=0, le=0.2, description="Fraction of readings replaced by a spike.")]
    spike_magnitude: Annotated[float, Field(default=8.0, gt=0, le=100, description="Spike height in multiples of the sensor's noise (or of 1% of its range when noise is 0).")]
    stuck_probability: Annotated[float, Field(default=0.002, ge=0, le=0.5, description="Fraction of readings inside a stuck-at run (the value freezes, quality `uncertain`).")]
    stuck_duration: Annotated[int, Field(default=30, ge=2, le=100000, description="Length of a stuck-at run, in readings.")]
    dropout_probability: Annotated[float, Field(default=0.001, ge=0, le=0.5, description="Fraction of readings inside a dropout (no value, quality `bad`).")]
    dropout_duration: Annotated[int, Field(default=10, ge=1, le=100000, description="Length of a dropout, in readings.")]
    # Faults that last a window of readings, each labelled with its kind on every reading of the window.
    drift_fault_probability: Annotated[float, Field(default=0.002, ge=0, le=0.5, description="Fraction of readings inside a drift fault (the sensor walks off linearly, anomaly `drift`).")]
    drift_fault_duration: Annotated[int, Field(default=120, ge=2, le=100000, description="Length of a drift fault, in readings.")]
    drift_fault_magnitude: Annotated[float, Field(default=10.0, gt=0, le=1000, description="Offset reached at the end of a drift fault, in multiples of the sensor's noise.")]
    level_shift_probability: Annotated[float, Field(default=0.002, ge=0, le=0.5, description="Fraction of readings inside a level shift (a constant offset, anomaly `level_shift`).")]
    level_shift_duration: Annotated[int, Field(default=60, ge=2, le=100000, description="Length of a level shift, in readings.")]
    level_shift_magnitude: Annotated[float, Field(default=6.0, gt=0, le=1000, description="Offset of a level shift, in multiples of the sensor's noise (sign drawn per fault).")]
    noise_burst_probability: Annotated[float, Field(default=0.002, ge=0, le=0.5, description="Fraction of readings inside a noise burst (noise multiplied, anomaly `noise_burst`).")]
    noise_burst_duration: Annotated[int, Field(default=40, ge=2, le=100000, description="Length of a noise burst, in readings.")]
    noise_burst_magnitude: Annotated[float, Field(default=5.0, gt=1, le=1000, description="Noise standard deviation during a burst, in multiples of the sensor's noise.")]
    oscillation_probability: Annotated[float, Field(default=0.002, ge=0, le=0.5, description="Fraction of readings inside an oscillation (a control loop hunting, anomaly `oscillation`).")]
    oscillation_duration: Annotated[int, Field(default=60, ge=4, le=100000, description="Length of an oscillation, in readings.")]
    oscillation_magnitude: Annotated[float, Field(default=4.0, gt=0, le=1000, description="Amplitude of an oscillation, in multiples of the sensor's noise.")]
    oscillation_period: Annotated[float, Field(default=8.0, ge=2, le=10000, description="Period of an oscillation, in readings.")]


class RealismSpec(SpecModel):
    """What makes the signal more than a daily cosine: the parts a forecaster has to earn.

    Amplitudes are in multiples of each sensor's scale (its `dailyAmplitude`, or 10x its `noise`
    when it has no daily cycle), so every sensor, built-in or yours, gets them by default."""

    enabled: Annotated[bool, Field(default=True, description="Add the components below; `false` gives the plain model (baseline + daily cosine + drift + noise).")]
    devices_per_site: Annotated[int, Field(default=10, ge=1, le=1_000_000, description="Devices of one site (consecutive device numbers): they share the weather and the outages.")]
    weather_amplitude: Annotated[float, Field(default=0.6, ge=0, le=100, description="Standard deviation of the slow weather-like component a site's devices share, in sensor scales.")]
    weather_hours: Annotated[float, Field(default=30.0, gt=0, le=10000, description="Typical time scale of the weather component in hours (its periods spread from a fifth to five times this).")]
    weekly_amplitude: Annotated[float, Field(default=0.4, ge=0, le=100, description="Weekday occupancy effect (08-18 UTC, Monday to Friday against nights and weekends), in sensor scales.")]
    regime_hours: Annotated[float, Field(default=36.0, gt=0, le=100000, description="Mean hours between setpoint/regime changes of a device; the level steps to a new value at each.")]
    regime_amplitude: Annotated[float, Field(default=0.3, ge=0, le=100, description="Standard deviation of the setpoint level, in sensor scales.")]
    regime_ramp_hours: Annotated[float, Field(default=1.0, ge=0, le=1000, description="Hours the level takes to settle on a new setpoint (0 = an instant step).")]
    ageing_noise_per_day: Annotated[float, Field(default=0.002, ge=0, le=10, description="Growth of the noise with the sensor's age: noise x (1 + this x age in days); devices were installed up to 180 days before `epoch`.")]
    calibration_gain_spread: Annotated[float, Field(default=0.03, ge=0, le=1, description="Standard deviation of a per-device gain error around the baseline (0.03 = 3 %).")]
    quantization: Annotated[float, Field(default=0.3, ge=0, le=100, description="Reading resolution of sensors without their own `resolution`, as a fraction of their noise (0 = full precision).")]
    site_outage_probability: Annotated[float, Field(default=0.001, ge=0, le=0.5, description="Fraction of time a site is off the network: every device of the site drops out together (anomaly `dropout`).")]
    site_outage_duration: Annotated[int, Field(default=30, ge=1, le=100000, description="Length of a site outage, in readings.")]


class ProtocolSpec(SpecModel):
    enabled: Annotated[bool, Field(default=False, description="Simulate and collect this protocol.")]
    devices: Annotated[int, Field(default=10, ge=1, le=1_000_000, description="Number of simulated devices speaking this protocol.")]
    interval: Annotated[float, Field(default=1.0, ge=0.001, le=86400, description="Seconds between two readings of one device (publish / update interval).")]
    replicas: Annotated[int, Field(default=1, ge=1, le=64, description="Simulator processes (pods); devices are split evenly between them.")]
    collector_replicas: Annotated[int, Field(default=1, ge=1, le=64, description="Collector processes (pods).")]


class SparkplugSpec(SpecModel):
    """Sparkplug B options (docs/protocols.md, "Sparkplug B"). The Sparkplug group is the fleet's name."""

    primary_host_id: Annotated[
        str | None,
        Field(default=None, pattern=r"^[A-Za-z0-9_\-.]+$", max_length=128, description="Host id of the primary host application: edge nodes publish only while its STATE (`spBv1.0/STATE/<id>`) says online, and the collector is that host (it publishes the STATE). Unset: edge nodes publish as soon as they are connected."),
    ]


class MqttSpec(ProtocolSpec):
    enabled: Annotated[bool, Field(default=True, description="Simulate and collect this protocol.")]
    qos: Annotated[Literal[0, 1], Field(default=1, description="MQTT QoS of published readings: 0 (at most once) or 1 (at least once).")]
    message_mode: Annotated[
        Literal["perDevice", "perReading", "gateway"],
        Field(default="perDevice", description="`perDevice`: one message per device and tick on `<prefix>/<fleet>/<device>` holding a JSON array of its readings; `perReading`: one message per reading on `<prefix>/<fleet>/<device>/<sensor>`; `gateway`: the simulator acts as an edge gateway and publishes up to `gatewayBatch` readings per message on `<prefix>/<fleet>/gateway/<replica>` (highest throughput)."),
    ]
    gateway_batch: Annotated[int, Field(default=500, ge=1, le=100_000, description="Readings per message at most in `gateway` mode.")]
    topic_prefix: Annotated[str, Field(default="sensorfleet", pattern=r"^[A-Za-z0-9_\-/]+$", description="First topic level(s); no wildcards.")]
    max_inflight: Annotated[int, Field(default=1000, ge=1, le=65535, description="Unacknowledged QoS 1 messages a simulator keeps in flight.")]
    max_queued: Annotated[int, Field(default=200_000, ge=100, le=10_000_000, description="Messages a simulator buffers while the broker is slow or away; beyond that readings are dropped and counted.")]
    payload_format: Annotated[
        Literal["json", "sparkplugB"],
        Field(default="json", description="`json`: the reading documents of `messageMode`; `sparkplugB`: Eclipse Sparkplug 3.0 (each simulator replica an edge node, each device a Sparkplug device; topics `spBv1.0/<fleet>/...`, `topicPrefix` and `messageMode` do not apply)."),
    ]
    sparkplug: Annotated[SparkplugSpec, Field(default_factory=SparkplugSpec, description="Sparkplug B options, with `payloadFormat: sparkplugB`.")]
    connection_per_device: Annotated[bool, Field(default=False, description="Every device holds its own MQTT connection (client id `<fleet>-<device>`, its own keep-alive, a retained Last Will `offline` and birth `online` on `<prefix>/<fleet>/<device>/status`, jittered reconnect back-off); readings and topics as in `perDevice` mode. For broker load tests; docs/protocols.md.")]
    connect_rate: Annotated[float, Field(default=1000.0, gt=0, le=100_000, description="With `connectionPerDevice`: device connections opened per second at most per simulator replica (ramp-up and every reconnect wave after a broker restart).")]
    keepalive: Annotated[int, Field(default=60, ge=5, le=65535, description="With `connectionPerDevice`: MQTT keep-alive of each device connection, in seconds.")]
    reconnect_max_delay: Annotated[float, Field(default=30.0, ge=1, le=3600, description="With `connectionPerDevice`: ceiling of a device's exponential reconnect back-off (1 s doubling up to this), each wait drawn uniformly from 0 to the back-off (full jitter).")]
    mqtt_version: Annotated[
        Literal["5", "3.1.1"],
        Field(default="5", description="MQTT version the simulators and collectors speak: `5` (a broker that refuses it gets 3.1.1 instead, logged) or `3.1.1` (paho on both sides). Write it as a string: `\"3.1.1\"`, `\"5\"`."),
    ]
    user_properties: Annotated[bool, Field(default=False, description="MQTT 5: every `perDevice` and `perReading` message carries its reading's `seq` and source timestamp `ts` (as in the payload) as user properties, so brokers, bridges and rules engines can route or filter without parsing the payload. Not in `gateway` mode (a message holds many readings).")]
    message_expiry: Annotated[int, Field(default=0, ge=0, le=4_294_967_295, description="MQTT 5 Message Expiry Interval of published readings, in seconds; 0: they never expire. The broker discards a reading still queued for a collector after this long, and the collector counts it lost.")]
    topic_aliases: Annotated[bool, Field(default=False, description="MQTT 5: the simulators publish with topic aliases, as many as the broker's Topic Alias Maximum allows (Mosquitto: 10 by default; the first topics of a connection get one), so a repeated topic travels as a 2-byte number. Subscribers still see full topic names. Not with `connectionPerDevice` (one topic a connection).")]

    @model_validator(mode="after")
    def _mqtt5_options_need_mqtt5(self) -> MqttSpec:
        if self.mqtt_version == "3.1.1":
            used = [name for name, on in (("userProperties", self.user_properties), ("messageExpiry", self.message_expiry), ("topicAliases", self.topic_aliases),
                                          ("connectionPerDevice", self.connection_per_device), ("payloadFormat sparkplugB", self.payload_format == "sparkplugB")) if on]
            if used:
                raise ValueError(f"mqttVersion: {', '.join(used)} need MQTT 5; use mqttVersion \"5\" (the default), got \"3.1.1\"")
        if self.user_properties and self.message_mode == "gateway":
            raise ValueError("userProperties: a gateway message holds many readings, so it has no one seq and ts; use messageMode perDevice or perReading")
        return self

    @model_validator(mode="after")
    def _sparkplug_fits(self) -> MqttSpec:
        if self.payload_format == "sparkplugB" and self.message_mode != "perDevice":
            raise ValueError(f"messageMode: with payloadFormat sparkplugB every device publishes its own DDATA; use perDevice (the default), got {self.message_mode}")
        if self.payload_format == "sparkplugB" and self.collector_replicas != 1:
            raise ValueError(f"collectorReplicas: a Sparkplug B host application must see every birth of a node, so it cannot share the subscription; use 1, got {self.collector_replicas}")
        if self.connection_per_device and (self.message_mode != "perDevice" or self.payload_format != "json"):
            raise ValueError(f"connectionPerDevice: each device publishes its own perDevice JSON messages; use messageMode perDevice and payloadFormat json, got {self.message_mode} / {self.payload_format}")
        per_process = -(-self.devices // self.replicas)  # one socket a device; 20,000 open files a process here
        if self.connection_per_device and per_process > MAX_CONNECTIONS_PER_PROCESS:
            raise ValueError(f"replicas: with connectionPerDevice one simulator process holds at most {MAX_CONNECTIONS_PER_PROCESS:,} device connections (open-file limit); use replicas >= {-(-self.devices // MAX_CONNECTIONS_PER_PROCESS)}, got {self.replicas}")
        return self


class CoapSpec(ProtocolSpec):
    port: Annotated[int, Field(default=5683, ge=1, le=65535, description="UDP port of the CoAP simulator.")]
    confirmable: Annotated[bool, Field(default=False, description="Send observe notifications as confirmable messages (slower; non-confirmable is the default for telemetry).")]


class LimitSpec(SpecModel):
    """Alarm limits of one sensor (either or both)."""

    low: Annotated[float | None, Field(default=None, description="Alarm when the value falls below this, in the sensor's unit.")]
    high: Annotated[float | None, Field(default=None, description="Alarm when the value rises above this, in the sensor's unit.")]

    @model_validator(mode="after")
    def _one_limit_below_the_other(self) -> LimitSpec:
        if self.low is None and self.high is None:
            raise ValueError("set low, high or both")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class OpcuaSpec(ProtocolSpec):
    port: Annotated[int, Field(default=4840, ge=1, le=65535, description="TCP port of the OPC UA simulator.")]
    security: Annotated[
        Literal["None", "Basic256Sha256"],
        Field(default="None", description="Security policy; `Basic256Sha256` signs and encrypts with a self-signed certificate generated on first start."),
    ]
    authentication: Annotated[
        Literal["anonymous", "username"],
        Field(default="anonymous", description="`anonymous`, or `username` with the credentials from the environment (SENSORFLEET_OPCUA_USERNAME / _PASSWORD); in Kubernetes from `credentials`."),
    ]
    credentials: Annotated[CredentialsRef | None, Field(default=None, description="With `authentication: username` in Kubernetes: the Secret keys of the username and password, passed to the simulators (which accept exactly these) and collectors as SENSORFLEET_OPCUA_USERNAME / _PASSWORD.")]
    publishing_interval: Annotated[float, Field(default=0.5, ge=0.05, le=60, description="OPC UA subscription publishing interval of the collector, in seconds.")]
    writable: Annotated[bool, Field(default=False, description="Two-way OPC UA: per device a writable `<Sensor>Setpoint` variable for each sensor of `controlledSensors` (the value follows a written setpoint with a first-order lag) and the methods `InjectFault(kind, durationSeconds)` and `Reset()`; every write and call is logged and emitted as an OPC UA event the collector stores beside the dataset.")]
    controlled_sensors: Annotated[list[str] | None, Field(default=None, description="Sensors that get a setpoint when `writable`; unset: every sensor.")]
    setpoint_lag_seconds: Annotated[float, Field(default=60.0, gt=0, le=86400, description="Time constant of the first-order lag with which a sensor's value follows its setpoint, in seconds (63% of a step after one time constant).")]
    history_hours: Annotated[float, Field(default=24.0, ge=0, le=8760, description="HistoryRead (raw values) of the last this many hours for every sensor variable, answered from the signal model (nothing stored); 0 turns history off.")]
    limit_alarms: Annotated[dict[str, LimitSpec], Field(default_factory=dict, description="Per sensor name, alarm limits: the simulator emits a `SensorFleetLimitEventType` event each time a device's value crosses one (state high, low or back to normal); the collector stores them with the device events.")]


class ProtocolsSpec(SpecModel):
    mqtt: Annotated[MqttSpec, Field(default_factory=MqttSpec, description="MQTT devices publishing through the broker.")]
    coap: Annotated[CoapSpec, Field(default_factory=CoapSpec, description="CoAP devices served by one CoAP server per replica, observed by the collector.")]
    opcua: Annotated[OpcuaSpec, Field(default_factory=OpcuaSpec, description="OPC UA devices: one server per replica, one object per device, one variable per sensor.")]


class BrokerTlsSpec(SpecModel):
    """TLS between the fleet's MQTT clients and the broker (docs/protocols.md, "TLS")."""

    enabled: Annotated[bool, Field(default=False, description="The broker SensorFleet runs locally (Mosquitto; not yet the operator's: the API server refuses it) listens with TLS only, on `port`, and simulators and collectors connect with `mqtts://`. For an `external` broker, TLS follows the URL's scheme (`mqtts://`) and this flag is not needed.")]
    port: Annotated[int, Field(default=8883, ge=0, le=65535, description="TLS port of the broker SensorFleet runs; 0 picks a free port locally.")]
    require_client_certificate: Annotated[bool, Field(default=True, description="The broker SensorFleet runs refuses clients without a certificate signed by its CA (mutual TLS); username and password stay required as with `authentication`.")]
    ca_file: Annotated[str | None, Field(default=None, min_length=1, description="PEM file of the CA that signed the broker's certificate (clients verify the broker with it); unset: the system's CAs, or the generated CA of a broker SensorFleet runs. Local runs only; in Kubernetes the file comes from `secret`.")]
    cert_file: Annotated[str | None, Field(default=None, min_length=1, description="PEM file of the client certificate simulators and collectors present (with `keyFile`). Local runs only; in Kubernetes from `secret`.")]
    key_file: Annotated[str | None, Field(default=None, min_length=1, description="PEM file of the client certificate's private key. Local runs only; in Kubernetes from `secret`.")]
    server_cert_file: Annotated[str | None, Field(default=None, min_length=1, description="Local runs: the PEM certificate the local Mosquitto presents (with `serverKeyFile` and `caFile`); unset: a CA, a server and a client certificate are generated in the run directory.")]
    server_key_file: Annotated[str | None, Field(default=None, min_length=1, description="Local runs: the private key of `serverCertFile`.")]
    secret: Annotated[str | None, Field(default=None, pattern=_SECRET_NAME, max_length=253, description="Reserved for Kubernetes (a Secret with `ca.crt`, `client.crt`, `client.key`, `tls.crt`, `tls.key`); not built yet: the API server refuses it, as it refuses `enabled`, until the operator's broker has a TLS listener.")]

    @model_validator(mode="after")
    def _pairs(self) -> BrokerTlsSpec:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("certFile and keyFile go together (a client certificate and its key)")
        if bool(self.server_cert_file) != bool(self.server_key_file):
            raise ValueError("serverCertFile and serverKeyFile go together")
        if self.server_cert_file and not (self.ca_file and self.cert_file):
            raise ValueError("with serverCertFile, set caFile (the CA that signed it and the client certificates) and certFile/keyFile (the clients' certificate)")
        return self


class BrokerSpec(SpecModel):
    mode: Annotated[
        Literal["auto", "embedded", "mosquitto", "external"],
        Field(default="auto", description="Local mode: `auto` uses `mosquitto` from PATH when present, else the embedded amqtt broker; `external` uses `url`. In Kubernetes the operator always runs Mosquitto."),
    ]
    url: Annotated[str | None, Field(default=None, pattern=r"^mqtts?://[^\s]+$", description="Broker URL for `external` mode, e.g. `mqtt://broker.example:1883`.")]
    port: Annotated[int, Field(default=1883, ge=0, le=65535, description="Port of the broker started locally or in the cluster; 0 picks a free port locally.")]
    authentication: Annotated[bool, Field(default=True, description="Require username and password (generated per fleet in Kubernetes; local embedded mode runs anonymously).")]
    image: Annotated[str, Field(default="eclipse-mosquitto:2.0.20", description="Broker container image used by the operator.")]
    tls: Annotated[BrokerTlsSpec, Field(default_factory=BrokerTlsSpec, description="TLS with a custom CA and client certificates, for the broker SensorFleet runs and for an external `mqtts://` broker.")]
    credentials: Annotated[CredentialsRef | None, Field(default=None, description="Username and password of an `external` broker, from Secret keys; in Kubernetes the simulators and collectors get them as SENSORFLEET_MQTT_USERNAME / _PASSWORD. The broker the operator runs gets generated credentials instead.")]

    @model_validator(mode="after")
    def _external_needs_url(self) -> BrokerSpec:
        if self.mode == "external" and not self.url:
            raise ValueError("mode 'external' needs url (e.g. mqtt://host:1883)")
        if self.tls.enabled and self.mode == "embedded":
            raise ValueError("tls.enabled: the embedded amqtt broker has no TLS listener; use mode mosquitto (or auto with mosquitto installed)")
        if self.mode == "external" and self.tls.enabled and not (self.url or "").startswith("mqtts://"):
            raise ValueError("tls.enabled with mode 'external': the url must be mqtts://host:port")
        if self.credentials and self.mode != "external":
            raise ValueError("credentials are for mode 'external' only (a broker SensorFleet runs gets generated credentials)")
        return self


class CollectorSpec(SpecModel):
    batch_size: Annotated[int, Field(default=5000, ge=1, le=1_000_000, description="Readings written per Parquet file at most.")]
    flush_interval: Annotated[float, Field(default=2.0, ge=0.05, le=3600, description="Seconds after which a partial batch is written anyway.")]


class S3CredentialsRef(SpecModel):
    """The access key pair of an S3-compatible store, each from a Secret key."""

    access_key_id: Annotated[SecretKeyRef, Field(description="Secret key holding the access key id; pods get it as AWS_ACCESS_KEY_ID.")]
    secret_access_key: Annotated[SecretKeyRef, Field(description="Secret key holding the secret access key; pods get it as AWS_SECRET_ACCESS_KEY.")]


class ClaimRetentionPolicy(SpecModel):
    """Like a StatefulSet's `persistentVolumeClaimRetentionPolicy`, for the fleet's data claim."""

    when_deleted: Annotated[
        Literal["Retain", "Delete"],
        Field(default="Retain", description="`Retain` (default): deleting the fleet keeps its data claim (and so the dataset); `Delete`: the claim goes with the fleet."),
    ]


class StorageSpec(SpecModel):
    url: Annotated[str | None, Field(default=None, description="fsspec URL of the dataset (e.g. `s3://bucket/fleet`); when unset, a local directory (or a PersistentVolumeClaim in Kubernetes).")]
    endpoint: Annotated[str | None, Field(default=None, pattern=r"^https?://[^\s]+$", description="S3 endpoint for an S3-compatible store (SeaweedFS, Ceph, ...), e.g. `http://seaweedfs.storage:8333`; pods get it as AWS_ENDPOINT_URL. Unset: AWS S3.")]
    region: Annotated[str | None, Field(default=None, pattern=r"^[a-z0-9-]{1,32}$", description="S3 region; pods get it as AWS_DEFAULT_REGION.")]
    credentials: Annotated[S3CredentialsRef | None, Field(default=None, description="Access keys of the S3 store from Secret keys (secretKeyRef env in every pod that reads or writes the dataset). Unset: the pods' own AWS identity (IRSA, instance profile).")]
    size: Annotated[str | None, Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$", description="Size of the PersistentVolumeClaim in Kubernetes, e.g. `5Gi`; exclusive with `url`. Defaults to 5Gi when neither is set.")]
    storage_class_name: Annotated[str | None, Field(default=None, description="StorageClass of the PersistentVolumeClaim; the cluster default when unset.")]
    access_modes: Annotated[
        list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]],
        Field(default_factory=lambda: ["ReadWriteOnce"], min_length=1, description="Access modes of the data claim. With `ReadWriteOnce` every pod that mounts it (collectors, forecast and compaction jobs) is scheduled onto one node; `ReadWriteMany` (NFS, CephFS, ... classes) lets them spread. `ReadWriteOncePod` allows a single pod: only for a fleet with one collector and no jobs."),
    ]
    claim_retention: Annotated[ClaimRetentionPolicy, Field(default_factory=ClaimRetentionPolicy, description="What happens to the data claim when the fleet is deleted.")]
    retention_days: Annotated[int | None, Field(default=None, ge=1, le=36500, description="Drop whole date partitions older than this many days (the compaction job applies it). Unset: keep everything.")]
    max_buffered_readings: Annotated[
        int,
        Field(default=100_000, ge=100, le=10_000_000, description="Readings a collector holds in memory while the store is full or unreachable (about 1 KiB each; the collector's memory limit grows with it). At the bound the MQTT collector stops taking messages (the broker keeps them, nothing is lost) and the CoAP/OPC UA collectors drop further readings, counted as lost with reason `storage_unavailable`."),
    ]
    compaction_schedule: Annotated[str, Field(default="15 * * * *", description="Cron schedule of the compaction CronJob (merges the closed hours' small files, applies `retentionDays`).")]

    @model_validator(mode="after")
    def _url_xor_size(self) -> StorageSpec:
        if self.url and self.size:
            raise ValueError("set either url or size, not both")
        if (self.endpoint or self.credentials or self.region) and not (self.url or "").startswith(("s3://", "s3a://")):
            raise ValueError("endpoint, region and credentials are for an s3:// url")
        return self

    @field_validator("compaction_schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5 or not all(re.match(_CRON_FIELD, f) for f in fields):
            raise ValueError(f"expected 5 cron fields like '15 * * * *', got {value!r}")
        return value


class ForecastingSpec(SpecModel):
    enabled: Annotated[bool, Field(default=True, description="Run the forecasting and visualization job on the collected data.")]
    schedule: Annotated[str, Field(default="0 * * * *", description="Cron schedule of the forecasting CronJob (five fields).")]
    horizon: Annotated[int, Field(default=60, ge=1, le=10080, description="Forecast horizon in steps of `frequency`.")]
    frequency: Annotated[str, Field(default="1min", pattern=r"^[0-9]*(s|min|h|D)$", description="Resampling frequency of the series (pandas offset alias: `s`, `min`, `h`, `D`, with an optional multiple).")]
    model: Annotated[
        Literal["auto", "harmonic", "mstl", "autoets", "seasonalnaive", "timegpt"],
        Field(default="auto", description="Forecasting model; `auto` is the fast harmonic regression, `timegpt` needs NIXTLA_API_KEY (in Kubernetes: `apiKey`)."),
    ]
    api_key: Annotated[SecretKeyRef | None, Field(default=None, description="Secret key of the Nixtla API key for `model: timegpt`; the forecast job gets it as NIXTLA_API_KEY.")]
    level: Annotated[int, Field(default=95, ge=50, le=99, description="Prediction-interval level in percent; readings outside it are flagged as anomalies.")]
    window_days: Annotated[float, Field(default=7.0, gt=0, le=365, description="Days of history read for training.")]
    parallelism: Annotated[int, Field(default=1, ge=1, le=1000, description="Shards of the series forecast in parallel: above 1 the CronJob's Job is an Indexed Job of this many pods, each forecasting the hash shard `$JOB_COMPLETION_INDEX/parallelism`; the last pod to finish merges them into one report.")]

    @field_validator("schedule")
    @classmethod
    def _schedule_parses(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5 or not all(re.match(_CRON_FIELD, f) for f in fields):
            raise ValueError(f"schedule {value!r} is not a five-field cron expression like '0 * * * *'")
        return value


class MonitoringSpec(SpecModel):
    enabled: Annotated[bool, Field(default=True, description="Serve Prometheus metrics from every component.")]
    port: Annotated[int, Field(default=9100, ge=1024, le=65535, description="Metrics port inside pods; in `sensorfleet run` every process picks a free port of its own (listed in the run's prometheus-targets.json).")]
    pod_monitor: Annotated[bool, Field(default=False, description="Create a PodMonitor (Prometheus Operator) for the fleet's pods.")]
    pushgateway_url: Annotated[str | None, Field(default=None, pattern=r"^https?://[^\s]+$", description="Prometheus Pushgateway the forecast job pushes its figures (MAE, MASE, anomalies, last success or failure) to, e.g. `http://pushgateway.monitoring:9091`.")]


class ReplaySpec(SpecModel):
    csv: Annotated[str, Field(min_length=1, description="Path or fsspec URL of a CSV with columns `timestamp, device, sensor, value`.")]
    speed: Annotated[float, Field(default=1.0, gt=0, le=100000, description="Playback speed: 2 plays twice as fast as recorded, 0.5 half as fast.")]
    loop: Annotated[bool, Field(default=True, description="Start again from the beginning at the end of the file.")]


class FleetSpec(SpecModel):
    seed: Annotated[int, Field(default=42, ge=0, le=2**31 - 1, description="Seed of the signal model: the same seed and time give the same reading.")]
    epoch: Annotated[datetime, Field(default=datetime(2026, 1, 1, tzinfo=timezone.utc), description="Origin of drift and of sequence numbers (UTC).")]
    sensors: Annotated[
        list[SensorSpec],
        Field(default_factory=lambda: [SensorSpec(**s) for s in DEFAULT_SENSORS], min_length=1, max_length=32, description="Sensors every device carries."),
    ]
    anomalies: Annotated[AnomalySpec, Field(default_factory=AnomalySpec, description="Injected anomalies; their ground truth is stored with each reading.")]
    realism: Annotated[RealismSpec, Field(default_factory=RealismSpec, description="Weather, weekly pattern, setpoint steps, ageing, calibration, quantization and site outages on top of the daily cycle.")]
    replay: Annotated[ReplaySpec | None, Field(default=None, description="Play back recorded data instead of the signal model.")]
    protocols: Annotated[ProtocolsSpec, Field(default_factory=ProtocolsSpec, description="Per-protocol device counts, intervals and replicas.")]
    broker: Annotated[BrokerSpec, Field(default_factory=BrokerSpec, description="The MQTT broker.")]
    collector: Annotated[CollectorSpec, Field(default_factory=CollectorSpec, description="Batching of collected readings into the dataset.")]
    storage: Annotated[StorageSpec, Field(default_factory=StorageSpec, description="Where the Parquet dataset lives.")]
    forecasting: Annotated[ForecastingSpec, Field(default_factory=ForecastingSpec, description="The forecasting and visualization job.")]
    monitoring: Annotated[MonitoringSpec, Field(default_factory=MonitoringSpec, description="Prometheus metrics.")]
    sources: Annotated[SourcesSpec, Field(default_factory=SourcesSpec, description="Third-party devices collected into the same dataset: MQTT brokers with a mapping of their JSON messages, OPC UA servers with a list of variables, CoAP resources to observe (docs/protocols.md, \"Third-party devices\").")]

    @field_validator("epoch")
    @classmethod
    def _epoch_is_utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _something_to_collect(self) -> FleetSpec:
        # A fleet of third-party sources alone is fine: no simulator runs then.
        if not self.enabled_protocols() and not self.sources.all():
            raise ValueError("protocols: at least one of mqtt, coap, opcua must be enabled, or spec.sources must list a third-party source")
        return self

    @model_validator(mode="after")
    def _shards_need_a_claim(self) -> FleetSpec:
        # The shard pods meet in one folder to merge (forecasting/shards.py); an object store
        # gives them no shared folder, so each would fail at start.
        if self.forecasting.parallelism > 1 and self.storage.url:
            raise ValueError(f"forecasting.parallelism {self.forecasting.parallelism} needs a claim (storage.size), not storage.url: "
                             "the shard pods merge in a folder they all mount")
        return self

    @model_validator(mode="after")
    def _sensor_names_unique(self) -> FleetSpec:
        names = [s.name for s in self.sensors]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"sensor names must be unique; repeated: {', '.join(duplicated)}")
        return self

    @model_validator(mode="after")
    def _sparkplug_not_replayed(self) -> FleetSpec:
        if self.replay is not None and self.protocols.mqtt.enabled and self.protocols.mqtt.payload_format == "sparkplugB":
            raise ValueError("protocols.mqtt.payloadFormat: sparkplugB does not play back recordings (replay); use json")
        if self.replay is not None and self.protocols.mqtt.enabled and self.protocols.mqtt.connection_per_device:
            raise ValueError("protocols.mqtt.connectionPerDevice: the devices of a recording are not the simulated devices (replay); use a shared connection")
        return self

    @model_validator(mode="after")
    def _controlled_sensors_exist(self) -> FleetSpec:
        known = {s.name for s in self.sensors}
        for field, names in (("controlledSensors", self.protocols.opcua.controlled_sensors or ()), ("limitAlarms", self.protocols.opcua.limit_alarms)):
            unknown = sorted(set(names) - known)
            if unknown:
                raise ValueError(f"protocols.opcua.{field}: unknown sensor(s) {', '.join(unknown)} (the fleet's sensors: {', '.join(s.name for s in self.sensors)})")
        return self

    def protocol(self, name: str) -> ProtocolSpec:
        return getattr(self.protocols, name)

    def enabled_protocols(self) -> list[str]:
        return [p for p in PROTOCOLS if self.protocol(p).enabled]


DEFAULT_SENSORS: list[dict[str, Any]] = [
    {"name": "temperature", "unit": "degC", "baseline": 21.0, "daily_amplitude": 4.0, "peak_hour": 15, "noise": 0.3, "drift_per_day": 0.01, "device_spread": 1.5, "resolution": 0.1, "min": -40, "max": 125},
    {"name": "humidity", "unit": "%RH", "baseline": 45.0, "daily_amplitude": 8.0, "peak_hour": 3, "noise": 1.0, "noise_coupling": -0.7, "device_spread": 4.0, "resolution": 0.5, "min": 0, "max": 100},
    {"name": "pressure", "unit": "hPa", "baseline": 1013.0, "daily_amplitude": 1.0, "peak_hour": 10, "noise": 0.2, "drift_per_day": -0.05, "device_spread": 2.0, "resolution": 0.1, "min": 870, "max": 1085},
]


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(pattern=_DNS_LABEL, max_length=40, description="Fleet name (DNS label, at most 40 characters so child names stay valid).")]
    namespace: str | None = None


class SensorFleet(BaseModel):
    """A `SensorFleet` manifest: the same document works with `kubectl apply -f` and `sensorfleet run`."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    api_version: Annotated[Literal["sensorfleet.io/v1alpha1"], Field(alias="apiVersion")] = "sensorfleet.io/v1alpha1"
    kind: Literal["SensorFleet"] = "SensorFleet"
    metadata: Metadata
    spec: FleetSpec = Field(default_factory=FleetSpec)
    status: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


class FleetSpecError(ValueError):
    """An invalid fleet: `errors` holds one line per problem, naming the field path."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: invalid SensorFleet\n" + "\n".join(f"  {e}" for e in errors))


def _format_error(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "(document)"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown field (check the spelling; fields are camelCase)"
    if err["type"] == "missing":
        return f"{path}: required field is missing"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return f"{path}: {message}, got {shown}"


def parse_fleet(document: Any, source: str = "<fleet>") -> SensorFleet:
    """Validate a decoded YAML/JSON document into a SensorFleet, raising FleetSpecError."""
    if not isinstance(document, dict):
        raise FleetSpecError(source, [f"(document): expected a SensorFleet mapping, got {type(document).__name__}"])
    try:
        return SensorFleet.model_validate(document)
    except ValidationError as exc:
        raise FleetSpecError(source, [_format_error(e) for e in exc.errors()]) from None


def load_fleet(path: str | Path) -> SensorFleet:
    """Read a fleet manifest from a YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FleetSpecError(str(path), [f"(file): cannot read: {exc.strerror}"]) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise FleetSpecError(str(path), [f"(yaml): {where}: {getattr(exc, 'problem', exc)}"]) from None
    return parse_fleet(document, str(path))


def dump_fleet(fleet: SensorFleet) -> str:
    """Serialise a fleet back to a manifest (camelCase, defaults filled in)."""
    data = fleet.model_dump(mode="json", by_alias=True, exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False)
