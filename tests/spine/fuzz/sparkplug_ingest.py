"""The real Sparkplug B ingest path of the MQTT collector, driven one hostile message at a time.

Used by the coverage-guided fuzzer (fuzz_sparkplug.py, atheris) and by a property test
(hypothesis). Nothing here re-implements the collector: a message goes through
`SparkplugCollector._on_message` (paho's callback) and `SparkplugCollector.handle` (the writer
thread's step: topic, protobuf, the host state machine, the held-back data of devices without a
DBIRTH, the sink). Valid readings end in real Parquet files.

Messages are built with the product's own builders (sensorfleet.sparkplug.payload / device) and
the generated protobuf classes, never by hand: valid sessions of a few edge nodes (births, data,
deaths, rebirths), and hostile ones the fuzzer steers: random and mutated bytes, topics of any
shape, metrics of every datatype with NaN/Infinity, strings, bytes, data sets and nested templates,
uint64 timestamps no date can hold, unknown aliases, missing `sensorfleet/seq`, data before any
DBIRTH, payloads over the size limit.

Every message ends as exactly one of: readings received (stored or duplicates), refusals counted
under a reason of MALFORMED_REASONS, a host event (nbirth, ndeath, no_change, ...), or held back
for its device's DBIRTH (then read at the birth, or refused `unknown_device` when none comes).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

from ingest import EXAMPLE, Draw
from sensorfleet.collectors import sparkplug as sparkplug_collector
from sensorfleet.collectors.sparkplug import SparkplugCollector
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import MALFORMED_REASONS
from sensorfleet.runtime import BrokerAddress, CollectorOptions
from sensorfleet.spec import load_fleet
from sensorfleet.sparkplug import payload as sp
from sensorfleet.sparkplug import sparkplug_b_pb2 as pb
from sensorfleet.sparkplug.device import DeviceMessages, SensorValue

GROUP = "demo"
TYPES = list(sp.MESSAGE_TYPES)
NODES = 3
DEVICES = 4  # per node
HOSTILE_DOUBLES = [float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 5e-324, 21.5]
HOSTILE_MS = [0, 1, 2**63 - 1, 2**64 - 1, 253_402_300_800_000, 253_402_300_799_999, -1 % 2**64]
DATATYPES = list(range(0, 40))


@dataclass
class Case:
    kind: str
    topic: str
    payload: bytes


@dataclass
class _Node:
    """An edge node as the fuzzer drives it: its bdSeq, message counter and devices."""

    name: str
    bdseq: int = 0
    seq: int = 0
    born: bool = False
    devices: list[DeviceMessages] = field(default_factory=list)
    ticks: list[int] = field(default_factory=list)
    births: list[bool] = field(default_factory=list)

    def next_seq(self) -> int:
        seq, self.seq = self.seq, (self.seq + 1) % 256
        return seq


class SparkplugHarness:
    """One Sparkplug collector, not connected to a broker, writing into `workdir`."""

    def __init__(self, workdir: Path):
        doc = yaml.safe_load(EXAMPLE.read_text())
        doc["metadata"]["name"] = GROUP
        doc["spec"]["protocols"]["mqtt"]["payloadFormat"] = "sparkplugB"
        doc["spec"]["collector"] = {"batchSize": 2000, "flushInterval": 3600}
        path = workdir / "fleet.yaml"
        path.write_text(yaml.safe_dump(doc))
        self.fleet = load_fleet(path)
        self.collector = SparkplugCollector(CollectorOptions(self.fleet, str(workdir / "data")), BrokerAddress("127.0.0.1", 1), FleetMetrics(GROUP, "mqtt", "collector"))
        self.sensors = [(s.name, s.unit) for s in self.fleet.spec.sensors]
        self.nodes = [_Node(f"node-{n}") for n in range(NODES)]
        for node in self.nodes:
            node.devices = [DeviceMessages(slot, self.sensors) for slot in range(DEVICES)]
            node.ticks = [1_000] * DEVICES
            node.births = [False] * DEVICES
        self.cases: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()  # what each message became
        self.messages = 0
        self._mid = itertools.count(1)
        self._costly: collections.Counter[str] = collections.Counter()

    @property
    def sink(self):
        return self.collector.sink

    def rarely(self, what: str, every: int) -> bool:
        """True for every `every`-th costly variant (as ingest.IngestHarness.rarely)."""
        self._costly[what] += 1
        return self._costly[what] % every == 0

    # --- feeding ----------------------------------------------------------------------------------
    def _counts(self) -> tuple[int, int, int]:
        t = self.sink.totals
        return t["received"], t["malformed"], sum(self.collector.events.values())

    def _held(self, topic: str, mid: int) -> bool:
        """Whether message `mid` is the newest one held back for its device's DBIRTH."""
        parts = topic.split("/")
        held = self.collector._parked.get((parts[3], parts[4])) if len(parts) == 5 else None
        return bool(held) and held[-1].mid == mid

    def feed(self, case: Case) -> None:
        """Push one message through the collector's real path and check it became something:
        each message resolved now (this one unless held back, and any held-back one its DBIRTH
        released) must have counted at least one reading, refusal or host event."""
        parked_before = self.collector._parked_count
        received, malformed, events = self._counts()
        reasons = dict(self.sink.malformed_by_reason)
        by_event = dict(self.collector.events)
        mid = next(self._mid)
        message = mqtt.MQTTMessage(mid=mid, topic=case.topic.encode())
        message.payload = case.payload
        self.collector._on_message(None, None, message)
        while self.collector.intake:
            self.collector.handle(self.collector.intake.popleft())
        if self.sink.due():
            self.collector.flush_and_ack()
        self.cases[case.kind] += 1
        self.messages += 1
        held = self._held(case.topic, mid)
        # A message held back releases none (only a DBIRTH does): what left the park was released.
        released = int(held) - (self.collector._parked_count - parked_before)
        assert released >= 0, (held, parked_before, self.collector._parked_count)
        resolved = (0 if held else 1) + released
        received2, malformed2, events2 = self._counts()
        counted = (received2 - received) + (malformed2 - malformed) + (events2 - events)
        if counted < resolved:
            raise AssertionError(f"{case.kind}: {resolved} message(s) resolved but {counted} reading(s)/refusal(s)/event(s) counted; topic={case.topic!r:.120} payload[:120]={case.payload[:120]!r}")
        if held:
            self.outcomes["held_for_dbirth"] += 1
        self.outcomes["received"] += received2 - received
        if malformed2 != malformed:
            for reason, n in self.sink.malformed_by_reason.items():
                if n - reasons.get(reason, 0):
                    self.outcomes[f"malformed:{reason}"] += n - reasons.get(reason, 0)
        if events2 != events:
            for event, n in self.collector.events.items():
                if n - by_event.get(event, 0):
                    self.outcomes[f"event:{event}"] += n - by_event.get(event, 0)

    def close(self) -> None:
        """The end of a run: no DBIRTH comes for what is still held back (as PARK_SECONDS after
        it came), and the open batch is written."""
        held = self.collector._parked_count
        malformed = self.sink.totals["malformed"]
        saved, sparkplug_collector.PARK_SECONDS = sparkplug_collector.PARK_SECONDS, -1.0
        try:
            self.collector._expire_parked()
        finally:
            sparkplug_collector.PARK_SECONDS = saved
        assert self.sink.totals["malformed"] - malformed == held, "every message still held back is refused unknown_device"
        self.outcomes["malformed:unknown_device(expired)"] += held
        self.collector.flush_and_ack()
        self.sink.flush()

    def check(self) -> None:
        """After `close`: reasons known and adding up, every reading stored once or a duplicate,
        the dataset holding exactly what the sink wrote, nothing held back or unacknowledged."""
        from sensorfleet.dataset import read_dataset

        t = self.sink.totals
        unknown = set(self.sink.malformed_by_reason) - set(MALFORMED_REASONS)
        assert not unknown, f"reasons outside MALFORMED_REASONS: {unknown}"
        assert sum(self.sink.malformed_by_reason.values()) == t["malformed"], (dict(self.sink.malformed_by_reason), t)
        assert t["received"] == t["stored"] + t["duplicates"] and not self.sink.pending(), t
        assert not self.collector._parked and not self.collector._unacked and self.collector._parked_count == 0
        rows = len(read_dataset(self.sink.writer.url, columns=["seq"])) if t["stored"] else 0
        assert rows == t["stored"], (rows, t)

    def summary(self) -> dict:
        return {"cases": self.messages, "by_kind": dict(self.cases), "totals": dict(self.sink.totals),
                "malformed_by_reason": dict(self.sink.malformed_by_reason), "events": dict(self.collector.events), "outcomes": dict(self.outcomes)}

    # --- building cases ---------------------------------------------------------------------------
    def case(self, d: Draw) -> Case:
        return _BUILDERS[bisect.bisect_right(_CUMULATIVE, d.pick(_CUMULATIVE[-1]))](self, d)

    def _topic(self, kind: str, node: _Node, slot: int | None = None) -> str:
        tail = f"/device-{slot}" if slot is not None else ""
        return f"{sp.NAMESPACE}/{GROUP}/{kind}/{node.name}{tail}"

    def _values(self, d: Draw) -> list[SensorValue]:
        return [SensorValue(None, "bad") if d.pick(20) == 0 else SensorValue(20.0 + d.int(0, 1000) / 100) for _ in self.sensors]

    def _session(self, d: Draw) -> Case:
        """The next message of a well-behaved edge node, mostly data; births, deaths and rebirths
        now and then, as a real node (or one restarted) sends them."""
        node = self.nodes[d.pick(NODES)]
        now_ms = int(time.time() * 1000)
        step = d.pick(40)
        if not node.born or step == 0:  # (re)birth of the node: a new bdSeq, seq 0
            node.bdseq, node.seq, node.born = (node.bdseq + 1) % 256, 1, True
            node.births = [False] * DEVICES
            return Case("session", self._topic("NBIRTH", node), sp.node_birth(node.bdseq, now_ms))
        if step == 1:
            node.born = False
            return Case("session", self._topic("NDEATH", node), sp.node_death(node.bdseq if d.pick(4) else node.bdseq + 7, now_ms))
        slot = d.pick(DEVICES)
        device = node.devices[slot]
        node.ticks[slot] += 1 + (d.pick(3) if d.pick(10) == 0 else 0)  # now and then a tick never sent
        tick = node.ticks[slot]
        if not node.births[slot] or step == 2:
            node.births[slot] = True
            return Case("session", self._topic("DBIRTH", node, slot), device.birth(node.next_seq(), tick, now_ms, self._values(d)))
        if step == 3:
            node.births[slot] = False
            return Case("session", self._topic("DDEATH", node, slot), device.death(node.next_seq(), tick, now_ms, [SensorValue(None, "bad")] * len(self.sensors)))
        if step == 4:  # a message sent again (QoS 1 redelivery after a reconnect)
            node.ticks[slot] -= 1
            return Case("session", self._topic("DDATA", node, slot), device.data(node.seq, tick - 1, now_ms, self._values(d)))
        return Case("session", self._topic("DDATA", node, slot), device.data(node.next_seq(), tick, now_ms, self._values(d)))

    def _raw(self, d: Draw) -> Case:
        node = self.nodes[d.pick(NODES)]
        kind = TYPES[d.pick(len(TYPES))]
        return Case("raw_bytes", self._topic(kind, node, None if kind in sp.NODE_TYPES else d.pick(DEVICES)), d.bytes(512))

    def _mutated(self, d: Draw) -> Case:
        """A valid message with bytes flipped, inserted, cut or truncated: broken protobuf framing,
        lengths that run past the end, wrong wire types."""
        case = self._session(d)
        data = bytearray(case.payload)
        for _ in range(1 + d.pick(4)):
            at = d.int(0, max(0, len(data) - 1))
            op = d.pick(4)
            if op == 0 and data:
                data[at] ^= 1 << d.pick(8)
            elif op == 1:
                data[at:at] = d.bytes(8)
            elif op == 2:
                del data[at:at + 1 + d.pick(8)]
            else:
                data = data[:at]
        return Case("mutated", case.topic, bytes(data))

    def _bad_topic(self, d: Draw) -> Case:
        node = self.nodes[d.pick(NODES)]
        style = d.pick(6)
        levels = [sp.NAMESPACE, GROUP, TYPES[d.pick(len(TYPES))], node.name, "device-0"]
        if style == 0:
            levels[2] = d.text(12)
        elif style == 1:
            levels = levels[:3 + d.pick(2)] if levels[2] in sp.NODE_TYPES else levels[:4]
        elif style == 2:
            levels.append(d.text(8))
        elif style == 3:
            levels[3] = ""
        elif style == 4:
            levels[1] = "other-fleet"
        else:
            levels = levels[:2] + [d.text(10) for _ in range(d.pick(6))]
        return Case("bad_topic", "/".join(levels), sp.node_birth(1, int(time.time() * 1000)))

    def _hostile_metric(self, d: Draw) -> Case:
        """A DDATA (or DBIRTH) of a known device whose metrics hold anything the schema allows."""
        node = self.nodes[d.pick(NODES)]
        slot = d.pick(DEVICES)
        device = node.devices[slot]
        birth = d.pick(5) == 0
        message = pb.Payload(timestamp=HOSTILE_MS[d.pick(len(HOSTILE_MS))] if d.pick(4) == 0 else int(time.time() * 1000))
        if d.pick(6):
            message.seq = d.int(0, 255)
        if d.pick(6):  # the readings' seq, sometimes of another type or out of range
            seq = message.metrics.add(alias=device.seq_alias)
            if birth:
                seq.name = sp.SEQ_METRIC
            how = d.pick(6)
            if how == 0:
                seq.double_value = 1.5
            elif how == 1:
                seq.long_value = 2**64 - 1
            elif how == 2:
                seq.is_null = True
            else:
                node.ticks[slot] += 1
                seq.long_value = node.ticks[slot]
        for s in range(d.int(0, len(self.sensors) + 1)):
            alias = device.aliases[s] if s < len(device.aliases) and d.pick(6) else d.int(0, 2**64 - 1)
            metric = message.metrics.add(alias=alias)
            if birth:
                metric.name = self.sensors[s][0] if s < len(self.sensors) and d.pick(5) else d.text(10)
            metric.datatype = DATATYPES[d.pick(len(DATATYPES))]
            if d.pick(3) == 0:
                metric.timestamp = HOSTILE_MS[d.pick(len(HOSTILE_MS))]
            self._hostile_value(d, metric)
            if d.pick(3) == 0:
                self._hostile_properties(d, metric)
        if birth:
            node.births[slot] = True
        kind = "DBIRTH" if birth else ("DDATA", "DDATA", "DDEATH")[d.pick(3)]
        return Case("hostile_metric", self._topic(kind, node, slot), message.SerializeToString())

    def _hostile_value(self, d: Draw, metric) -> None:
        which = d.pick(11)
        if which == 0:
            metric.double_value = HOSTILE_DOUBLES[d.pick(len(HOSTILE_DOUBLES))]
        elif which == 1:
            metric.float_value = HOSTILE_DOUBLES[d.pick(len(HOSTILE_DOUBLES))]
        elif which == 2:
            metric.long_value = d.int(0, 2**64 - 1)
        elif which == 3:
            metric.int_value = d.int(0, 2**32 - 1)
        elif which == 4:
            metric.boolean_value = bool(d.pick(2))
        elif which == 5:
            metric.string_value = d.text(64)
        elif which == 6:
            metric.bytes_value = d.bytes(64)
        elif which == 7:
            metric.is_null = True
        elif which == 8:
            metric.dataset_value.num_of_columns = d.int(0, 2**64 - 1)
            metric.dataset_value.columns.append(d.text(8))
            row = metric.dataset_value.rows.add()
            row.elements.add(double_value=1.0)
        elif which == 9:  # templates nest metrics in templates: as deep as the fuzzer likes
            inner = metric.template_value
            for _ in range(d.int(1, 150) if self.rarely("deep_template", 8) else d.int(1, 5)):
                inner = inner.metrics.add(name="x").template_value
            inner.template_ref = d.text(8)
        # else: no value at all (the `value` oneof unset)

    def _hostile_properties(self, d: Draw, metric) -> None:
        props = metric.properties
        for _ in range(d.int(0, 4)):
            props.keys.append((sp.QUALITY_PROPERTY, sp.UNIT_PROPERTY, sp.ANOMALY_PROPERTY, d.text(8))[d.pick(4)])
            value = props.values.add(type=DATATYPES[d.pick(len(DATATYPES))])
            which = d.pick(6)
            if which == 0:
                value.int_value = d.int(0, 2**32 - 1)
            elif which == 1:
                value.string_value = d.text(16)
            elif which == 2:
                value.is_null = True
            elif which == 3:
                value.propertyset_value.keys.append("k")
            elif which == 4:
                value.double_value = HOSTILE_DOUBLES[d.pick(len(HOSTILE_DOUBLES))]
        if d.pick(4) == 0:  # keys and values of different lengths
            props.keys.append("orphan")

    def _before_birth(self, d: Draw) -> Case:
        """Data of a device no DBIRTH announced (a node that never sent one, or one the collector
        missed): held back for the birth it asks for; a DBIRTH may come for some of them."""
        node = self.nodes[d.pick(NODES)]
        device = DeviceMessages(d.pick(8), self.sensors)
        name = f"ghost-{d.pick(64)}"
        now_ms = int(time.time() * 1000)
        if d.pick(4) == 0:
            return Case("before_birth", f"{sp.NAMESPACE}/{GROUP}/DBIRTH/{node.name}/{name}", device.birth(node.seq, 5_000 + d.pick(100), now_ms, self._values(d)))
        return Case("before_birth", f"{sp.NAMESPACE}/{GROUP}/DDATA/{node.name}/{name}", device.data(node.seq, 5_000 + d.pick(100), now_ms, self._values(d)))

    def _large(self, d: Draw) -> Case:
        """Over the collector's payload limit (refused before parsing), or a big valid-size one."""
        node = self.nodes[d.pick(NODES)]
        if self.rarely("large", 4):
            message = pb.Payload(timestamp=int(time.time() * 1000))
            message.metrics.add(alias=1, bytes_value=b"\0" * (self.collector.max_payload + 1 + d.pick(1000)))
        else:
            message = pb.Payload(timestamp=int(time.time() * 1000))
            for _ in range(d.int(0, 2000) if self.rarely("many_metrics", 8) else d.int(0, 100)):
                message.metrics.add(alias=d.int(0, 70_000), double_value=1.0)
        return Case("large", self._topic("DDATA", node, d.pick(DEVICES)), message.SerializeToString())


# How often each kind is drawn: sessions give the readings that must be stored, the rest attack.
_WEIGHTED = [
    (SparkplugHarness._session, 30), (SparkplugHarness._raw, 12), (SparkplugHarness._mutated, 16), (SparkplugHarness._bad_topic, 6),
    (SparkplugHarness._hostile_metric, 24), (SparkplugHarness._before_birth, 8), (SparkplugHarness._large, 1),
]
_BUILDERS = [builder for builder, _ in _WEIGHTED]
_CUMULATIVE = list(itertools.accumulate(weight for _, weight in _WEIGHTED))
