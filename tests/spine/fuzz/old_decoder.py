"""The MQTT collector's decoding before issue 12 (main at d4652c9: stdlib `json.loads`, only
JSONDecodeError caught), kept only to prove that the fuzzer finds what took collection down:
`fuzz_ingest.py` with SENSORFLEET_FUZZ_DECODER=old must crash (RecursionError) within a few
thousand cases. Nothing else uses it."""

from __future__ import annotations

import json
from typing import Any

from sensorfleet.reading import DecodedPayload, MalformedReading, readings_from_documents


def decode_json_payload_before_issue_12(payload: bytes) -> list[Any]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedReading("invalid_utf8", f"payload is not UTF-8 at byte {exc.start} (0x{payload[exc.start]:02x})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedReading("not_json", f"payload is not JSON: {exc.msg} at byte {exc.pos}") from None
    return doc if isinstance(doc, list) else [doc]


def old_mqtt_decoding(payload: bytes, _max_bytes: int) -> DecodedPayload:
    """What the old `_on_message` did with a payload: refusals it knew of are counted, anything
    else (RecursionError from deep nesting) escapes, as it escaped into paho's thread."""
    try:
        documents = decode_json_payload_before_issue_12(payload)
    except MalformedReading as exc:
        return DecodedPayload([], [exc])
    return readings_from_documents(documents)
