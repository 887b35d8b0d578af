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
    h.wait_until(lambda: col.metric(STORED) >= stored_then + 4 * devices * SENSORS, 60, message="readings after the write settled")
    produced = h.stop(sim)
    time.sleep(1.5)
    collected = h.stop(col)
    assert "control: opcua-00001: temperature setpoint" in sim.log()

    # Exact accounting while the setpoint changed: a write is not a loss.
    df = h.stored_frame(data, "opcua")
    assert collected["lost"] == 0 and collected["duplicates"] == 0 and collected["malformed"] == 0, collected
    span, rows = h.seq_accounting(df)
    assert span == rows and h.last_tick_sum(df) == produced["last_tick_sum"]

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
    assert settled >= 4, "readings long after the write were stored"


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
