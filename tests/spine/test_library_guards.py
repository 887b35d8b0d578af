"""Guards for every library internal SensorFleet relies on (sensorfleet/internals.py, and the
wording of msgspec's errors the decoder reads its reasons from). Each test uses the installed
library the way the hot path does and fails, naming the internal, when a release changed it."""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Annotated

import aiocoap
from aiocoap import resource
import msgspec
import paho.mqtt.client as mqtt
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from aiocoap.numbers.types import CON, NON
from asyncua import Server, ua
from asyncua.server.monitored_item_service import MonitoredItemValues

from sensorfleet import internals
from sensorfleet.reading import WireReading, _canonical_times
from sensorfleet.runtime import free_port
from sensorfleet.simulators.opcua import SharedDataValue


def test_paho_counts_the_messages_it_holds_until_acknowledged():
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="guard", protocol=mqtt.MQTTv311, clean_session=False)
    assert internals.paho_unacknowledged(client) == 0
    client.publish("guard/topic", b"x", qos=1)  # not connected: QoS 1 is queued for the next connection
    client.publish("guard/topic", b"y", qos=1)
    assert internals.paho_unacknowledged(client) == 2


def test_a_missing_internal_fails_loudly_naming_the_library_and_the_name():
    class NotPaho:
        pass

    with pytest.raises(internals.LibraryInternalsChanged, match=r"paho-mqtt \d.* no longer has Client._out_messages"):
        internals.paho_unacknowledged(NotPaho())


async def test_aiocoap_duplicate_detection_is_off_for_non_and_backlogs_are_readable():
    context = await aiocoap.Context.create_server_context(resource.Site(), bind=("127.0.0.1", free_port(udp=True)))
    try:
        internals.aiocoap_skip_non_deduplication(context)
        manager = next(ri.token_interface for ri in context.request_interfaces if hasattr(getattr(ri, "token_interface", None), "_deduplicate_message"))
        remote = object()
        for mtype, second_is_duplicate in ((NON, False), (CON, True)):
            message = aiocoap.Message(code=aiocoap.GET)
            message.mtype, message.mid, message.remote = mtype, 4242 if mtype is NON else 4343, remote
            assert manager._deduplicate_message(message) is False
            manager._recent_messages[(remote, message.mid)] = None  # what aiocoap records for a message it saw
            assert manager._deduplicate_message(message) is second_is_duplicate, mtype
        assert internals.aiocoap_backlog(context, remote) == 0
        manager._backlogs[remote] = [object(), object()]
        assert internals.aiocoap_backlog(context, remote) == 2
    finally:
        await context.shutdown()


async def test_asyncua_builds_nodes_in_one_call_exposes_value_attributes_and_deep_copies_values():
    server = Server()
    await server.init()
    ns = await server.register_namespace("urn:guard")
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = ua.NodeId("guard/value", ns)
    item.BrowseName = ua.QualifiedName("value", ns)
    item.NodeClass = ua.NodeClass.Variable
    item.ParentNodeId = ua.NodeId(ua.ObjectIds.ObjectsFolder)
    item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.Organizes)
    item.TypeDefinition = ua.NodeId(ua.ObjectIds.BaseDataVariableType)
    attributes = ua.VariableAttributes()
    attributes.Value = ua.Variant(1.5, ua.VariantType.Double)
    attributes.DataType = ua.NodeId(ua.ObjectIds.Double)
    item.NodeAttributes = attributes
    results = await internals.asyncua_add_nodes(server, [item])
    assert results[0].StatusCode.is_good()
    attribute = internals.asyncua_value_attribute(server, ua.NodeId("guard/value", ns))
    assert attribute.value.Value.Value == 1.5
    # The simulator's SharedDataValue relies on asyncua deep-copying each value per monitored item.
    values = MonitoredItemValues()
    plain, shared = ua.DataValue(ua.Variant(2.0)), SharedDataValue(ua.Variant(3.0))
    values.set_current_datavalue(plain)
    assert values.get_current_datavalue() is not plain, "asyncua no longer copies values: SharedDataValue is pointless"
    values.set_current_datavalue(shared)
    assert values.get_current_datavalue() is shared and copy.deepcopy(shared) is shared


