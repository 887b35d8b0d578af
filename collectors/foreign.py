"""Payloads of third-party devices -> Readings, per the mapping of a source (sensorfleet.sources).
Pure: bytes, topic and time in; readings and refusals (with a MALFORMED_REASONS label) out. Never
raises on what a device sends. The protocol adapters are foreign_mqtt.py, foreign_opcua.py and
foreign_coap.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from sensorfleet.mapping import MappingError, TopicPattern, fill, number, resolve, timestamp
from sensorfleet.reading import DEFAULT_MAX_PAYLOAD_BYTES, MAX_NAME, DecodedPayload, MalformedReading, Reading
from sensorfleet.sources import CoapResource, MqttMapping, MqttSource

_decoder = msgspec.json.Decoder()


def decode_json(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Any:
    """Any JSON document, bounded in size and depth; MappingError names what is wrong."""
    if len(payload) > max_bytes:
        raise MappingError("too_large", f"payload of {len(payload):,} bytes is larger than the limit of {max_bytes:,}")
    try:
        return _decoder.decode(payload)
    except RecursionError:
        raise MappingError("too_deep", "payload nests deeper than the decoder allows") from None
    except msgspec.DecodeError as exc:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise MappingError("invalid_utf8", f"payload is not UTF-8 at byte {bad.start}") from None
        raise MappingError("not_json", f"payload is not JSON: {exc}") from None


def value_and_time(document: Any, value_pointer: str, ts_pointer: str | None, ts_format: str, received_at: datetime) -> tuple[float | None, datetime]:
    """The value (None for a JSON null: the device says it has none) and the source timestamp."""
    raw = resolve(document, value_pointer)
    value = None if raw is None else number(raw, f"value at {value_pointer or '(document)'}")
    ts = received_at if ts_pointer is None else timestamp(resolve(document, ts_pointer), ts_format, f"timestamp at {ts_pointer or '(document)'}")
    return value, ts


def third_party_reading(fleet: str, protocol: str, device: str, sensor: str, value: float | None, unit: str, ts: datetime) -> Reading:
    """A reading without a sequence number; a null value is stored with quality bad."""
    return Reading(fleet, protocol, device, sensor, value, unit, ts, None, "good" if value is not None else "bad", None)


class MqttMapper:
    """The mappings of one MQTT source: (topic, payload) -> readings of every matching mapping."""

    def __init__(self, fleet: str, source: MqttSource, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES):
        self.fleet = fleet
        self.max_bytes = max_bytes
        self.mappings: list[tuple[TopicPattern, MqttMapping]] = [(TopicPattern.parse(m.topic), m) for m in source.mappings]

    def subscriptions(self) -> list[str]:
        """The topic filters to subscribe to, each once."""
        return list(dict.fromkeys(pattern.subscription for pattern, _ in self.mappings))

    def map(self, topic: str, payload: bytes, received_at: datetime) -> DecodedPayload:
        out = DecodedPayload([], [])
        matches = [(m, names) for pattern, m in self.mappings if (names := pattern.match(topic)) is not None]
        if not matches:
            # Overlapping subscriptions or a broker that routes more than asked: say so, count it.
            out.rejected.append(MalformedReading("bad_topic", f"no mapping's topic pattern matches {topic!r}"))
            return out
        try:
            document = decode_json(payload, self.max_bytes)
        except MappingError as exc:
            out.rejected.append(MalformedReading(exc.kind, str(exc)))
            return out
        for mapping, names in matches:
            try:
                device, sensor = fill(mapping.device, names), fill(mapping.sensor, names)
                for what, name in (("device", device), ("sensor", sensor)):
                    if not name or len(name) > MAX_NAME:
                        raise MappingError("bad_topic", f"{what} {name!r} from topic {topic!r} must have 1 to {MAX_NAME} characters")
                value, ts = value_and_time(document, mapping.value, mapping.timestamp, mapping.timestamp_format, received_at)
            except MappingError as exc:
                out.rejected.append(MalformedReading(exc.kind, f"mapping {mapping.topic!r}: {exc}"))
                continue
            out.readings.append(third_party_reading(self.fleet, "mqtt", device, sensor, value, mapping.unit, ts))
        return out


def coap_reading(fleet: str, resource: CoapResource, payload: bytes, received_at: datetime) -> Reading | MalformedReading:
    """One CoAP representation of a third-party resource -> a reading, or why not."""
    try:
        if resource.format == "number":
            if len(payload) > 64:
                raise MappingError("too_large", f"a plain number of {len(payload)} bytes")
            try:
                text = payload.decode("ascii").strip()
            except UnicodeDecodeError:
                raise MappingError("invalid_utf8", "a plain-number payload must be ASCII text") from None
            value, ts = number(text, "payload"), received_at
        else:
            value, ts = value_and_time(decode_json(payload), resource.value, resource.timestamp, resource.timestamp_format, received_at)
    except MappingError as exc:
        return MalformedReading(exc.kind, f"{resource.uri}: {exc}")
    return third_party_reading(fleet, "coap", resource.device, resource.sensor, value, resource.unit, ts)
