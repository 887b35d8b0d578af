"""The one reading schema that crosses every boundary: simulator -> wire -> collector -> dataset.

Wire format (MQTT payloads, CoAP JSON/CBOR representations, documented in README.md):

    {"fleet": "demo", "protocol": "mqtt", "device": "mqtt-00042", "sensor": "temperature",
     "value": 21.37, "unit": "degC", "ts": "2026-11-25T12:00:00.000000Z", "seq": 28771200,
     "quality": "good", "anomaly": null}

`value` is null when `quality` is `bad` (a dropout). `anomaly` is the simulator's ground truth
(`spike`, `stuck`, `dropout` or null), kept so forecasts can be scored against it. `seq` counts the
device's ticks since the fleet epoch: a gap in `seq` is a lost reading, a repeat a duplicate.
Readings of third-party devices (sensorfleet.sources) have no sequence: `seq` is None there (null
in the dataset), and loss accounting does not apply to them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import msgspec

QUALITIES = ("good", "uncertain", "bad")
# The simulator's fault kinds (sensorfleet.signals.ANOMALY_NAMES checks it agrees).
ANOMALIES = ("spike", "stuck", "dropout", "drift", "level_shift", "noise_burst", "oscillation")
WIRE_FIELDS = ("fleet", "protocol", "device", "sensor", "value", "unit", "ts", "seq", "quality", "anomaly")
MAX_NAME = 128
# A payload larger than this is refused unread (`too_large`); collectors pass a limit derived
# from the spec (a gateway batch may hold up to 100,000 readings).
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20
# Every reason a payload or document may be refused for: the `reason` label of
# sensorfleet_payloads_malformed_total, so it must stay a small fixed set.
MALFORMED_REASONS = (
    "too_large", "too_deep", "invalid_utf8", "not_json", "not_cbor", "wrong_type", "non_finite", "out_of_range",
    "duplicate_key", "missing_field", "bad_field", "bad_value", "bad_ts", "bad_seq", "empty_batch", "foreign_fleet",
    "bad_content_format", "unknown_handle",
    # Sparkplug B (sensorfleet.sparkplug.host)
    "not_sparkplug", "bad_topic", "bad_birth", "unknown_device", "unknown_alias",
)


@dataclass(frozen=True, slots=True)
class Reading:
    fleet: str
    protocol: str
    device: str
    sensor: str
    value: float | None
    unit: str
    ts: datetime  # source timestamp, UTC
    seq: int | None  # per device and sensor, ticks since the fleet epoch; None: a third-party device (no sequence)
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


# --- decoding: bytes -> readings, never an exception ---------------------------------------------
# The schema is declared once, as a msgspec Struct: msgspec decodes and validates in one pass in C,
# with a bounded recursion depth (a deeper payload raises RecursionError, caught below as
# `too_deep`), so no byte sequence can take a collector's thread down.

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]


class WireReading(msgspec.Struct, frozen=True):
    """One wire document as it must arrive; unknown fields are ignored (forward compatible)."""

    fleet: _Name
    protocol: _Name
    device: _Name
    sensor: _Name
    unit: _Name
    ts: Annotated[datetime, msgspec.Meta(tz=True)]
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    value: float | None = None
    quality: Literal[QUALITIES] = "good"  # type: ignore[valid-type]  # Literal of the tuple's members
    anomaly: Literal[ANOMALIES] | None = None  # type: ignore[valid-type]


@dataclass(slots=True)
class DecodedPayload:
    """What one payload held: the valid readings and one MalformedReading per refused document
    (or one for the whole payload when it is not even a well-formed container)."""

    readings: list[Reading]
    rejected: list[MalformedReading]

    @property
    def documents(self) -> int:
        return len(self.readings) + len(self.rejected)


class _FullWireReading(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """WireReading with every field present and no other: what the simulator sends. A document
    that decodes into this decodes into WireReading with the same values, once `ts` is checked
    (`_canonical_times`). gc=False: it holds no containers, so it takes no part in a cycle."""

    fleet: _Name
    protocol: _Name
    device: _Name
    sensor: _Name
    unit: _Name
    ts: str  # parsed by Arrow, 6x cheaper than a datetime each
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    value: float | None
    quality: Literal[QUALITIES]  # type: ignore[valid-type]
    anomaly: Literal[ANOMALIES] | None  # type: ignore[valid-type]


@dataclass(slots=True)
class ReadingColumns:
    """The readings of one payload, column by column (`decode_json_columns`): a gateway message
    of hundreds of readings costs a few list comprehensions instead of one Reading each."""

    fleet: list[str]
    protocol: list[str]
    device: list[str]
    sensor: list[str]
    value: list[float | None]
    unit: list[str]
    ts: list[str]  # `format_ts`'s form, YYYY-MM-DDTHH:MM:SS.ffffffZ: Arrow parses and checks it
    seq: list[int]
    quality: list[str]
    anomaly: list[str | None]

    def __len__(self) -> int:
        return len(self.seq)


_payload_decoder = msgspec.json.Decoder(WireReading | list[WireReading])
_columns_decoder = msgspec.json.Decoder(list[_FullWireReading])
_document_decoder = msgspec.json.Decoder(WireReading)
_array_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_KEY_PATTERNS = tuple(f'"{name}"'.encode() for name in WIRE_FIELDS)
_BYTE_POSITION = re.compile(r"\(byte (\d+)\)")
_NON_FINITE_LITERALS = (b"NaN", b"Infinity", b"-Infinity")


def decode_json_payload(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> DecodedPayload:
    """Decode a JSON payload holding one reading document or an array of them. Never raises:
    every refused document is returned with a reason from MALFORMED_REASONS and a detail naming
    the field or byte."""
    if len(payload) > max_bytes:
        return _whole("too_large", f"payload of {len(payload):,} bytes is larger than the limit of {max_bytes:,}")
    try:
        decoded = _payload_decoder.decode(payload)
    except msgspec.ValidationError:
        return _document_by_document(payload)  # one bad document must not cost its neighbours
    except msgspec.DecodeError as exc:
        return _whole(*_syntax_error(payload, exc))
    except RecursionError:
        return _whole("too_deep", "payload nests deeper than the decoder allows")
    documents = decoded if isinstance(decoded, list) else [decoded]
    if not documents:
        return _whole("empty_batch", "payload is an empty array: no reading in it")
    if _may_repeat_a_key(payload, len(documents)):
        return _document_by_document(payload)
    out = DecodedPayload([], [])
    for index, doc in enumerate(documents):
        _add(out, doc, index if isinstance(decoded, list) else None)
    return out


def decode_json_columns(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> ReadingColumns | None:
    """A JSON array of complete, valid wire documents as columns; None when anything in it asks
    for a closer look (a refused document, a missing, unknown or repeated field, an empty or
    oversized payload), and then `decode_json_payload` gives each document its verdict. Where
    this returns columns, `decode_json_payload` returns the same readings in the same order."""
    if len(payload) > max_bytes or payload[:1] != b"[":
        return None
    try:
        documents = _columns_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    n = len(documents)
    anomaly = [d.anomaly for d in documents]
    # A repeated field: every document has its 10 names (20 quotes) and 7 string values, 8 with an
    # anomaly (2 quotes each); any further name, or a quote escaped inside a string, adds quotes.
    # One pass over the bytes instead of one per field name (_may_repeat_a_key).
    if not n or payload.count(b'"') != 34 * n + 2 * (n - anomaly.count(None)):
        return None
    value = [d.value for d in documents]
    quality = [d.quality for d in documents]
    if value.count(None):
        if any(v is None and q == "good" for v, q in zip(value, quality)):
            return None  # bad_value
        finite = [v for v in value if v is not None]
    else:
        finite = value
    # An infinite value (1e999 decodes to inf) makes the sum non-finite; so does an overflow of
    # finite ones, which only sends the payload down the exact path.
    if not math.isfinite(sum(finite)):
        return None
    ts = [d.ts for d in documents]
    if not _canonical_times(ts):
        return None
    return ReadingColumns(
        [d.fleet for d in documents], [d.protocol for d in documents], [d.device for d in documents], [d.sensor for d in documents],
        value, [d.unit for d in documents], ts, [d.seq for d in documents], quality, anomaly,
    )


def _canonical_times(ts: list[str]) -> bool:
    """Every timestamp in `format_ts`'s form (or something Arrow's cast refuses). Of these,
    Arrow's ISO 8601 cast accepts exactly the real times msgspec's RFC 3339 parser accepts
    (no Feb 30, no 24:00, no leap second: tests/spine/test_library_guards.py), at the same
    instant; but for year 0, refused here. Any other form takes the exact path."""
    if set(map(len, ts)) != {27} or min(ts) < "0001":
        return False
    joined, n = "".join(ts), len(ts)
    return all(joined[at::27] == char * n for at, char in _TS_SEPARATORS)


_TS_SEPARATORS = ((4, "-"), (7, "-"), (10, "T"), (13, ":"), (16, ":"), (19, "."), (26, "Z"))


def readings_from_documents(documents: Any) -> DecodedPayload:
    """Validate already-decoded documents (CBOR, tests) against the same schema."""
    documents = documents if isinstance(documents, list) else [documents]
    if not documents:
        return _whole("empty_batch", "payload is an empty array: no reading in it")
    out = DecodedPayload([], [])
    for index, doc in enumerate(documents):
        try:
            wire = msgspec.convert(doc, WireReading)
        except msgspec.ValidationError as exc:
            out.rejected.append(_invalid(exc, index if len(documents) > 1 else None))
            continue
        except RecursionError:
            out.rejected.append(MalformedReading("too_deep", "document nests deeper than the validator allows"))
            continue
        _add(out, wire, index if len(documents) > 1 else None)
    return out


def reading_from_wire(doc: Any) -> Reading:
    """Validate one decoded wire document into a Reading; MalformedReading names the field."""
    if not isinstance(doc, dict):
        raise MalformedReading("wrong_type", f"expected a JSON object, got {type(doc).__name__}")
    result = readings_from_documents([doc])
    if result.rejected:
        raise result.rejected[0]
    return result.readings[0]


def _add(out: DecodedPayload, wire: WireReading, index: int | None) -> None:
    where = "" if index is None else f"document {index}: "
    value = wire.value
    if value is not None and not math.isfinite(value):
        out.rejected.append(MalformedReading("non_finite", f"{where}field 'value': must be finite, got {value}"))
    elif value is None and wire.quality == "good":
        out.rejected.append(MalformedReading("bad_value", f"{where}field 'value': null is only allowed with quality 'bad' or 'uncertain'"))
    else:
        ts = wire.ts if wire.ts.tzinfo is timezone.utc else wire.ts.astimezone(timezone.utc)
        out.readings.append(Reading(wire.fleet, wire.protocol, wire.device, wire.sensor, value, wire.unit, ts, wire.seq, wire.quality, wire.anomaly))


def _document_by_document(payload: bytes) -> DecodedPayload:
    """The slow path, taken only when something is wrong: each document on its own."""
    if payload.lstrip()[:1] == b"[":
        try:
            raws = _array_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            return _whole(*_syntax_error(payload, exc))
        except RecursionError:
            return _whole("too_deep", "payload nests deeper than the decoder allows")
        if not raws:
            return _whole("empty_batch", "payload is an empty array: no reading in it")
        documents: list[tuple[bytes, int | None]] = [(bytes(raw), i) for i, raw in enumerate(raws)]
    else:
        documents = [(payload, None)]
    out = DecodedPayload([], [])
    for document, index in documents:
        try:
            wire = _document_decoder.decode(document)
        except msgspec.ValidationError as exc:
            out.rejected.append(_invalid(exc, index))
            continue
        except msgspec.DecodeError as exc:
            out.rejected.append(MalformedReading(*_syntax_error(document, exc)))
            continue
        except RecursionError:
            out.rejected.append(MalformedReading("too_deep", "document nests deeper than the decoder allows"))
            continue
        duplicate = _repeated_key(document)
        if duplicate:
            where = "" if index is None else f"document {index}: "
            out.rejected.append(MalformedReading("duplicate_key", f"{where}field '{duplicate}' appears more than once"))
            continue
        _add(out, wire, index)
    return out


def _may_repeat_a_key(payload: bytes, documents: int) -> bool:
    """Cheap pre-check: a payload whose field names each occur once per document repeats none.
    A name also used as a string value only sends the payload down the exact (slow) path."""
    return any(payload.count(key) > documents for key in _KEY_PATTERNS)


def _repeated_key(document: bytes) -> str | None:
    """The first top-level field name of the document that occurs twice (msgspec keeps the last)."""
    if not _may_repeat_a_key(document, 1):
        return None
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen and not repeated:
                repeated.append(key)
            seen.add(key)
        return dict(items)

    try:
        # Safe: msgspec has just decoded this document, so it is valid JSON of bounded depth.
        json.loads(document, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None
    return repeated[0] if repeated else None


def _whole(kind: str, detail: str) -> DecodedPayload:
    return DecodedPayload([], [MalformedReading(kind, detail)])


def _syntax_error(payload: bytes, exc: msgspec.DecodeError) -> tuple[str, str]:
    try:
        payload.decode("utf-8")  # explicit, so the message names the byte
    except UnicodeDecodeError as bad:
        return "invalid_utf8", f"payload is not UTF-8 at byte {bad.start} (0x{payload[bad.start]:02x})"
    position = _BYTE_POSITION.search(str(exc))
    if position and payload[int(position.group(1)) :].startswith(_NON_FINITE_LITERALS):
        return "non_finite", f"payload holds a non-finite number (NaN or Infinity, not JSON) at byte {position.group(1)}"
    return "not_json", f"payload is not JSON: {exc}"


def _invalid(exc: msgspec.ValidationError, index: int | None) -> MalformedReading:
    """Name the reason from msgspec's message (its wording is held by tests/spine/test_library_guards.py);
    an unforeseen wording is still refused, as `wrong_type`."""
    message = str(exc)
    where = "" if index is None else f"document {index}: "
    detail = where + message.replace("`$.", "field `").replace("`$`", "the document")
    if message.startswith("Object missing required field"):
        kind = "missing_field"
    elif "- at `$.ts`" in message:
        kind = "bad_ts"
    elif message.startswith("Invalid enum value") or "of length" in message:
        kind = "bad_field"
    elif message.startswith("Number out of range") or " >= " in message or " <= " in message:
        kind = "out_of_range"
    else:
        kind = "wrong_type"
    return MalformedReading(kind, detail)
