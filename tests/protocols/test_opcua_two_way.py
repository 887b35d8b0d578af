"""Two-way OPC UA (spec.protocols.opcua.writable) with asyncua's own client against the real
simulator and collector processes: a setpoint write moves the signal, is logged, lands in the
events table beside the dataset, and the readings stay exactly accounted."""

from __future__ import annotations

import asyncio
import inspect
import time

import numpy as np
import pandas as pd
import pytest
from asyncua import Client, ua

from sensorfleet.controls import ControlAction, ControlLog
from sensorfleet.events import read_events
from sensorfleet.signals import SignalModel, device_index
from sensorfleet.spec import load_fleet

SENSORS = 3
STORED = "sensorfleet_readings_stored_total"
NS_URI = "urn:sensorfleet:proto"
LAG = 1.0


def control_log_from_events(events: pd.DataFrame, lag: float) -> ControlLog:
    """The simulator's write log, rebuilt from nothing but the stored events."""
    log = ControlLog(lag=lag)
    for e in events.itertuples():
        log.record(ControlAction(e.ts.timestamp(), device_index(e.device), e.action, sensor=e.sensor if e.action == "setpoint" else None,
                                 value=e.value if e.action == "setpoint" else None, fault=e.fault if e.action == "fault" else None,
                                 duration=e.duration if e.action == "fault" else 0.0))
    return log


def assert_values_match_model_given(df: pd.DataFrame, fleet_path, log: ControlLog) -> None:
    fleet = load_fleet(fleet_path)
    model = SignalModel(fleet.spec, fleet.name, "opcua")
    names = [s.name for s in fleet.spec.sensors]
    block = model.block(np.array([device_index(d) for d in df["device"]]), df["seq"].to_numpy(), log)
    readings = model.readings(block)
    for i, row in enumerate(df.itertuples()):
        expected = readings[i * len(names) + names.index(row.sensor)]
        assert row.quality == expected.quality, (row, expected)
        if expected.value is None:
            assert pd.isna(row.value)
        else:
            assert row.value == pytest.approx(expected.value, rel=1e-12, abs=1e-9), (row, expected)


async def _write_setpoints(url: str) -> dict:
    async with Client(url) as client:
        ns = await client.get_namespace_index(NS_URI)
        sp = client.get_node(ua.NodeId("opcua-00001/TemperatureSetpoint", ns))
        nominal = await sp.read_value()
        refused = {}
        for name, variant in (("range", ua.Variant(1e6, ua.VariantType.Double)), ("type", ua.Variant("hot", ua.VariantType.String))):
            try:
                await sp.write_value(ua.DataValue(variant))
            except ua.UaStatusCodeError as exc:
                refused[name] = exc.code
        await sp.write_value(ua.DataValue(ua.Variant(nominal + 15.0, ua.VariantType.Double)))
        after = await sp.read_data_value()
        return {"nominal": nominal, "refused": refused, "after": after}


def test_a_setpoint_write_moves_the_signal_is_stored_as_an_event_and_nothing_is_lost(write_fleet, procs, h, tmp_path, tcp_port):
    devices = 3
    fleet = write_fleet("opcua", devices=devices, interval=0.25, writable=True, setpointLagSeconds=LAG)
    data = tmp_path / "data"
    url = f"opc.tcp://127.0.0.1:{tcp_port}/"
    sim = h.start_simulator(procs, "opcua", fleet, tmp_path, tcp_port)
    col = h.start_collector(procs, "opcua", fleet, tmp_path, data, url)
    h.wait_until(lambda: col.metric(STORED) >= 8 * devices * SENSORS, 60, message="readings stored before the write")
    wrote = asyncio.run(_write_setpoints(url))
    assert wrote["refused"] == {"range": ua.StatusCodes.BadOutOfRange, "type": ua.StatusCodes.BadTypeMismatch}
    assert wrote["after"].Value.Value == wrote["nominal"] + 15.0
    # Long enough for the response to settle (8 lags), then a few more rounds stored.
    time.sleep(max(0.0, wrote["after"].SourceTimestamp.timestamp() + 8 * LAG - time.time()))
    stored_then = col.metric(STORED)
    h.wait_until(lambda: col.metric(STORED) >= stored_then + 8 * devices * SENSORS, 60, message="readings after the write settled")
    # Exact accounting while the setpoint changed: a write is not a loss.
    df = h.stop_both_and_check_nothing_lost(sim, col, data, "opcua")
    assert "control: opcua-00001: temperature setpoint" in sim.log()

    # The write is in the events table, and the events alone reproduce every stored value.
    events = read_events(str(data))
    assert len(events) == 1, events
    event = events.iloc[0]
    assert (event["device"], event["action"], event["sensor"], event["value"], event["protocol"]) == ("opcua-00001", "setpoint", "temperature", wrote["nominal"] + 15.0, "opcua")
    assert abs(event["ts"].timestamp() - wrote["after"].SourceTimestamp.timestamp()) < 1e-3
    assert_values_match_model_given(df, fleet, control_log_from_events(events, LAG))

    # The signal followed the step with the lag (resolution 0.1 on both sides: rounding only);
    # the other devices and sensors did not move.
    fleet_spec = load_fleet(fleet)
    model = SignalModel(fleet_spec.spec, fleet_spec.name, "opcua")
    after = df[(df["ts"] > event["ts"]) & (df["quality"] == "good")]
    plain = model.readings(model.block(np.array([device_index(d) for d in after["device"]]), after["seq"].to_numpy()))
    names = [s.name for s in fleet_spec.spec.sensors]
    settled = 0
    for i, row in enumerate(after.itertuples()):
        base = plain[i * SENSORS + names.index(row.sensor)]
        if base.quality != "good":
            continue
        if (row.device, row.sensor) == ("opcua-00001", "temperature"):
            elapsed = (row.ts - event["ts"]).total_seconds()
            assert row.value - base.value == pytest.approx(15.0 * (1 - np.exp(-elapsed / LAG)), abs=0.101)
            settled += elapsed > 6 * LAG
        else:
            assert row.value == base.value
    assert settled >= 1, "readings long after the write were stored (good ones: this fleet has many stuck-at runs and dropouts)"


