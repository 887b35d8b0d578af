"""Replay source: a recorded CSV (`timestamp, device, sensor, value[, unit]`) played back as devices.

Rows are played at their recorded offsets divided by `speed`, looped when `loop` is set. A played
reading carries the wall-clock time it is played at (it is "reported now") and a per-series
sequence number that keeps counting across loops, so collectors account for it like live data.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import fsspec
import numpy as np
import pandas as pd

from sensorfleet.reading import Reading
from sensorfleet.spec import FleetSpec, ReplaySpec

REQUIRED_COLUMNS = ("timestamp", "device", "sensor", "value")


class ReplayError(ValueError):
    pass


def load_replay_csv(url: str) -> pd.DataFrame:
    try:
        with fsspec.open(url, "r") as f:
            frame = pd.read_csv(f)
    except FileNotFoundError:
        raise ReplayError(f"spec.replay.csv: {url} does not exist") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ReplayError(f"spec.replay.csv: {url} lacks column(s) {', '.join(missing)} (needs {', '.join(REQUIRED_COLUMNS)})")
    if frame.empty:
        raise ReplayError(f"spec.replay.csv: {url} has no rows")
    ts = pd.to_datetime(frame["timestamp"], utc=True, errors="coerce")
    bad = ts.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0]) + 2  # +1 header, +1 one-based
        raise ReplayError(f"spec.replay.csv: line {row}: timestamp {frame['timestamp'].iloc[row - 2]!r} is not a date-time")
    values = pd.to_numeric(frame["value"], errors="coerce")
    frame = frame.assign(timestamp=ts, value=values, device=frame["device"].astype(str), sensor=frame["sensor"].astype(str))
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


@dataclass
class ReplaySource:
    """Plays a recording; `due(now)` returns the readings whose playback time has come."""

    fleet: str
    protocol: str
    frame: pd.DataFrame
    replay: ReplaySpec
    units: dict[str, str]
    started_at: float

    @classmethod
    def from_spec(cls, spec: FleetSpec, fleet: str, protocol: str, started_at: float) -> ReplaySource:
        assert spec.replay is not None
        frame = load_replay_csv(spec.replay.csv)
        units = {s.name: s.unit for s in spec.sensors}
        return cls(fleet, protocol, frame, spec.replay, units, started_at)

    def __post_init__(self) -> None:
        seconds = (self.frame["timestamp"] - self.frame["timestamp"].iloc[0]).dt.total_seconds().to_numpy()
        step = float(np.median(np.diff(np.unique(seconds)))) if len(np.unique(seconds)) > 1 else 1.0
        self.offsets = seconds
        self.period = float(seconds[-1] + step)  # one loop of the recording, recorded seconds
        self.index_in_series = self.frame.groupby(["device", "sensor"]).cumcount().to_numpy()
        self.series_length = self.frame.groupby(["device", "sensor"])["value"].transform("size").to_numpy()
        self.position = 0  # next row to play, counting across loops
        self.devices = sorted(self.frame["device"].unique())

    def due(self, now: float) -> list[Reading]:
        n = len(self.frame)
        out: list[Reading] = []
        while True:
            loop, row = divmod(self.position, n)
            if loop and not self.replay.loop:
                return out
            play_at = self.started_at + (loop * self.period + self.offsets[row]) / self.replay.speed
            if play_at > now:
                return out
            r = self.frame.iloc[row]
            value = None if pd.isna(r["value"]) else float(r["value"])
            unit = str(r["unit"]) if "unit" in self.frame.columns and not pd.isna(r["unit"]) else self.units.get(r["sensor"], "")
            seq = int(loop * self.series_length[row] + self.index_in_series[row])
            out.append(Reading(self.fleet, self.protocol, r["device"], r["sensor"], value, unit or "1", datetime.fromtimestamp(play_at, tz=timezone.utc), seq, "good" if value is not None else "bad", None))
            self.position += 1
