"""Limit alarms of the OPC UA simulator (spec.protocols.opcua.limitAlarms): each time a device's
value of a sensor with limits crosses one, a `SensorFleetLimitEventType` event (a BaseEventType
subtype in the fleet's namespace) goes out from the Server object, with SourceNode = the sensor
variable, Time = the reading's source timestamp and the fields Device, Sensor, Value, Limit and
State (`high`, `low` or `normal` when the value is back within its limits).

These are plain events, not OPC UA Alarms & Conditions (no ConditionType instances, no
acknowledgement, no ConditionRefresh): a client subscribed to the Server's events sees each
crossing once. A dropout (no value) keeps the state. The first reading of a device already
beyond a limit raises the alarm. Derived from the served values, so deterministic like them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from asyncua import Server, ua

log = logging.getLogger("sensorfleet.simulators.opcua.alarms")

LIMIT_EVENT_TYPE = "SensorFleetLimitEventType"
LIMIT_EVENT_FIELDS = (("Device", ua.VariantType.String), ("Sensor", ua.VariantType.String), ("Value", ua.VariantType.Double),
                      ("Limit", ua.VariantType.Double), ("State", ua.VariantType.String))
STATES = {1: "high", -1: "low", 0: "normal"}


class LimitAlarms:
    def __init__(self, model: Any, cfg: Any, ns: int, devices: list[str]):
        self.ns = ns
        self.devices = devices
        self.names = [s.name for s in model.sensors]
        self.units = [s.unit for s in model.sensors]
        inf = math.inf
        self.limits = [(s, -inf if cfg.limit_alarms[n].low is None else cfg.limit_alarms[n].low, inf if cfg.limit_alarms[n].high is None else cfg.limit_alarms[n].high)
                       for s, n in enumerate(self.names) if n in cfg.limit_alarms]
        self.state = np.zeros((len(devices), len(self.names)), dtype=np.int8)
        self.event: Any = None
        self.emitted = 0

    async def install(self, server: Server) -> None:
        etype = await server.create_custom_event_type(self.ns, LIMIT_EVENT_TYPE, ua.ObjectIds.BaseEventType, list(LIMIT_EVENT_FIELDS))
        self.event = await server.get_event_generator(etype, ua.ObjectIds.Server)

    async def check(self, rows: np.ndarray, values: np.ndarray, times: list[Any]) -> None:
        """rows: the devices of this round; values: their readings (n, n_sensors); times: source timestamps."""
        for s, low, high in self.limits:
            v = values[:, s]
            before = self.state[rows, s]
            now = np.where(np.isnan(v), before, np.where(v > high, 1, np.where(v < low, -1, 0))).astype(np.int8)
            self.state[rows, s] = now
            for j in np.nonzero(now != before)[0].tolist():
                state = int(now[j])
                limit = high if state == 1 else low if state == -1 else (high if before[j] == 1 else low)
                await self._emit(int(rows[j]), s, float(v[j]), float(limit), STATES[state], times[j])

    async def _emit(self, row: int, s: int, value: float, limit: float, state: str, when: Any) -> None:
        device, sensor = self.devices[row], self.names[s]
        ev = self.event.event
        ev.SourceNode = ua.NodeId(f"{device}/{sensor}", self.ns)
        ev.SourceName = f"{device}/{sensor}"
        ev.Severity = 100 if state == "normal" else 700
        ev.Device, ev.Sensor, ev.Value, ev.Limit, ev.State = device, sensor, value, limit, state
        where = "back within" if state == "normal" else "above" if state == "high" else "below"
        await self.event.trigger(time_attr=when, message=f"{device}/{sensor} {value:g} {self.units[s]} {where} {'its limits' if state == 'normal' else f'the {state} limit {limit:g}'}")
        self.emitted += 1
