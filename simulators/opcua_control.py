"""Two-way OPC UA (spec.protocols.opcua.writable): what clients may do to a simulated device.

Per device, next to the sensor variables (docs/protocols.md):

    opcua-00042/
      TemperatureSetpoint       BaseDataVariableType, Double, read/write; initial value: the
                                device's nominal level (baseline + its fixed offset)
      InjectFault(kind: String, durationSeconds: Double)
                                every sensor of the device shows the fault `kind` (one of the
                                signal model's fault kinds) for that long
      Reset()                   setpoints back to the nominal levels, injected faults end

A write goes through `ControlAttributeService`, which checks it (a number within the sensor's
[min, max], else BadTypeMismatch / BadOutOfRange), stores it with the server's time as source
timestamp, records a `ControlAction` in the simulator's `ControlLog` (the signal model's input:
the sensor's value follows with a first-order lag) and emits a `SensorFleetControlEventType`
event from the Server object, which the collector stores beside the dataset.

asyncua offers no per-item veto on a write (`value_setter` cannot refuse), so the write service
is replaced by a subclass on the InternalServer -- one place, guarded by
tests/protocols/test_opcua_two_way.py::test_asyncua_internals_the_control_service_relies_on.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from typing import Any

import numpy as np
from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AttributeService

from sensorfleet.controls import ControlAction, ControlLog
from sensorfleet.reading import ANOMALIES

log = logging.getLogger("sensorfleet.simulators.opcua.control")

EVENT_TYPE = "SensorFleetControlEventType"
# (browse name, variant type) of the event's own fields, beside BaseEventType's.
EVENT_FIELDS = (("Device", ua.VariantType.String), ("Action", ua.VariantType.String), ("Sensor", ua.VariantType.String),
                ("Value", ua.VariantType.Double), ("Fault", ua.VariantType.String), ("DurationSeconds", ua.VariantType.Double), ("Client", ua.VariantType.String))
NUMERIC_VARIANTS = {ua.VariantType.Double, ua.VariantType.Float, ua.VariantType.Int16, ua.VariantType.Int32, ua.VariantType.Int64,
                    ua.VariantType.UInt16, ua.VariantType.UInt32, ua.VariantType.UInt64, ua.VariantType.Byte, ua.VariantType.SByte}


INJECT_FAULT, RESET = "InjectFault", "Reset"
MAX_FAULT_SECONDS = 7 * 86400.0
INJECT_FAULT_ARGUMENTS = (
    ("kind", ua.ObjectIds.String, f"Fault kind: one of {', '.join(ANOMALIES)}"),
    ("durationSeconds", ua.ObjectIds.Double, f"How long the fault lasts, in seconds (0 < d <= {MAX_FAULT_SECONDS:g})"),
)


def _result(status: int, inputs: list[int] | None = None) -> ua.CallMethodResult:
    return ua.CallMethodResult(StatusCode=ua.StatusCode(status), InputArgumentResults=[ua.StatusCode(c) for c in inputs or []])


def setpoint_name(sensor: str) -> str:
    """`temperature` -> `TemperatureSetpoint`, `dew_point` -> `DewPointSetpoint`."""
    return "".join(part.capitalize() for part in sensor.split("_")) + "Setpoint"


def controlled(cfg: Any, sensors: list[Any]) -> list[int]:
    """Indices of the sensors that get a setpoint."""
    names = cfg.controlled_sensors
    return [i for i, s in enumerate(sensors) if names is None or s.name in names]


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc)


class DeviceControls:
    """The write log of one simulator and what acts on it: setpoint writes, InjectFault, Reset."""

    def __init__(self, model: Any, cfg: Any, ns: int, devices: list[str], indices: np.ndarray):
        self.model = model
        self.ns = ns
        self.devices = devices
        self.indices = indices
        self.log = ControlLog(lag=cfg.setpoint_lag_seconds)
        self.sensors = controlled(cfg, model.sensors)
        # nominal[row][k]: the nominal level of controlled sensor k of device row
        self.nominal = np.stack([model.nominal(indices, s) for s in self.sensors], axis=1) if self.sensors else np.zeros((len(devices), 0))
        self.setpoints: dict[ua.NodeId, tuple[int, int]] = {}  # setpoint node -> (row, sensor index)
        for row, device in enumerate(devices):
            for s in self.sensors:
                self.setpoints[self.setpoint_node(device, s)] = (row, s)
        self.server: Server | None = None
        self.event: Any = None

    def setpoint_node(self, device: str, s: int) -> ua.NodeId:
        return ua.NodeId(f"{device}/{setpoint_name(self.model.sensors[s].name)}", self.ns)

    # --- address space ----------------------------------------------------------------------------
    def items(self, node_item: Any, attrs: Any) -> list[ua.AddNodesItem]:
        """AddNodes items of every setpoint variable (added with the rest of the address space)."""
        rw = ua.AccessLevel.CurrentRead.mask | ua.AccessLevel.CurrentWrite.mask
        out = []
        for row, device in enumerate(self.devices):
            for k, s in enumerate(self.sensors):
                sensor = self.model.sensors[s]
                name = setpoint_name(sensor.name)
                out.append(node_item(self.setpoint_node(device, s), ua.NodeId(device, self.ns), ua.ObjectIds.HasComponent, self.ns, name, ua.NodeClass.Variable,
                                     ua.ObjectIds.BaseDataVariableType,
                                     attrs(ua.VariableAttributes, name, Value=ua.Variant(float(self.nominal[row, k]), ua.VariantType.Double), DataType=ua.NodeId(ua.ObjectIds.Double),
                                           ValueRank=-1, AccessLevel=rw, UserAccessLevel=rw,
                                           Description=ua.LocalizedText(f"Setpoint of {sensor.name} in {sensor.unit}, within [{sensor.min}, {sensor.max}]; the value follows with a first-order lag"))))
            out += self._method_items(node_item, attrs, device)
        return out

    def _method_items(self, node_item: Any, attrs: Any, device: str) -> list[ua.AddNodesItem]:
        dev = ua.NodeId(device, self.ns)
        inject = ua.NodeId(f"{device}/{INJECT_FAULT}", self.ns)
        arguments = [ua.Argument(Name=name, DataType=ua.NodeId(dtype), ValueRank=-1, ArrayDimensions=[], Description=ua.LocalizedText(text))
                     for name, dtype, text in INJECT_FAULT_ARGUMENTS]
        return [
            node_item(inject, dev, ua.ObjectIds.HasComponent, self.ns, INJECT_FAULT, ua.NodeClass.Method, 0,
                      attrs(ua.MethodAttributes, INJECT_FAULT, Executable=True, UserExecutable=True,
                            Description=ua.LocalizedText("Inject a fault the signal model knows on every sensor of the device"))),
            node_item(ua.NodeId(f"{device}/{INJECT_FAULT}/InputArguments", self.ns), inject, ua.ObjectIds.HasProperty, 0, "InputArguments", ua.NodeClass.Variable,
                      ua.ObjectIds.PropertyType,
                      attrs(ua.VariableAttributes, "InputArguments", Value=ua.Variant(arguments, ua.VariantType.ExtensionObject), DataType=ua.NodeId(ua.ObjectIds.Argument),
                            ValueRank=1, ArrayDimensions=[len(arguments)], AccessLevel=ua.AccessLevel.CurrentRead.mask, UserAccessLevel=ua.AccessLevel.CurrentRead.mask)),
            node_item(ua.NodeId(f"{device}/{RESET}", self.ns), dev, ua.ObjectIds.HasComponent, self.ns, RESET, ua.NodeClass.Method, 0,
                      attrs(ua.MethodAttributes, RESET, Executable=True, UserExecutable=True,
                            Description=ua.LocalizedText("Setpoints back to the nominal levels; injected faults end"))),
        ]

    async def install(self, server: Server) -> None:
        """The write service, the methods, the event type and its generator (after the address
        space exists)."""
        self.server = server
        iserver = server.iserver
        iserver.attribute_service = ControlAttributeService(iserver.aspace, self)
        for row, device in enumerate(self.devices):
            iserver.aspace.add_method_callback(ua.NodeId(f"{device}/{INJECT_FAULT}", self.ns), self._inject_fault(row))
            iserver.aspace.add_method_callback(ua.NodeId(f"{device}/{RESET}", self.ns), self._reset(row))
        etype = await server.create_custom_event_type(self.ns, EVENT_TYPE, ua.ObjectIds.BaseEventType, list(EVENT_FIELDS))
        self.event = await server.get_event_generator(etype, ua.ObjectIds.Server)

    # --- actions ----------------------------------------------------------------------------------
    def check_setpoint(self, nodeid: ua.NodeId, value: ua.DataValue) -> tuple[ua.StatusCode | None, float]:
        """(a refusal, or None; the value as a float)."""
        _, s = self.setpoints[nodeid]
        sensor = self.model.sensors[s]
        variant = value.Value
        if variant is None or variant.VariantType not in NUMERIC_VARIANTS or variant.Value is None or isinstance(variant.Value, list):
            return ua.StatusCode(ua.StatusCodes.BadTypeMismatch), math.nan
        number = float(variant.Value)
        if not (math.isfinite(number) and sensor.min <= number <= sensor.max):
            return ua.StatusCode(ua.StatusCodes.BadOutOfRange), number
        return None, number

    async def act(self, action: ControlAction, message: str) -> None:
        """Record an action (the signal model takes it from the next reading on) and emit its event."""
        self.log.record(action)
        device = self.devices[self._row(action.device)]
        log.info("control: %s", message)
        if self.event is None:
            return
        ev = self.event.event
        ev.SourceNode = ua.NodeId(device, self.ns)
        ev.SourceName = device
        ev.Severity = 500 if action.action == "fault" else 300
        ev.Device, ev.Action, ev.Sensor = device, action.action, action.sensor or ""
        ev.Value = float(action.value) if action.value is not None else math.nan
        ev.Fault = action.fault or ""
        ev.DurationSeconds = float(action.duration)
        ev.Client = action.client
        await self.event.trigger(time_attr=_utc(action.time), message=message)

    def _row(self, device_index: int) -> int:
        return int(np.searchsorted(self.indices, device_index))

    # --- methods (asyncua calls them with the object id, then one Variant per argument) ----------
    def _inject_fault(self, row: int) -> Any:
        device = self.devices[row]

        async def inject_fault(parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
            if parent != ua.NodeId(device, self.ns):
                return _result(ua.StatusCodes.BadMethodInvalid)
            if len(args) != len(INJECT_FAULT_ARGUMENTS):
                return _result(ua.StatusCodes.BadArgumentsMissing if len(args) < len(INJECT_FAULT_ARGUMENTS) else ua.StatusCodes.BadTooManyArguments)
            kind, duration = args
            checks = [ua.StatusCodes.Good, ua.StatusCodes.Good]
            if kind.VariantType != ua.VariantType.String:
                checks[0] = ua.StatusCodes.BadTypeMismatch
            elif kind.Value not in ANOMALIES:
                checks[0] = ua.StatusCodes.BadInvalidArgument
            if duration.VariantType not in NUMERIC_VARIANTS or isinstance(duration.Value, list):
                checks[1] = ua.StatusCodes.BadTypeMismatch
            elif not (math.isfinite(float(duration.Value)) and 0 < float(duration.Value) <= MAX_FAULT_SECONDS):
                checks[1] = ua.StatusCodes.BadInvalidArgument
            if any(c != ua.StatusCodes.Good for c in checks):
                bad = next(c for c in checks if c != ua.StatusCodes.Good)
                return _result(ua.StatusCodes.BadInvalidArgument if bad == ua.StatusCodes.BadInvalidArgument else ua.StatusCodes.BadTypeMismatch, checks)
            seconds = float(duration.Value)
            await self.act(ControlAction(time.time(), int(self.indices[row]), "fault", fault=kind.Value, duration=seconds),
                           f"{device}: InjectFault({kind.Value}, {seconds:g} s)")
            return _result(ua.StatusCodes.Good, checks)

        return inject_fault

    def _reset(self, row: int) -> Any:
        device = self.devices[row]

        async def reset(parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult:
            if parent != ua.NodeId(device, self.ns):
                return _result(ua.StatusCodes.BadMethodInvalid)
            if args:
                return _result(ua.StatusCodes.BadTooManyArguments)
            at = time.time()
            await self.act(ControlAction(at, int(self.indices[row]), "reset"), f"{device}: Reset()")
            # The setpoint variables show the nominal levels again (written past the checks: ours).
            assert self.server is not None
            for k, s in enumerate(self.sensors):
                value = ua.DataValue(ua.Variant(float(self.nominal[row, k]), ua.VariantType.Double), SourceTimestamp=_utc(at), ServerTimestamp=_utc(at))
                await self.server.iserver.aspace.write_attribute_value(self.setpoint_node(device, s), ua.AttributeIds.Value, value)
            return _result(ua.StatusCodes.Good)

        return reset

    async def setpoint_written(self, nodeid: ua.NodeId, number: float, at: float, client: str) -> None:
        row, s = self.setpoints[nodeid]
        sensor = self.model.sensors[s]
        device = self.devices[row]
        await self.act(ControlAction(at, int(self.indices[row]), "setpoint", sensor=sensor.name, value=number, client=client),
                       f"{device}: {sensor.name} setpoint {number:g} {sensor.unit}" + (f" (by {client})" if client else ""))


class ControlAttributeService(AttributeService):
    """asyncua's write service, plus the checks and the write log of setpoint variables."""

    def __init__(self, aspace: Any, controls: DeviceControls):
        super().__init__(aspace)
        self.controls = controls

    async def write(self, params: ua.WriteParameters, user: User = User(role=UserRole.Admin)) -> list[ua.StatusCode]:
        setpoints = self.controls.setpoints
        if not any(w.NodeId in setpoints and w.AttributeId == ua.AttributeIds.Value for w in params.NodesToWrite):
            return await super().write(params, user)
        results: list[ua.StatusCode] = []
        for item in params.NodesToWrite:
            if item.NodeId not in setpoints or item.AttributeId != ua.AttributeIds.Value:
                results.extend(await super().write(ua.WriteParameters(NodesToWrite=[item]), user))
                continue
            refusal, number = self.controls.check_setpoint(item.NodeId, item.Value)
            if refusal is not None:
                results.append(refusal)
                continue
            at = time.time()
            stored = ua.WriteValue(NodeId=item.NodeId, AttributeId=item.AttributeId,
                                   Value=ua.DataValue(ua.Variant(number, ua.VariantType.Double), SourceTimestamp=_utc(at), ServerTimestamp=_utc(at)))
            status = (await super().write(ua.WriteParameters(NodesToWrite=[stored]), user))[0]
            if status.is_good():
                await self.controls.setpoint_written(item.NodeId, number, at, getattr(user, "name", None) or "")
            results.append(status)
        return results
