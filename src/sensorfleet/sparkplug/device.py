"""Device messages of an edge node (DBIRTH, DDATA, DDEATH) for SensorFleet's sensors.

Aliases are unique within the edge node (Sparkplug 3.0): device slot `i` (its place in the node)
gets `(i + 1) << 8 | (sensor + 1)` for its sensors and `(i + 1) << 8` for `sensorfleet/seq`;
the node's own metrics carry no alias. So a node holds up to 255 sensors per device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sensorfleet.sparkplug.payload import (
    ANOMALY_PROPERTY, DOUBLE, QUALITY_CODES, QUALITY_PROPERTY, SEQ_METRIC, UINT64, UNIT_PROPERTY, Payload, property_set,
)

MAX_SENSORS = 255


@dataclass(frozen=True, slots=True)
class SensorValue:
    value: float | None  # None: no value (quality bad)
    quality: str = "good"
    anomaly: str | None = None


def seq_alias(slot: int) -> int:
    return (slot + 1) << 8


def sensor_alias(slot: int, sensor: int) -> int:
    return (slot + 1) << 8 | (sensor + 1)


class DeviceMessages:
    """Builds one device's messages; `sensors` is [(name, unit)] in a fixed order."""

    def __init__(self, slot: int, sensors: Sequence[tuple[str, str]]):
        if len(sensors) > MAX_SENSORS:
            raise ValueError(f"spec.sensors: Sparkplug B aliases allow at most {MAX_SENSORS} sensors per device, got {len(sensors)}")
        self.sensors = list(sensors)
        self.seq_alias = seq_alias(slot)
        self.aliases = [sensor_alias(slot, s) for s in range(len(sensors))]

    def _values(self, message: Payload, values: Sequence[SensorValue], timestamp_ms: int, birth: bool) -> None:
        for s, v in enumerate(values):
            metric = message.metrics.add(alias=self.aliases[s], timestamp=timestamp_ms)
            props: dict[str, str | int] = {}
            if birth:
                metric.name, metric.datatype = self.sensors[s][0], DOUBLE
                props[UNIT_PROPERTY] = self.sensors[s][1]
            if v.value is None:
                metric.is_null = True
            else:
                metric.double_value = v.value
            if v.quality != "good" or birth:
                props[QUALITY_PROPERTY] = QUALITY_CODES[v.quality]
            if v.anomaly is not None:
                props[ANOMALY_PROPERTY] = v.anomaly
            if props:
                metric.properties.CopyFrom(property_set(props))

    def _seq(self, message: Payload, tick: int, timestamp_ms: int, birth: bool) -> None:
        metric = message.metrics.add(alias=self.seq_alias, timestamp=timestamp_ms, long_value=tick)
        if birth:
            metric.name, metric.datatype = SEQ_METRIC, UINT64

    def birth(self, seq: int, tick: int, timestamp_ms: int, values: Sequence[SensorValue]) -> bytes:
        """DBIRTH: every metric with name, alias, datatype, unit and its current value."""
        message = Payload(timestamp=timestamp_ms, seq=seq)
        self._seq(message, tick, timestamp_ms, birth=True)
        self._values(message, values, timestamp_ms, birth=True)
        return message.SerializeToString()

    def data(self, seq: int, tick: int, timestamp_ms: int, values: Sequence[SensorValue]) -> bytes:
        """DDATA: metrics by alias only (no name, no datatype, as the specification asks)."""
        message = Payload(timestamp=timestamp_ms, seq=seq)
        self._seq(message, tick, timestamp_ms, birth=False)
        self._values(message, values, timestamp_ms, birth=False)
        return message.SerializeToString()

    def death(self, seq: int, tick: int, timestamp_ms: int, values: Sequence[SensorValue]) -> bytes:
        """DDEATH: the device goes silent at `tick` (every sensor dropped out, e.g. its site's
        outage); it carries that tick's (null) values, so the dataset records the dropout."""
        message = Payload(timestamp=timestamp_ms, seq=seq)
        self._seq(message, tick, timestamp_ms, birth=False)
        self._values(message, values, timestamp_ms, birth=False)
        return message.SerializeToString()
