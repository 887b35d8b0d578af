"""What clients did to simulated devices: setpoint writes, injected faults, resets. Pure, no I/O.

Two-way OPC UA (spec.protocols.opcua.writable) lets any client act on a device. Each action is one
`ControlAction` in a `ControlLog`; the signal model takes the log as an input, so a device's value
is a pure function of (seed, device, time, log): the same writes give the same series, live and
in HistoryRead, in any order of evaluation.

- setpoint: the sensor's level moves from where it is toward the setpoint with a first-order lag
  of time constant `lag` (63% after one `lag`). The setpoint is measured against the device's
  nominal level (`SignalModel.nominal`: baseline + its fixed offset), so writing the nominal level
  changes nothing and the model's own movements (daily cycle, weather, noise, faults) stay on top.
- fault: every sensor of the device shows the fault `kind` (one of `reading.ANOMALIES`, labelled
  like the model's own faults) from the call for `duration` seconds.
- reset: every setpoint returns to the nominal level (with the same lag) and injected faults end.

An action takes effect for readings strictly after its time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sensorfleet.reading import ANOMALIES

ACTIONS = ("setpoint", "fault", "reset")


@dataclass(frozen=True)
class ControlAction:
    time: float  # seconds since the Unix epoch (the server's clock when the action arrived)
    device: int  # device index
    action: str  # one of ACTIONS
    sensor: str | None = None  # setpoint: the sensor
    value: float | None = None  # setpoint: the new setpoint, in the sensor's unit
    fault: str | None = None  # fault: the kind
    duration: float = 0.0  # fault: seconds
    client: str = ""  # who, for the log and the event (session name); no effect on the signal

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action: expected one of {ACTIONS}, got {self.action!r}")
        if self.action == "setpoint" and (self.sensor is None or self.value is None or not math.isfinite(self.value)):
            raise ValueError(f"setpoint of device {self.device}: needs a sensor and a finite value, got {self.sensor!r} = {self.value!r}")
        if self.action == "fault":
            if self.fault not in ANOMALIES:
                raise ValueError(f"kind: expected one of {', '.join(ANOMALIES)}, got {self.fault!r}")
            if not (math.isfinite(self.duration) and self.duration > 0):
                raise ValueError(f"durationSeconds: expected a positive number, got {self.duration!r}")


@dataclass
class ControlLog:
    """Every action, in arrival order, indexed by device."""

    lag: float  # seconds, time constant of the setpoint response
    actions: list[ControlAction] = field(default_factory=list)
    _by_device: dict[int, list[ControlAction]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.lag > 0:
            raise ValueError(f"setpointLagSeconds: must be > 0, got {self.lag}")
        for action in list(self.actions):
            self._by_device.setdefault(action.device, []).append(action)

    def record(self, action: ControlAction) -> None:
        previous = self._by_device.get(action.device)
        if previous and action.time < previous[-1].time:
            raise ValueError(f"device {action.device}: action at {action.time} is older than the last one ({previous[-1].time}); the log is in time order")
        self.actions.append(action)
        self._by_device.setdefault(action.device, []).append(action)

    def devices(self) -> np.ndarray:
        return np.fromiter(self._by_device, dtype=np.int64, count=len(self._by_device))

    def of(self, device: int) -> list[ControlAction]:
        return self._by_device.get(device, [])

    def setpoint(self, device: int, sensor: str, nominal: float, at: float) -> float:
        """The setpoint in force at time `at` (the nominal level when none was written or after a reset)."""
        current = nominal
        for a in self.of(device):
            if a.time >= at:
                break
            if a.action == "reset":
                current = nominal
            elif a.action == "setpoint" and a.sensor == sensor:
                current = float(a.value)  # type: ignore[arg-type]
        return current

    def offset(self, device: int, sensor: str, nominal: float, times: np.ndarray) -> np.ndarray | None:
        """Lagged offset of the sensor's level at `times` (None when no action moves it).

        The target offset steps by delta_i at t_i; a first-order lag's response to a step is
        delta_i * (1 - exp(-(t - t_i) / lag)) for t > t_i, and responses add up."""
        steps: list[tuple[float, float]] = []
        target = 0.0
        for a in self.of(device):
            if a.action == "reset":
                new = 0.0
            elif a.action == "setpoint" and a.sensor == sensor:
                new = float(a.value) - nominal  # type: ignore[arg-type]
            else:
                continue
            if new != target:
                steps.append((a.time, new - target))
                target = new
        if not steps:
            return None
        out = np.zeros(len(times))
        for t0, delta in steps:
            after = times > t0
            out[after] += delta * -np.expm1(-(times[after] - t0) / self.lag)
        return out

    def fault_windows(self, device: int) -> list[tuple[str, float, float]]:
        """(kind, start, end) of the device's injected faults; a reset ends those running."""
        windows: list[tuple[str, float, float]] = []
        for a in self.of(device):
            if a.action == "fault":
                windows.append((a.fault, a.time, a.time + a.duration))  # type: ignore[arg-type]
            elif a.action == "reset":
                windows = [(k, s, min(e, a.time)) for k, s, e in windows]
        return [(k, s, e) for k, s, e in windows if e > s]
