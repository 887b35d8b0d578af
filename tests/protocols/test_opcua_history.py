"""HistoryRead (raw) on the real OPC UA simulator with asyncua's client: answered from the signal
model (write log included), ordered and bounded as Part 11 asks, continued exactly across
continuation points, and never ahead of what was served live."""

from __future__ import annotations

import asyncio
import inspect
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from asyncua import Client, ua

from sensorfleet.controls import ControlAction, ControlLog
from sensorfleet.signals import SignalModel
from sensorfleet.spec import load_fleet

NS_URI = "urn:sensorfleet:proto"
INTERVAL = 0.25


async def _raw_pages(node, start, end, per_page: int) -> list[list[ua.DataValue]]:
    """Low-level HistoryRead, following continuation points by hand."""
    details = ua.ReadRawModifiedDetails(IsReadModified=False, StartTime=start, EndTime=end, NumValuesPerNode=per_page, ReturnBounds=False)
    pages, cont = [], None
    while True:
        result = await node.history_read(details, cont)
        result.StatusCode.check()
        pages.append(result.HistoryData.DataValues)
        cont = result.ContinuationPoint
        if not cont or len(pages) > 100:
            return pages


async def _history_session(url: str) -> dict:
    async with Client(url) as client:
        ns = await client.get_namespace_index(NS_URI)
        temperature = client.get_node(ua.NodeId("opcua-00001/temperature", ns))
        sp = client.get_node(ua.NodeId("opcua-00001/TemperatureSetpoint", ns))
        await sp.write_value(ua.DataValue(ua.Variant((await sp.read_value()) - 8.0, ua.VariantType.Double)))
        written = await sp.read_data_value()
        await asyncio.sleep(4.0)
        access = await temperature.read_attribute(ua.AttributeIds.AccessLevel)
        historizing = await temperature.read_attribute(ua.AttributeIds.Historizing)
        end = datetime.now(timezone.utc) - timedelta(seconds=1)  # every tick before it served: the reads below agree
        start = end - timedelta(seconds=7)
        whole = await temperature.read_raw_history(start, end)
        pages = await _raw_pages(temperature, start, end, 7)
        backwards = await _raw_pages(temperature, end, start, 5)
        live = await temperature.read_data_value(raise_on_bad_status=False)  # a stuck-at or dropout is not an error here
        future = await temperature.read_raw_history(end + timedelta(seconds=60), end + timedelta(seconds=120))
        too_old = await temperature.read_raw_history(end - timedelta(hours=3), end - timedelta(hours=2))
        return {"written": written, "access": access.Value.Value, "historizing": historizing.Value.Value, "start": start, "end": end,
                "whole": whole, "pages": pages, "backwards": backwards, "live": live, "future": future, "too_old": too_old}


def test_history_read_is_the_model_given_the_writes_with_continuation_points(write_fleet, procs, h, tmp_path, tcp_port):
    # Dropouts rarer than the protocol tests' default, so that values after the write are served.
    anomalies = {"stuckProbability": 0.2, "stuckDuration": 4, "dropoutProbability": 0.05, "dropoutDuration": 3}
    fleet = write_fleet("opcua", devices=3, interval=INTERVAL, anomalies=anomalies, writable=True, setpointLagSeconds=1.0, historyHours=1)
    url = f"opc.tcp://127.0.0.1:{tcp_port}/"
    h.start_simulator(procs, "opcua", fleet, tmp_path, tcp_port)
    time.sleep(9)  # enough served ticks to fill the window read below
    got = asyncio.run(_history_session(url))
    assert got["access"] & ua.AccessLevel.HistoryRead.mask and got["historizing"] is True

    whole = got["whole"]
    times = np.array([dv.SourceTimestamp.replace(tzinfo=timezone.utc).timestamp() for dv in whole])
    assert len(whole) == pytest.approx(7 / INTERVAL, abs=1)
    assert np.allclose(np.diff(times), INTERVAL, atol=1e-5), "one value per tick, none missing"
    assert times[0] >= got["start"].timestamp() and times[-1] < got["end"].timestamp()
    # Never ahead of the live variable, and nothing outside the window / the history hours.
    assert times[-1] <= got["live"].SourceTimestamp.replace(tzinfo=timezone.utc).timestamp() + 1e-6
    assert got["future"] == [] and got["too_old"] == []

    # Exactly the signal model given the write log (the write's time is the setpoint's timestamp).
    spec = load_fleet(fleet)
    model = SignalModel(spec.spec, spec.name, "opcua")
    log = ControlLog(lag=1.0)
    log.record(ControlAction(got["written"].SourceTimestamp.replace(tzinfo=timezone.utc).timestamp(), 1, "setpoint", sensor="temperature", value=got["written"].Value.Value))
    ticks = np.round((times - model.epoch) / INTERVAL - model.phase(np.array([1]))[0]).astype(np.int64)
    block = model.block(np.full(len(ticks), 1), ticks, log)
    for dv, value, quality in zip(whole, block.values[:, 0], block.quality[:, 0]):
        if quality == 2:
            assert dv.StatusCode.value == ua.StatusCodes.BadNoCommunication and dv.Value.Value is None
        else:
            assert dv.Value.Value == value
            assert dv.StatusCode.value == (ua.StatusCodes.Good if quality == 0 else ua.StatusCodes.UncertainLastUsableValue)
    plain = model.block(np.full(len(ticks), 1), ticks)
    # Compare the ticks after the write that carry a value: the last few ticks can all be a
    # dropout (NaN in both), which says nothing about the write.
    after = (times > got["written"].SourceTimestamp.replace(tzinfo=timezone.utc).timestamp() + 1.0) & ~np.isnan(block.values[:, 0])
    assert after.any(), "values served after the write"
    assert not np.allclose(block.values[after, 0], plain.values[after, 0]), "the write shows in the history"

    # Continuation points: pages of at most 7 that add up to the whole, in order, none twice.
    pages = got["pages"]
    assert len(pages) > 1 and all(len(p) <= 7 for p in pages)
    assert [dv.SourceTimestamp for p in pages for dv in p] == [dv.SourceTimestamp for dv in whole]
    # StartTime > EndTime: newest first, the same values.
    backwards = [dv for p in got["backwards"] for dv in p]
    assert all(len(p) <= 5 for p in got["backwards"])
    assert [dv.SourceTimestamp for dv in backwards] == [dv.SourceTimestamp for dv in reversed(whole)]


def test_asyncua_internals_the_model_history_relies_on():
    """simulators/opcua_history.py implements HistoryStorageInterface and installs it with
    HistoryManager.set_storage; the manager must still call read_node_history(node, start, end,
    count), pack the returned datetime as the continuation point and take it as the next start."""
    from asyncua.server.history import HistoryManager, HistoryStorageInterface

    assert list(inspect.signature(HistoryStorageInterface.read_node_history).parameters) == ["self", "node_id", "start", "end", "nb_values"]
    assert list(inspect.signature(HistoryManager.set_storage).parameters) == ["self", "storage"]
    source = inspect.getsource(HistoryManager._read_datavalue_history)
    assert "starttime = ua.ua_binary.Primitives.DateTime.unpack(Buffer(rv.ContinuationPoint))" in source
    assert "self.storage.read_node_history(rv.NodeId, starttime, details.EndTime, details.NumValuesPerNode)" in source
    assert "cont = ua.ua_binary.Primitives.DateTime.pack(cont)" in source
    assert HistoryStorageInterface().max_history_data_response_size == 10000