@pytest.mark.parametrize(("payload", "starts"), [
    (b'{"fleet":"a"}', "Object missing required field"),
    (b'{"fleet":"a","protocol":"p","device":"d","sensor":"s","unit":"u","ts":"2026-01-01T00:00:00Z","seq":1,"value":1e400}', "Number out of range"),
    (b'{"fleet":"a","protocol":"p","device":"d","sensor":"s","unit":"u","ts":"2026-01-01T00:00:00Z","seq":-1}', "Expected `int` >= 0"),
    (b'{"fleet":"a","protocol":"p","device":"d","sensor":"s","unit":"u","ts":"2026-01-01T00:00:00Z","seq":1,"quality":"x"}', "Invalid enum value"),
    (b'{"fleet":""}', "Expected `str` of length >= 1"),
])
def test_msgspec_validation_messages_keep_the_wording_reasons_are_read_from(payload, starts):
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(payload, type=WireReading)
    assert str(caught.value).startswith(starts), str(caught.value)


def test_msgspec_syntax_errors_name_the_byte():
    with pytest.raises(msgspec.DecodeError, match=r"\(byte 8\)"):
        msgspec.json.decode(b'{"a": 1 x}')


def test_prometheus_histograms_take_a_whole_array_of_observations_as_observe_would_one_by_one():
    from prometheus_client import CollectorRegistry, Histogram

    amounts = [0.0, 0.001, 0.0011, 0.5, 2.5, 2.6, 59.0, 1e6, -1.0]  # on, between and beyond the bounds
    registry = CollectorRegistry()
    one_by_one = Histogram("one", "x", buckets=(0.001, 0.5, 2.5, 60.0), registry=registry)
    at_once = Histogram("many", "x", buckets=(0.001, 0.5, 2.5, 60.0), registry=registry)
    for amount in amounts:
        one_by_one.observe(amount)
    internals.histogram_observe_many(at_once, amounts)

    def samples(name: str) -> dict:
        return {(s.name.removeprefix(name), tuple(s.labels.items())): s.value for m in registry.collect() if m.name == name for s in m.samples if not s.name.endswith("_created")}

    assert samples("many") == samples("one") and samples("many")[("_count", ())] == len(amounts)


@pytest.mark.parametrize("text", [
    "2026-12-02T19:22:19.123456Z", "2024-02-29T00:00:00.000000Z", "0001-01-01T00:00:00.000000Z", "9999-12-31T23:59:59.999999Z",
    "2026-02-30T00:00:00.000000Z", "2023-02-29T00:00:00.000000Z", "1900-02-29T00:00:00.000000Z", "2026-04-31T00:00:00.000000Z",
    "2026-13-01T00:00:00.000000Z", "2026-00-01T00:00:00.000000Z", "2026-01-00T00:00:00.000000Z", "2026-01-01T24:00:00.000000Z",
    "2026-01-01T23:60:00.000000Z", "2026-01-01T23:59:60.000000Z", "2026-0a-01T00:00:00.000000Z", "2026-01-01T00:00:00.00000aZ",
    "2026-12-02t19:22:19.123456Z", "2026-12-02 19:22:19.123456Z", "2026-12-02T19:22:19.123456z",
])
def test_arrow_parses_a_timestamp_of_format_ts_exactly_where_msgspec_does(text):
    """The columnar intake (reading.decode_json_columns, dataset.columns_table) lets Arrow's cast
    parse and check `ts`: it must take what msgspec's RFC 3339 parser takes, to the same instant,
    or refuse it (the message then goes reading by reading). Year 0 is the one Arrow takes and
    msgspec refuses: reading._canonical_times refuses it first."""
    try:
        ours = msgspec.json.decode(f'"{text}"'.encode(), type=Annotated[datetime, msgspec.Meta(tz=True)])
    except msgspec.ValidationError:
        ours = None
    try:
        arrows = pc.cast(pa.array([text]), pa.timestamp("us", tz="UTC"))[0].as_py()
    except pa.ArrowInvalid:
        arrows = None
    assert arrows is None or arrows == ours, f"Arrow took {text!r} as {arrows}, msgspec as {ours}"
    canonical = _canonical_times([text])
    assert not (canonical and ours is None and arrows is not None)
    if text.startswith("0000"):
        assert not canonical
