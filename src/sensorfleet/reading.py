"""The one reading schema that crosses every boundary: simulator -> wire -> collector -> dataset.

Wire format (MQTT payloads, CoAP JSON/CBOR representations, documented in README.md):

    {"fleet": "demo", "protocol": "mqtt", "device": "mqtt-00042", "sensor": "temperature",
     "value": 21.37, "unit": "degC", "ts": "2026-11-25T12:00:00.000000Z", "seq": 28771200,
     "quality": "good", "anomaly": null}

`value` is null when `quality` is `bad` (a dropout). `anomaly` is the simulator's ground truth
(`spike`, `stuck`, `dropout` or null), kept so forecasts can be scored against it. `seq` counts the
device's ticks since the fleet epoch: a gap in `seq` is a lost reading, a repeat a duplicate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

QUALITIES = ("good", "uncertain", "bad")
# The simulator's fault kinds (sensorfleet.signals.ANOMALY_NAMES checks it agrees).
ANOMALIES = ("spike", "stuck", "dropout", "drift", "level_shift", "noise_burst", "oscillation")
WIRE_FIELDS = ("fleet", "protocol", "device", "sensor", "value", "unit", "ts", "seq", "quality", "anomaly")
MAX_NAME = 128


@dataclass(frozen=True, slots=True)
class Reading:
    fleet: str
    protocol: str
    device: str
    sensor: str
    value: float | None
    unit: str
    ts: datetime  # source timestamp, UTC
    seq: int  # per device and sensor, ticks since the fleet epoch
    quality: str = "good"
    anomaly: str | None = None

    def to_wire(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ts"] = format_ts(self.ts)
        return doc

    def to_json(self) -> bytes:
        return json.dumps(self.to_wire(), separators=(",", ":")).encode()


class MalformedReading(ValueError):
    """A payload that is not a valid reading. `kind` is a short, bounded label for metrics."""

    def __init__(self, kind: str, detail: str):
        self.kind = kind
        super().__init__(detail)


def format_ts(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> datetime:
    ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    return ts.astimezone(timezone.utc)


def _name(doc: dict[str, Any], field: str) -> str:
    value = doc.get(field)
    if not isinstance(value, str) or not value:
        raise MalformedReading("bad_field", f"field '{field}': expected a non-empty string, got {value!r:.60}")
    if len(value) > MAX_NAME:
        raise MalformedReading("bad_field", f"field '{field}': longer than {MAX_NAME} characters")
    return value


def reading_from_wire(doc: Any) -> Reading:
    """Validate one decoded wire document into a Reading; errors name the offending field."""
    if not isinstance(doc, dict):
        raise MalformedReading("not_object", f"expected a JSON object, got {type(doc).__name__}")
    missing = [f for f in ("fleet", "protocol", "device", "sensor", "unit", "ts", "seq") if f not in doc]
    if missing:
        raise MalformedReading("missing_field", f"missing field(s): {', '.join(missing)}")
    value = doc.get("value")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MalformedReading("bad_value", f"field 'value': expected a number or null, got {value!r:.60}")
        value = float(value)
        if not math.isfinite(value):
            raise MalformedReading("bad_value", f"field 'value': must be finite, got {value}")
    seq = doc["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or seq >= 2**63:
        raise MalformedReading("bad_seq", f"field 'seq': expected a non-negative integer, got {seq!r:.60}")
    ts_text = doc["ts"]
    try:
        ts = parse_ts(ts_text) if isinstance(ts_text, str) else None
    except ValueError:
        ts = None
    if ts is None:
        raise MalformedReading("bad_ts", f"field 'ts': expected an ISO-8601 UTC timestamp, got {ts_text!r:.60}")
    quality = doc.get("quality", "good")
    if quality not in QUALITIES:
        raise MalformedReading("bad_field", f"field 'quality': expected one of {QUALITIES}, got {quality!r:.60}")
    anomaly = doc.get("anomaly")
    if anomaly is not None and anomaly not in ANOMALIES:
        raise MalformedReading("bad_field", f"field 'anomaly': expected one of {ANOMALIES} or null, got {anomaly!r:.60}")
    if value is None and quality == "good":
        raise MalformedReading("bad_value", "field 'value': null is only allowed with quality 'bad' or 'uncertain'")
    return Reading(
        fleet=_name(doc, "fleet"),
        protocol=_name(doc, "protocol"),
        device=_name(doc, "device"),
        sensor=_name(doc, "sensor"),
        value=value,
        unit=_name(doc, "unit"),
        ts=ts,
        seq=seq,
        quality=quality,
        anomaly=anomaly,
    )


def decode_json_payload(payload: bytes) -> list[Any]:
    """Decode a JSON payload holding one reading document or an array of them."""
    try:
        text = payload.decode("utf-8")  # explicitly: json.loads(bytes) would guess UTF-16/32
    except UnicodeDecodeError as exc:
        raise MalformedReading("not_utf8", f"payload is not UTF-8 at byte {exc.start} (0x{payload[exc.start]:02x})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedReading("not_json", f"payload is not JSON: {exc.msg} at byte {exc.pos}") from None
    return doc if isinstance(doc, list) else [doc]
