"""The real ingest paths of the three collectors, driven one hostile input at a time.

Used by the coverage-guided fuzzer (fuzz_ingest.py, atheris) and by the property tests
(test_hostile_payloads.py, hypothesis). Nothing here re-implements a collector: an MQTT payload
goes through `MqttCollector._on_message` (paho's callback) and `MqttCollector.handle` (the
writer thread's step); a CoAP representation through `TargetCollector._on_message` and
`coap.handle_item`; an OPC UA value through `SensorFleetSubscription.publish_callback` and
`opcua.handle_item`. Valid readings end in real Parquet files.

Cases are built from a `Draw` (an atheris FuzzedDataProvider or a seeded random.Random), so the
fuzzer's mutations steer them: deep nesting, megabyte payloads, invalid UTF-8, NaN/Infinity,
wrong types, huge numbers, duplicate keys, arrays mixing good and bad documents, CBOR, OPC UA
values of any variant type and status.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiocoap
import cbor2
import paho.mqtt.client as mqtt
import yaml
from aiocoap.numbers.codes import Code
from asyncua import ua

from sensorfleet.collectors import coap, opcua
from sensorfleet.collectors.base import CollectorSink
from sensorfleet.collectors.mqtt import MqttCollector
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import MALFORMED_REASONS
from sensorfleet.runtime import BrokerAddress, CollectorOptions
from sensorfleet.spec import load_fleet

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "fleet.yaml"
NOW = datetime.now(timezone.utc).replace(microsecond=0)
HOSTILE_VALUES: list[object] = [None, True, False, 0, -1, 2**63, 2**64, -(2**63) - 1, 10**400, 1e308, -1e308, 5e-324, 1.5, "", "x" * 129, "x" * 5000, "21.5", [], [1.0], {}, {"a": 1}, "NaN", "2026-13-45T99:99:99Z", "yesterday", "\u0000", "\ud800"]
# A lone surrogate escape is valid JSON grammar but not Unicode: msgspec refuses the whole payload
# (as I-JSON, RFC 7493, asks), so an array holding one counts once, not per document.
IN_ARRAY_VALUES = [v for v in HOSTILE_VALUES if v != "\ud800"]
LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"9" * 400, b"-0", b"1E+2", b"0.0000000000000000000000001", b"true", b"null", b"[]", b"{}", b'"\\ud800"', b'"\\u0000"']


class Draw:
    """What a case builder may ask for; both adapters below answer it."""

    def pick(self, n: int) -> int: ...
    def int(self, lo: int, hi: int) -> int: ...
    def bytes(self, n: int) -> bytes: ...
    def text(self, n: int) -> str: ...


class FuzzDraw(Draw):
    def __init__(self, provider):  # atheris.FuzzedDataProvider
        self.p = provider

    def pick(self, n: int) -> int:
        return self.p.ConsumeIntInRange(0, n - 1)

    def int(self, lo: int, hi: int) -> int:
        return self.p.ConsumeIntInRange(lo, hi)

    def bytes(self, n: int) -> bytes:
        return self.p.ConsumeBytes(n)

    def text(self, n: int) -> str:
        return self.p.ConsumeUnicodeNoSurrogates(n)


class RandomDraw(Draw):
    def __init__(self, rng: random.Random):
        self.r = rng

    def pick(self, n: int) -> int:
        return self.r.randrange(n)

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def bytes(self, n: int) -> bytes:
        return self.r.randbytes(self.r.randint(0, n))

    def text(self, n: int) -> str:
        return "".join(chr(self.r.choice([self.r.randint(32, 126), self.r.randint(0, 0xD7FF)])) for _ in range(self.r.randint(0, n)))


@dataclass
class Case:
    kind: str
    protocol: str  # mqtt | coap | opcua
    payload: bytes = b""
    content_format: int | None = None
    value: ua.DataValue | None = None
    handle: int = 1
    documents: int | None = None  # how many documents the input holds, where the builder knows


class IngestHarness:
    """One collector of each protocol, not connected to anything, writing into `workdir`."""

    def __init__(self, workdir: Path):
        doc = yaml.safe_load(EXAMPLE.read_text())
        doc["spec"]["collector"] = {"batchSize": 2000, "flushInterval": 3600}
        path = workdir / "fleet.yaml"
        path.write_text(yaml.safe_dump(doc))
        self.fleet = load_fleet(path)
        data = str(workdir / "data")
        opts = CollectorOptions(self.fleet, data)
        self.mqtt = MqttCollector(opts, BrokerAddress("127.0.0.1", 1), FleetMetrics("demo", "mqtt", "collector"))
        self.coap_sink = CollectorSink("demo", "coap", data, FleetMetrics("demo", "coap", "collector"), batch_size=2000)
        self.coap_target = coap.TargetCollector("coap://127.0.0.1:5683", None, collections.deque(), 1.0, self.coap_sink.metrics)  # type: ignore[arg-type]
        self.coap_resource = coap._Resource("/sensors/coap-00001/temperature")
        self.opcua_sink = CollectorSink("demo", "opcua", data, FleetMetrics("demo", "opcua", "collector"), batch_size=2000)
        self.opcua_target = opcua.TargetCollector("opc.tcp://127.0.0.1:4840", opts, collections.deque(), self.opcua_sink.metrics)
        phase = float(self.opcua_target.model.phase(__import__("numpy").array([1]))[0])
        self.opcua_target.nodes[1] = opcua.SensorNode("opcua-00001", "temperature", "degC", phase)
        self.opcua_phase = phase
        self.loop = asyncio.new_event_loop()
        self.subscription = opcua.SensorFleetSubscription(None, ua.CreateSubscriptionParameters(), self.opcua_target)
        self.seq = {"mqtt": 1_000, "coap": 1_000}
        self.cases: collections.Counter[str] = collections.Counter()
        self._costly: collections.Counter[str] = collections.Counter()
        self.documents = 0  # documents counted over all cases (received or malformed)

    def rarely(self, what: str, every: int) -> bool:
        """True for every `every`-th costly variant of a case, whatever the fuzzer's bytes say: left
        to coverage guidance, the fuzzer drifts to the costliest inputs (they reach the most code)
        and 100,000 cases would take many minutes instead of about one."""
        self._costly[what] += 1
        return self._costly[what] % every == 0

    @property
    def sinks(self) -> dict[str, CollectorSink]:
        return {"mqtt": self.mqtt.sink, "coap": self.coap_sink, "opcua": self.opcua_sink}

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.flush()
        self.loop.close()

    # --- feeding ----------------------------------------------------------------------------------
    def feed(self, case: Case) -> int:
        """Push one case through its collector's real path; returns how many documents it counted
        (received + malformed), which must be at least 1 and, where known, what the case holds."""
        sink = self.sinks[case.protocol]
        before = sink.totals["received"] + sink.totals["malformed"]
        if case.protocol == "mqtt":
            message = mqtt.MQTTMessage(mid=1, topic=b"sensorfleet/demo/mqtt-00001")
            message.payload = case.payload
            self.mqtt._on_message(None, None, message)
            while self.mqtt.intake:
                self.mqtt.handle(self.mqtt.intake.popleft())
        elif case.protocol == "coap":
            message = aiocoap.Message(code=Code.CONTENT, payload=case.payload, content_format=case.content_format)
            self.coap_target._on_message(self.coap_resource, message)
            while self.coap_target.intake:
                coap.handle_item(self.coap_sink, self.coap_target.intake.popleft())
        else:
            result = ua.PublishResult()
            result.NotificationMessage = ua.NotificationMessage(NotificationData=[ua.DataChangeNotification(MonitoredItems=[ua.MonitoredItemNotification(ClientHandle=case.handle, Value=case.value)])])
            self.loop.run_until_complete(self.subscription.publish_callback(result))
            while self.opcua_target.intake:
                opcua.handle_item(self.opcua_sink, self.opcua_target, self.opcua_target.intake.popleft())
        if sink.due():
            sink.flush()
        counted = sink.totals["received"] + sink.totals["malformed"] - before
        self.cases[case.kind] += 1
        self.documents += counted
        if counted < 1 or (case.documents is not None and counted != case.documents):
            raise AssertionError(f"{case.kind} on {case.protocol}: {counted} document(s) counted, expected {case.documents or 'at least 1'}; payload[:200]={case.payload[:200]!r}")
        return counted

    def reasons(self) -> dict[str, dict[str, float]]:
        """Malformed counts by protocol and reason, as /metrics shows them."""
        out: dict[str, dict[str, float]] = {}
        for protocol, sink in self.sinks.items():
            counts: dict[str, float] = {}
            for family in sink.metrics.registry.collect():
                if family.name == "sensorfleet_payloads_malformed":
                    for sample in family.samples:
                        if sample.name.endswith("_total") and sample.value:
                            counts[sample.labels["reason"]] = sample.value
            out[protocol] = counts
        return out

    def check_totals(self) -> None:
        """Every refusal is counted under a known reason, and the reasons add up to the total."""
        for protocol, counts in self.reasons().items():
            unknown = set(counts) - set(MALFORMED_REASONS)
            assert not unknown, f"{protocol}: reasons outside MALFORMED_REASONS: {unknown}"
            totals = self.sinks[protocol].totals
            assert sum(counts.values()) == totals["malformed"], (protocol, counts, totals)
        assert self.documents == sum(s.totals["received"] + s.totals["malformed"] for s in self.sinks.values())

    def check_stored(self) -> None:
        """After `close`: every valid reading was written once or counted a duplicate, and the
        dataset holds exactly the rows the sinks say they wrote."""
        from sensorfleet.dataset import read_dataset

        for protocol, sink in self.sinks.items():
            t = sink.totals
            assert t["received"] == t["stored"] + t["duplicates"] and not sink.pending(), (protocol, t)
            rows = len(read_dataset(sink.writer.url, columns=["seq"], protocols=[protocol]))
            assert rows == t["stored"], (protocol, rows, t)

    def totals(self) -> dict[str, dict[str, int]]:
        return {protocol: dict(sink.totals) for protocol, sink in self.sinks.items()}

    # --- building cases ---------------------------------------------------------------------------
    def valid(self, protocol: str = "mqtt") -> dict:
        self.seq[protocol] += 1
        return {"fleet": "demo", "protocol": protocol, "device": f"{protocol}-00001", "sensor": "temperature", "value": 21.5, "unit": "degC",
                "ts": NOW.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "seq": self.seq[protocol], "quality": "good", "anomaly": None}

    def case(self, d: Draw) -> Case:
        return _BUILDERS[bisect.bisect_right(_CUMULATIVE_WEIGHTS, d.pick(_CUMULATIVE_WEIGHTS[-1]))](self, d)

    def _raw(self, d: Draw) -> Case:
        return Case("raw_bytes", ("mqtt", "coap")[d.pick(2)], d.bytes(512), content_format=(None, 50, 60, 0, 11542)[d.pick(5)])

    def _valid(self, d: Draw) -> Case:
        protocol = ("mqtt", "coap")[d.pick(2)]
        doc = self.valid(protocol)
        if protocol == "coap" and d.pick(2):
            return Case("valid", protocol, cbor2.dumps(doc), content_format=60, documents=1)
        return Case("valid", protocol, json.dumps(doc).encode(), content_format=50, documents=1)

    def _broken_field(self, d: Draw) -> Case:
        doc = self.valid()
        field = sorted(doc)[d.pick(len(doc))]
        value = HOSTILE_VALUES[d.pick(len(HOSTILE_VALUES))] if d.pick(4) else d.text(40)
        if d.pick(5) == 0:
            del doc[field]
        else:
            doc[field] = value
        return Case("wrong_type", "mqtt", json.dumps(doc).encode(), documents=1)

    def _deep(self, d: Draw) -> Case:
        # Mostly just past the decoders' limits (msgspec 1,000, cbor2 400), now and then as deep as
        # the poison message (200,000): the cost of a case grows with its size.
        depth = d.int(1, 300_000) if self.rarely("deep", 16) else d.int(1, 3_000)
        opener, closer = ((b"[", b"]"), (b'{"a":', b"}"), (b'{"fleet":', b"}"))[d.pick(3)]
        body = opener * depth + (b"1" + closer * depth if d.pick(2) else b"")
        if d.pick(2):  # nested inside an otherwise valid reading, under an unknown field
            body = json.dumps(self.valid())[:-1].encode() + b',"extra":' + body + b"}"
        return Case("deep_nesting", ("mqtt", "coap")[d.pick(2)], body, content_format=50)

    def _large(self, d: Draw) -> Case:
        style = d.pick(3)
        size = d.int(900_000, 3_000_000)
        if style == 0 and not self.rarely("batch_under_limit", 64):
            # A gateway batch under the limit means ~1,700 readings to store (milliseconds): rare.
            size = d.int(self.mqtt.max_payload + 1, 3_000_000)
        if style == 0:
            doc = json.dumps(self.valid()).encode()
            body = b"[" + b",".join([doc] * (size // len(doc))) + b"]"
        elif style == 1:
            body = b'{"fleet":"' + b"a" * size + b'"}'
        else:
            body = b" " * size + json.dumps(self.valid()).encode()
        return Case("megabyte", "mqtt", body, documents=(size // len(json.dumps(self.valid()))) if style == 0 and len(body) <= self.mqtt.max_payload else None)

    def _invalid_utf8(self, d: Draw) -> Case:
        text = json.dumps(self.valid()).encode()
        at = d.int(0, len(text))
        bad = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82")[d.pick(5)]
        return Case("invalid_utf8", "mqtt", text[:at] + bad + text[at:], documents=1)

    def _duplicate_key(self, d: Draw) -> Case:
        doc = self.valid()
        field = sorted(doc)[d.pick(len(doc))]
        text = json.dumps(doc)[:-1] + f', "{field}": ' + json.dumps(HOSTILE_VALUES[d.pick(len(HOSTILE_VALUES))] if d.pick(2) else doc[field]) + "}"
        return Case("duplicate_key", "mqtt", text.encode(), documents=1)

    def _literal(self, d: Draw) -> Case:
        doc = self.valid()
        field = ("value", "seq", "ts", "device")[d.pick(4)]
        text = json.dumps(doc).encode().replace(json.dumps({field: doc[field]})[1:-1].encode(), f'"{field}": '.encode() + LITERALS[d.pick(len(LITERALS))])
        return Case("number_literal", ("mqtt", "coap")[d.pick(2)], text, content_format=50, documents=1)

    def _array(self, d: Draw) -> Case:
        n = d.int(0, 40) if self.rarely("long_array", 8) else d.int(0, 8)
        docs: list[object] = []
        for _ in range(n):
            doc = self.valid()
            kind = d.pick(4)
            if kind == 1:
                doc[sorted(doc)[d.pick(len(doc))]] = IN_ARRAY_VALUES[d.pick(len(IN_ARRAY_VALUES))]
            elif kind == 2:
                doc = IN_ARRAY_VALUES[d.pick(len(IN_ARRAY_VALUES))]
            docs.append(doc)
        return Case("mixed_array", "mqtt", json.dumps(docs).encode(), documents=max(1, n))

    def _cbor(self, d: Draw) -> Case:
        style = d.pick(4)
        if style == 0:
            body = d.bytes(256)
        elif style == 1:
            body = b"\x81" * d.int(1, 100_000) + b"\x01"
        elif style == 2:
            doc = self.valid("coap")
            doc[sorted(doc)[d.pick(len(doc))]] = (float("nan"), float("inf"), 2**64, -(2**70), b"\x00", None, [1], {1: 2})[d.pick(8)]
            body = cbor2.dumps(doc)
        else:
            body = cbor2.dumps([self.valid("coap") for _ in range(d.int(0, 5))])
        return Case("cbor", "coap", body, content_format=60)

    def _opcua(self, d: Draw) -> Case:
        model = self.opcua_target.model
        tick = 56_000_000 + d.int(0, 1_000_000)
        offset = (0.0, 0.0, 0.3, -0.5, 1e-9, 1e6)[d.pick(6)]
        seconds = model.epoch + (tick + self.opcua_phase + offset) * model.interval
        source = (None, "aware", "naive", "ancient", "future")[d.pick(5)]
        ts = None
        if source in ("aware", "naive"):
            ts = datetime.fromtimestamp(seconds, timezone.utc)
            ts = ts.replace(tzinfo=None) if source == "naive" else ts
        elif source == "ancient":
            ts = datetime(1601, 1, 1, tzinfo=timezone.utc)
        elif source == "future":
            ts = datetime(9999, 12, 31, tzinfo=timezone.utc) - timedelta(days=d.int(0, 1000))
        variants = [
            (21.5, ua.VariantType.Double), (float("nan"), ua.VariantType.Double), (float("inf"), ua.VariantType.Double), (-float("inf"), ua.VariantType.Float),
            (2**63 - 1, ua.VariantType.Int64), (2**64 - 1, ua.VariantType.UInt64), (True, ua.VariantType.Boolean), ("21.5", ua.VariantType.String),
            (b"\xff", ua.VariantType.ByteString), (None, ua.VariantType.Null), ([1.0, 2.0], ua.VariantType.Double), (d.int(-(2**31), 2**31 - 1), ua.VariantType.Int32),
        ]
        raw, vtype = variants[d.pick(len(variants))]
        status = (0, 0x40900000, 0x80310000, 0x808D0000, d.int(0, 2**32 - 1))[d.pick(5)]
        value = ua.DataValue(ua.Variant(raw, vtype), StatusCode=ua.StatusCode(status), SourceTimestamp=ts)
        return Case("opcua_value", "opcua", value=value, handle=(1, 1, 1, 999)[d.pick(4)], documents=1)


# How often each kind is drawn (weights): a megabyte payload costs milliseconds, the rest tens of
# microseconds, and 100,000 cases must run in about a minute on a shared 2-core machine.
_WEIGHTED_BUILDERS = [
    (IngestHarness._raw, 12), (IngestHarness._valid, 6), (IngestHarness._broken_field, 12), (IngestHarness._deep, 4),
    (IngestHarness._large, 1), (IngestHarness._invalid_utf8, 6), (IngestHarness._duplicate_key, 9), (IngestHarness._literal, 9),
    (IngestHarness._array, 6), (IngestHarness._cbor, 9), (IngestHarness._opcua, 12),
]
_BUILDERS = [builder for builder, _ in _WEIGHTED_BUILDERS]
_CUMULATIVE_WEIGHTS = list(itertools.accumulate(weight for _, weight in _WEIGHTED_BUILDERS))
