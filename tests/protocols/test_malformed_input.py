"""Bad input never crashes a collector: it is counted by reason and skipped, and good readings
from the same server keep flowing."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math

import aiocoap
import cbor2
import numpy as np
from aiocoap import resource
from asyncua import Server, ua
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensorfleet.collectors.coap import decode_payload
from sensorfleet.collectors.opcua import SensorNode, TargetCollector
from sensorfleet.reading import MALFORMED_REASONS, Reading
from sensorfleet.runtime import CollectorOptions
from sensorfleet.signals import SignalModel
from sensorfleet.simulators.opcua import address_space_items
from sensorfleet.spec import load_fleet

BOUNDED_KINDS = set(MALFORMED_REASONS)


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode)), content_format=st.sampled_from([None, 0, 40, 42, 50, 60, 11542]))
def test_coap_payload_decoding_either_yields_documents_or_a_bounded_kind(payload, content_format):
    decoded = decode_payload(payload, content_format)  # never raises
    assert decoded.documents >= 1
    assert all(exc.kind in BOUNDED_KINDS for exc in decoded.rejected)


def _values() -> st.SearchStrategy:
    return st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10), st.binary(max_size=10))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_values(), status=st.sampled_from([0, 0x40900000, 0x80310000, 0x808D0000]), offset=st.sampled_from([None, 0.0, 0.3, 1.0, -1e9]))
def test_opcua_values_either_become_readings_or_a_bounded_kind(value, status, offset, write_fleet):
    fleet = load_fleet(write_fleet("opcua"))
    target = TargetCollector("opc.tcp://127.0.0.1:4840", CollectorOptions(fleet, "unused"), None, None)  # type: ignore[arg-type]
    model = SignalModel(fleet.spec, fleet.name, "opcua")
    phase = float(model.phase(np.array([1]))[0])
    node = SensorNode("opcua-00001", "temperature", "degC", phase)
    ts = None if offset is None else dt.datetime.fromtimestamp(max(0.0, model.epoch + (56_000_000 + phase + offset) * model.interval), dt.timezone.utc)
    try:
        variant = ua.Variant(value)
    except Exception:  # values asyncua itself cannot put on the wire never reach the collector
        return
    result = target.to_reading(node, ua.DataValue(variant, StatusCode=ua.StatusCode(status), SourceTimestamp=ts))
    if isinstance(result, Reading):
        assert result.seq >= 0 and result.quality in ("good", "uncertain", "bad")
        assert result.value is None or math.isfinite(result.value)
    else:
        assert result[0] in BOUNDED_KINDS


class _Fixed(resource.Resource):
    """A non-observable resource answering with a fixed payload (the collector has to poll it)."""

    def __init__(self, payload, content_format):
        super().__init__()
        self.payload, self.content_format = payload, content_format

    def get_link_description(self):
        return {"rt": "sensorfleet.reading"}  # what the collector's discovery asks for

    async def render_get(self, request):
        payload = self.payload() if callable(self.payload) else self.payload
        return aiocoap.Message(payload=payload, content_format=self.content_format)


async def test_coap_collector_counts_garbage_and_polls_what_is_not_observable(write_fleet, procs, h, tmp_path, udp_port):
    fleet = write_fleet("coap", interval=0.25)
    seq = iter(range(1_000_000, 2_000_000))  # every poll of `good` is a new reading

    def good() -> bytes:
        doc = Reading("proto", "coap", "coap-00000", "temperature", 21.5, "degC", dt.datetime.now(dt.timezone.utc), next(seq)).to_wire()
        return json.dumps(doc).encode()

    site = resource.Site()
    site.add_resource([".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader))
    for path, payload, cf in [
        ("good", good, 50),
        ("garbage", b"{not json", 50),
        ("text", b"hello", 0),
        ("cbor", b"\xff\xfe\x00", 60),
        ("foreign", cbor2.dumps({**json.loads(good()), "fleet": "other", "seq": 5}), 60),
    ]:
        site.add_resource(["sensors", "coap-00000", path], _Fixed(payload, cf))
    server = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", udp_port))
    try:
        col = h.start_collector(procs, "coap", fleet, tmp_path, tmp_path / "data", f"coap://127.0.0.1:{udp_port}")

        def counted() -> bool:
            reasons = h.malformed_by_reason(col.metrics_port)
            return all(reasons.get(k, 0) >= 3 for k in ("not_json", "bad_content_format", "not_cbor", "foreign_fleet"))

        for _ in range(300):
            if await asyncio.to_thread(counted) and col.metric("sensorfleet_readings_received_total") >= 3:
                break
            await asyncio.sleep(0.1)
        assert col.process.poll() is None, col.log()[-2000:]
        reasons = h.malformed_by_reason(col.metrics_port)
        assert all(reasons.get(k, 0) >= 3 for k in ("not_json", "bad_content_format", "not_cbor", "foreign_fleet")), reasons
        result = await asyncio.to_thread(h.stop, col)
    finally:
        await server.shutdown()
    assert result["stored"] >= 3 and result["lost"] == 0
    assert col.log().count("skipping malformed coap payload (not_json)") == 1, "logged once per kind, then only counted"


async def test_opcua_collector_counts_non_numeric_and_off_schedule_values(write_fleet, procs, h, tmp_path, tcp_port):
    fleet_path = write_fleet("opcua", devices=1, interval=0.25)
    fleet = load_fleet(fleet_path)
    model = SignalModel(fleet.spec, fleet.name, "opcua")
    phase = float(model.phase(np.array([0]))[0])
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{tcp_port}/")
    ns = await server.register_namespace("urn:sensorfleet:proto")
    # The simulator's own address space, except that `humidity` accepts any data type.
    items, _ = address_space_items(ns, ["opcua-00000"], fleet.spec.sensors)
    for item in items:
        if item.RequestedNewNodeId == ua.NodeId("opcua-00000/humidity", ns):
            item.NodeAttributes.DataType = ua.NodeId(ua.ObjectIds.BaseDataType)
            item.NodeAttributes.Value = ua.Variant("dry", ua.VariantType.String)
    assert all(r.StatusCode.is_good() for r in await server.iserver.isession.add_nodes(items))
    good, text, skewed = (server.get_node(ua.NodeId(f"opcua-00000/{s}", ns)) for s in ("temperature", "humidity", "pressure"))
    async with server:
        col = h.start_collector(procs, "opcua", fleet_path, tmp_path, tmp_path / "data", f"opc.tcp://127.0.0.1:{tcp_port}/")
        tick = int((dt.datetime.now(dt.timezone.utc).timestamp() - model.epoch) / model.interval)
        for _ in range(300):
            tick += 1
            on_grid = dt.datetime.fromtimestamp(model.epoch + (tick + phase) * model.interval, dt.timezone.utc)
            await server.write_attribute_value(good.nodeid, ua.DataValue(ua.Variant(20.0 + tick % 7, ua.VariantType.Double), SourceTimestamp=on_grid))
            await server.write_attribute_value(text.nodeid, ua.DataValue(ua.Variant(f"wet {tick}", ua.VariantType.String), SourceTimestamp=on_grid))
            await server.write_attribute_value(skewed.nodeid, ua.DataValue(ua.Variant(1000.0 + tick % 5, ua.VariantType.Double), SourceTimestamp=on_grid + dt.timedelta(seconds=0.1)))
            await asyncio.sleep(0.1)
            reasons = await asyncio.to_thread(h.malformed_by_reason, col.metrics_port)
            if reasons.get("bad_value", 0) >= 3 and reasons.get("bad_seq", 0) >= 3 and col.metric("sensorfleet_readings_received_total") >= 3:
                break
        assert col.process.poll() is None, col.log()[-2000:]
        assert reasons.get("bad_value", 0) >= 3 and reasons.get("bad_seq", 0) >= 3, reasons
        result = await asyncio.to_thread(h.stop, col)
    assert result["stored"] >= 3 and result["malformed"] >= 6