async def _call_methods(url: str) -> dict:
    async with Client(url) as client:
        ns = await client.get_namespace_index(NS_URI)
        device = client.get_node(ua.NodeId("opcua-00002", ns))
        inject = ua.NodeId("opcua-00002/InjectFault", ns)
        refused = {}
        for name, args in (("kind", [ua.Variant("meltdown", ua.VariantType.String), ua.Variant(1.0, ua.VariantType.Double)]),
                           ("duration", [ua.Variant("dropout", ua.VariantType.String), ua.Variant(-1.0, ua.VariantType.Double)]),
                           ("missing", [ua.Variant("dropout", ua.VariantType.String)])):
            try:
                await device.call_method(inject, *args)
            except ua.UaStatusCodeError as exc:
                refused[name] = exc.code
        arguments = await client.get_node(ua.NodeId("opcua-00002/InjectFault/InputArguments", ns)).read_value()
        await device.call_method(inject, ua.Variant("dropout", ua.VariantType.String), ua.Variant(1.5, ua.VariantType.Double))
        injected_at = time.time()
        await asyncio.sleep(2.5)
        await device.call_method(inject, ua.Variant("level_shift", ua.VariantType.String), ua.Variant(3600.0, ua.VariantType.Double))
        await asyncio.sleep(1.0)
        sp = client.get_node(ua.NodeId("opcua-00002/HumiditySetpoint", ns))
        nominal = await sp.read_value()
        await sp.write_value(ua.DataValue(ua.Variant(nominal - 10.0, ua.VariantType.Double)))
        await asyncio.sleep(1.0)
        await device.call_method(ua.NodeId("opcua-00002/Reset", ns))
        after_reset = await sp.read_value()
        return {"refused": refused, "arguments": [(a.Name, a.DataType) for a in arguments], "injected_at": injected_at, "nominal": nominal, "after_reset": after_reset}


def test_inject_fault_and_reset_change_the_signal_and_are_stored_as_events(write_fleet, procs, h, tmp_path, tcp_port):
    devices = 3
    fleet = write_fleet("opcua", devices=devices, interval=0.25, writable=True, setpointLagSeconds=LAG,
                        anomalies={"spikeProbability": 0, "stuckProbability": 0, "dropoutProbability": 0})
    data = tmp_path / "data"
    url = f"opc.tcp://127.0.0.1:{tcp_port}/"
    sim = h.start_simulator(procs, "opcua", fleet, tmp_path, tcp_port)
    col = h.start_collector(procs, "opcua", fleet, tmp_path, data, url)
    h.wait_until(lambda: col.metric(STORED) >= 8 * devices * SENSORS, 60, message="readings stored before the calls")
    called = asyncio.run(_call_methods(url))
    assert called["refused"] == {"kind": ua.StatusCodes.BadInvalidArgument, "duration": ua.StatusCodes.BadInvalidArgument, "missing": ua.StatusCodes.BadArgumentsMissing}
    assert called["arguments"] == [("kind", ua.NodeId(ua.ObjectIds.String)), ("durationSeconds", ua.NodeId(ua.ObjectIds.Double))]
    assert called["after_reset"] == called["nominal"], "Reset puts the setpoint back to the nominal level"
    stored_then = col.metric(STORED)
    h.wait_until(lambda: col.metric(STORED) >= stored_then + 8 * devices * SENSORS, 60, message="readings after the reset")
    df = h.stop_both_and_check_nothing_lost(sim, col, data, "opcua")
    events = read_events(str(data))
    assert list(events["action"]) == ["fault", "fault", "setpoint", "reset"], events
    assert list(events["fault"][:2]) == ["dropout", "level_shift"] and list(events["duration"][:2]) == [1.5, 3600.0]
    assert set(events["device"]) == {"opcua-00002"}
    assert_values_match_model_given(df, fleet, control_log_from_events(events, LAG))
    # The injected dropout: every sensor of the device reported no value for 1.5 s (6 ticks), and
    # only then; the level shift ended with the reset.
    start = events["ts"].iloc[0]
    mine = df[df["device"] == "opcua-00002"]
    window = mine[(mine["ts"] > start) & (mine["ts"] <= start + pd.Timedelta(seconds=1.5))]
    assert len(window) == 6 * SENSORS and (window["quality"] == "bad").all() and window["value"].isna().all()
    assert (df.loc[~df.index.isin(window.index), "quality"] == "good").all()


