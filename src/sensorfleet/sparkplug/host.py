"""A Sparkplug B host application's view of the edge nodes, as a pure state machine: messages in,
reading documents (the wire schema of sensorfleet.reading) and decisions out. The MQTT collector
feeds it and hands the documents to its CollectorSink.

What it keeps per edge node: the bdSeq of the session (an NDEATH with another bdSeq is a stale
Last Will and changes nothing), the expected `seq` (a gap asks for a rebirth, at most once per
REBIRTH_HOLDOFF seconds per node) and, per device, the alias table of its last DBIRTH. Alias
tables outlive an NBIRTH: messages sent before a reconnect still arrive after the new NBIRTH and
carry the same aliases (SensorFleet's are stable; a node that changes them sends DBIRTHs first).

Loss accounting: a device's readings carry its `sensorfleet/seq` metric as the Reading's seq. A
DDEATH marks the device silent from that tick; the DBIRTH that brings it back says where it
resumed (`resumed`: the collector moves the series on without counting the silent ticks lost).
A rebirth is a birth like any other: its values are new ticks, never repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache

from sensorfleet.reading import MalformedReading, format_ts
from sensorfleet.sparkplug.payload import (
    ANOMALY_PROPERTY, BDSEQ_METRIC, QUALITY_OF_CODE, QUALITY_PROPERTY, SEQ_METRIC, UNIT_PROPERTY, Payload, Topic, decode, parse_topic, properties_of,
)

REBIRTH_HOLDOFF = 30.0  # seconds between two rebirth requests to one node


class UnknownDevice(MalformedReading):
    """Data of a device without a DBIRTH; `rebirth` names the node to ask for one (None: held off)."""

    def __init__(self, detail: str, rebirth: str | None):
        super().__init__("unknown_device", detail)
        self.rebirth = rebirth


@dataclass
class _Device:
    sensors: dict[int, tuple[str, str]] = field(default_factory=dict)  # alias -> (name, unit)
    seq_alias: int | None = None
    silent_since: int | None = None  # tick of its DDEATH


@dataclass
class _Node:
    bdseq: int | None = None
    next_seq: int | None = None
    online: bool = False
    devices: dict[str, _Device] = field(default_factory=dict)
    rebirth_asked: float = float("-inf")


@dataclass
class Outcome:
    documents: list[dict] = field(default_factory=list)
    resumed: list[tuple[str, str, int]] = field(default_factory=list)  # (device, sensor, last silent tick)
    rebirth: str | None = None  # edge node to send an NCMD rebirth request
    events: list[str] = field(default_factory=list)  # nbirth, ndeath, dbirth, ddeath, seq_gap, stale_ndeath, no_change, ...
    # Metrics of a readable message that cannot become a reading (a timestamp no date can hold,
    # an alias the device's DBIRTH did not declare): refused one by one, the others still count.
    rejected: list[MalformedReading] = field(default_factory=list)


@lru_cache(maxsize=4096)
def _ts(ms: int) -> str:
    """The wire timestamp of a Sparkplug one (ms); cached: a message's metrics share theirs. A
    uint64 beyond year 9999 raises MalformedReading (`bad_ts`), not an error that would end the
    collector's writer thread."""
    try:
        return format_ts(datetime.fromtimestamp(ms / 1000, tz=timezone.utc))
    except (ValueError, OverflowError, OSError):
        raise MalformedReading("bad_ts", f"timestamp {ms} ms is not a date (beyond year 9999)") from None


