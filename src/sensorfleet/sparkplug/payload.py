"""Sparkplug B messages for SensorFleet readings, built and read with the generated protobuf code.

How a Reading travels (docs/protocols.md, "Sparkplug B"):
  topic      spBv1.0/<group = fleet>/<NBIRTH|NDATA|NDEATH|DBIRTH|DDATA|DDEATH|NCMD>/<edge node>[/<device>]
  metric     one per sensor: name (births only), alias, datatype Double, value or is_null,
             timestamp = the reading's source time in ms; properties `engUnit` (births),
             `Quality` (OPC quality code: 192 good, 64 uncertain, 0 bad; sent when not good) and
             `anomaly` (the simulator's ground truth, when set)
  seq        the Reading's seq (ticks since the fleet epoch) is the device metric `sensorfleet/seq`
             (UInt64); the payload's own `seq` is the edge node's 0..255 message counter
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from sensorfleet.reading import MalformedReading
from sensorfleet.sparkplug import sparkplug_b_pb2 as pb

NAMESPACE = "spBv1.0"
MESSAGE_TYPES = ("NBIRTH", "NDATA", "NDEATH", "NCMD", "DBIRTH", "DDATA", "DDEATH", "DCMD")
NODE_TYPES = ("NBIRTH", "NDATA", "NDEATH", "NCMD")
SEQ_METRIC = "sensorfleet/seq"  # the Reading's seq, one per device message
BDSEQ_METRIC = "bdSeq"
REBIRTH_METRIC = "Node Control/Rebirth"
UNIT_PROPERTY = "engUnit"
QUALITY_PROPERTY = "Quality"
ANOMALY_PROPERTY = "anomaly"
# OPC quality codes, as Sparkplug hosts (Ignition) read the `Quality` property.
QUALITY_CODES = {"good": 192, "uncertain": 64, "bad": 0}
QUALITY_OF_CODE = {code: name for name, code in QUALITY_CODES.items()}

DOUBLE, UINT64, INT32, BOOLEAN, STRING = pb.Double, pb.UInt64, pb.Int32, pb.Boolean, pb.String
Payload = pb.Payload


@dataclass(frozen=True, slots=True)
class Topic:
    group: str
    message_type: str
    edge_node: str
    device: str | None = None

    def __str__(self) -> str:
        tail = f"/{self.device}" if self.device is not None else ""
        return f"{NAMESPACE}/{self.group}/{self.message_type}/{self.edge_node}{tail}"


def parse_topic(topic: str) -> Topic:
    """A Sparkplug B topic; STATE topics (`spBv1.0/STATE/<host>`) are not messages of a node."""
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
        raise MalformedReading("bad_topic", f"topic {topic!r:.120}: expected {NAMESPACE}/<group>/<type>/<edge node>[/<device>]")
    if parts[2] not in MESSAGE_TYPES:
        raise MalformedReading("bad_topic", f"topic {topic!r:.120}: level 3 must be one of {', '.join(MESSAGE_TYPES)}, got {parts[2]!r:.40}")
    is_node = parts[2] in NODE_TYPES
    if is_node != (len(parts) == 4):
        raise MalformedReading("bad_topic", f"topic {topic!r:.120}: {parts[2]} {'has no' if is_node else 'needs a'} device level")
    return Topic(parts[1], parts[2], parts[3], parts[4] if len(parts) == 5 else None)


def state_topic(host_id: str) -> str:
    return f"{NAMESPACE}/STATE/{host_id}"


def decode(payload: bytes, topic: str = "") -> pb.Payload:
    message = pb.Payload()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise MalformedReading("not_sparkplug", f"topic {topic}: payload is not a Sparkplug B protobuf ({exc}; {len(payload)} bytes, first 0x{payload[:1].hex() or '-'})") from None
    return message


# --- building -----------------------------------------------------------------------------
def property_set(items: dict[str, str | int]) -> pb.Payload.PropertySet:
    props = pb.Payload.PropertySet()
    for key, value in items.items():
        props.keys.append(key)
        pv = props.values.add()
        if isinstance(value, str):
            pv.type, pv.string_value = STRING, value
        else:
            pv.type, pv.int_value = INT32, value
    return props


def properties_of(metric: pb.Payload.Metric) -> dict[str, object]:
    """A metric's properties as a dict (string and integer values; others as None)."""
    out: dict[str, object] = {}
    props = metric.properties
    for key, pv in zip(props.keys, props.values):
        field = pv.WhichOneof("value")
        out[key] = None if pv.is_null or field is None else getattr(pv, field)
    return out


def node_birth(bdseq: int, timestamp_ms: int) -> bytes:
    """NBIRTH: seq 0, the node's bdSeq (matching its Last Will) and its control metric."""
    message = pb.Payload(timestamp=timestamp_ms, seq=0)
    message.metrics.add(name=BDSEQ_METRIC, timestamp=timestamp_ms, datatype=UINT64, long_value=bdseq)
    message.metrics.add(name=REBIRTH_METRIC, timestamp=timestamp_ms, datatype=BOOLEAN, boolean_value=False)
    return message.SerializeToString()


def node_death(bdseq: int, timestamp_ms: int | None = None) -> bytes:
    """NDEATH (the Last Will): no seq, only bdSeq, so a host can tell which session it ends."""
    message = pb.Payload() if timestamp_ms is None else pb.Payload(timestamp=timestamp_ms)
    message.metrics.add(name=BDSEQ_METRIC, datatype=UINT64, long_value=bdseq)
    return message.SerializeToString()


def rebirth_request(timestamp_ms: int) -> bytes:
    """NCMD asking an edge node for new births (what a host sends after a gap or on start)."""
    message = pb.Payload(timestamp=timestamp_ms)
    message.metrics.add(name=REBIRTH_METRIC, timestamp=timestamp_ms, datatype=BOOLEAN, boolean_value=True)
    return message.SerializeToString()


def wants_rebirth(message: pb.Payload, aliases: dict[int, str] | None = None) -> bool:
    for metric in message.metrics:
        name = metric.name or (aliases or {}).get(metric.alias, "")
        if name == REBIRTH_METRIC and metric.WhichOneof("value") == "boolean_value" and metric.boolean_value:
            return True
    return False