def test_asyncua_internals_the_control_service_relies_on():
    """simulators/opcua_control.py replaces InternalServer.attribute_service with a subclass of
    AttributeService; the session must still send every Write through that attribute."""
    from asyncua.server.address_space import AttributeService
    from asyncua.server.internal_server import InternalServer
    from asyncua.server.internal_session import InternalSession

    assert "self.attribute_service = AttributeService(self.aspace)" in inspect.getsource(InternalServer.__init__)
    assert "self.iserver.attribute_service.write(params, user=user)" in inspect.getsource(InternalSession.write)
    assert list(inspect.signature(AttributeService.write).parameters) == ["self", "params", "user"]
    assert list(inspect.signature(AttributeService.__init__).parameters) == ["self", "aspace"]
    # Methods: asyncua calls the callback with the object id, then the input Variants as they came.
    from asyncua.server.address_space import MethodService

    assert "self._run_method(node.call, method.ObjectId, *method.InputArguments)" in inspect.getsource(MethodService._call)


async def _push_over_the_limit_and_back(url: str) -> None:
    async with Client(url) as client:
        ns = await client.get_namespace_index(NS_URI)
        sp = client.get_node(ua.NodeId("opcua-00001/TemperatureSetpoint", ns))
        await sp.write_value(ua.DataValue(ua.Variant((await sp.read_value()) + 25.0, ua.VariantType.Double)))
        await asyncio.sleep(3.0)
        await client.get_node(ua.NodeId("opcua-00001", ns)).call_method(ua.NodeId("opcua-00001/Reset", ns))
        await asyncio.sleep(3.0)


def test_a_limit_crossing_raises_an_alarm_event_and_its_return_clears_it(write_fleet, procs, h, tmp_path, tcp_port):
    fleet = write_fleet("opcua", devices=3, interval=0.25, writable=True, setpointLagSeconds=0.5, limitAlarms={"temperature": {"high": 40.0}},
                        anomalies={"spikeProbability": 0, "stuckProbability": 0, "dropoutProbability": 0})
    data = tmp_path / "data"
    url = f"opc.tcp://127.0.0.1:{tcp_port}/"
    sim = h.start_simulator(procs, "opcua", fleet, tmp_path, tcp_port)
    col = h.start_collector(procs, "opcua", fleet, tmp_path, data, url)
    h.wait_until(lambda: col.metric(STORED) >= 8 * 3 * SENSORS, 60, message="readings stored before the write")
    asyncio.run(_push_over_the_limit_and_back(url))
    df = h.stop_both_and_check_nothing_lost(sim, col, data, "opcua")

    events = read_events(str(data))
    limits = events[events["action"].str.startswith("limit_")]
    assert set(limits["device"]) == {"opcua-00001"} and set(limits["sensor"]) == {"temperature"}, limits
    assert limits["action"].iloc[0] == "limit_high" and limits["action"].iloc[-1] == "limit_normal"
    assert (limits.loc[limits["action"] == "limit_high", "value"] > 40.0).all() and (limits.loc[limits["action"] == "limit_normal", "value"] <= 40.0).all()
    # Each alarm is a stored reading: same time, same value.
    first = limits.iloc[0]
    stored = df[(df["device"] == "opcua-00001") & (df["sensor"] == "temperature") & (df["ts"] == first["ts"])]
    assert len(stored) == 1 and stored["value"].iloc[0] == first["value"]
    assert list(events.loc[~events["action"].str.startswith("limit_"), "action"]) == ["setpoint", "reset"]