class HostState:
    def __init__(self, group: str, protocol: str = "mqtt"):
        self.group = group
        self.protocol = protocol
        self.nodes: dict[str, _Node] = {}

    def handle(self, topic_text: str, payload: bytes, now: float, *, replay: bool = False) -> Outcome:
        """Raises MalformedReading for a message that cannot be read at all (UnknownDevice for
        data before its device's DBIRTH). `replay`: a message held back until that DBIRTH came,
        read now (its place in the node's `seq` has passed)."""
        topic = parse_topic(topic_text)
        if topic.group != self.group:
            raise MalformedReading("foreign_fleet", f"topic {topic_text}: group {topic.group!r} is not fleet {self.group!r}")
        message = decode(payload, topic_text)
        node = self.nodes.setdefault(topic.edge_node, _Node())
        out = Outcome()
        kind = topic.message_type
        if kind == "NDEATH":
            self._node_death(node, message, out)
            return out
        if not replay:
            self._check_seq(topic, node, message, out, now)
        if kind == "NBIRTH":
            node.bdseq = _metric_long(message, BDSEQ_METRIC)
            node.online = True
            out.events.append("nbirth")
        elif kind == "DBIRTH":
            self._device_birth(topic, node, message, out)
        elif kind in ("DDATA", "DDEATH"):
            self._device_data(topic, node, message, out, now)
        else:
            out.events.append(kind.lower())  # NDATA (node metrics are not sensor readings), NCMD, DCMD
        return out

    def _check_seq(self, topic: Topic, node: _Node, message: Payload, out: Outcome, now: float) -> None:
        if not message.HasField("seq") or topic.message_type in ("NCMD", "DCMD"):
            return
        seq = message.seq
        if topic.message_type != "NBIRTH" and node.next_seq is not None and seq != node.next_seq:
            out.events.append("seq_gap")
            self._ask_rebirth(topic.edge_node, node, out, now)
        node.next_seq = (seq + 1) % 256

    def _ask_rebirth(self, edge_node: str, node: _Node, out: Outcome, now: float) -> None:
        if now - node.rebirth_asked >= REBIRTH_HOLDOFF:
            node.rebirth_asked = now
            out.rebirth = edge_node

    def _node_death(self, node: _Node, message: Payload, out: Outcome) -> None:
        bdseq = _metric_long(message, BDSEQ_METRIC)
        if node.bdseq is not None and bdseq is not None and bdseq != node.bdseq:
            out.events.append("stale_ndeath")  # the Last Will of a session already replaced
            return
        node.online = False
        node.next_seq = None
        out.events.append("ndeath")

    def _device_birth(self, topic: Topic, node: _Node, message: Payload, out: Outcome) -> None:
        device = node.devices.setdefault(topic.device or "", _Device())
        device.sensors.clear()
        device.seq_alias = None
        for metric in message.metrics:
            if not metric.name:
                raise MalformedReading("bad_birth", f"topic {topic}: a DBIRTH metric has no name (alias {metric.alias})")
            if metric.name == SEQ_METRIC:
                device.seq_alias = metric.alias
            else:
                unit = properties_of(metric).get(UNIT_PROPERTY)
                device.sensors[metric.alias] = (metric.name, unit if isinstance(unit, str) else "")
        out.events.append("dbirth")
        tick = self._device_data(topic, node, message, out, None)
        if device.silent_since is not None and tick is not None:
            out.resumed.extend((topic.device or "", name, tick - 1) for name, _ in device.sensors.values())
        device.silent_since = None

    def _device_data(self, topic: Topic, node: _Node, message: Payload, out: Outcome, now: float | None) -> int | None:
        """Reading documents of a DBIRTH/DDATA/DDEATH; returns the device's tick (None if absent)."""
        dev_id = topic.device or ""
        device = node.devices.get(dev_id)
        if device is None:
            if now is not None:
                self._ask_rebirth(topic.edge_node, node, out, now)
            raise UnknownDevice(f"topic {topic}: no DBIRTH seen for device {dev_id!r}; asking the node for a rebirth", out.rebirth)
        by_alias = {m.alias: m for m in message.metrics}
        seq_metric = by_alias.get(device.seq_alias) if device.seq_alias is not None else None
        tick = seq_metric.long_value if seq_metric is not None and seq_metric.WhichOneof("value") == "long_value" else None
        dying = topic.message_type == "DDEATH"
        if dying:
            out.events.append("ddeath")
            device.silent_since = tick if tick is not None else -1
        if tick is None:
            if dying:
                return None
            raise MalformedReading("missing_field", f"topic {topic}: metric {SEQ_METRIC!r} (the readings' seq) is missing")
        default_ms = message.timestamp
        unknown = [m.alias for m in message.metrics if m.alias not in device.sensors and m.alias != device.seq_alias]
        if unknown:
            # Data the host cannot name: refused, and the node asked for a birth that names it.
            for alias in unknown:
                out.rejected.append(MalformedReading("unknown_alias", f"topic {topic}: alias {alias} is not in the DBIRTH of device {dev_id!r}"))
            if now is not None:
                self._ask_rebirth(topic.edge_node, node, out, now)
        documents = len(out.documents)
        for alias, (name, unit) in device.sensors.items():
            metric = by_alias.get(alias)
            if metric is None:
                if dying:  # a DDEATH without the sensor's metrics: the device went silent
                    out.documents.append(self._document(dev_id, name, unit, None, default_ms or 0, tick, "bad", None))
                continue  # report by exception: a sensor left out has no new value
            props = properties_of(metric) if metric.HasField("properties") else {}
            field_name = metric.WhichOneof("value")
            value = None if metric.is_null or field_name is None else getattr(metric, field_name)
            quality_code = props.get(QUALITY_PROPERTY)
            quality = QUALITY_OF_CODE.get(quality_code, "uncertain") if isinstance(quality_code, int) else ("bad" if value is None else "good")
            anomaly = props.get(ANOMALY_PROPERTY)
            ms = metric.timestamp if metric.HasField("timestamp") else default_ms
            try:
                out.documents.append(self._document(dev_id, name, unit, value, ms, tick, quality, anomaly if isinstance(anomaly, str) else None))
            except MalformedReading as exc:
                out.rejected.append(MalformedReading(exc.kind, f"topic {topic}: metric {name!r}: {exc}"))
        if len(out.documents) == documents and not unknown and topic.message_type == "DDATA":
            out.events.append("no_change")  # report by exception: only the seq, no sensor changed
        return tick

    def _document(self, device: str, sensor: str, unit: str, value: object, ms: int, tick: int, quality: str, anomaly: str | None) -> dict:
        return {"fleet": self.group, "protocol": self.protocol, "device": device, "sensor": sensor, "value": value, "unit": unit,
                "ts": _ts(ms), "seq": tick, "quality": quality, "anomaly": anomaly}


def _metric_long(message: Payload, name: str) -> int | None:
    for metric in message.metrics:
        if metric.name == name and metric.WhichOneof("value") == "long_value":
            return metric.long_value
    return None
