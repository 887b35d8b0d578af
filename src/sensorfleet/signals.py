"""The signal model: (device, sensor, tick) -> reading. Pure, seeded, vectorised, no I/O.

Every random draw is a counter-based hash of (seed, protocol, device, sensor, tick, stream), so the
same seed and time always give the same value, in any process, in any order, with no state carried
between calls. That is what lets simulator replicas, restarts and `sensorfleet generate` agree.

A reading of device d at tick k is taken at `epoch + (k + phase_d) * interval`; the per-device
phase spreads a fleet's readings evenly over each interval instead of in one burst.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from sensorfleet.reading import Reading
from sensorfleet.spec import FleetSpec, SensorSpec

QUALITY_GOOD, QUALITY_UNCERTAIN, QUALITY_BAD = 0, 1, 2
QUALITY_NAMES = ("good", "uncertain", "bad")
ANOMALY_NONE, ANOMALY_SPIKE, ANOMALY_STUCK, ANOMALY_DROPOUT = 0, 1, 2, 3
ANOMALY_NAMES: tuple[str | None, ...] = (None, "spike", "stuck", "dropout")

# Independent random streams; a new draw gets a new number, never reuses one.
_STREAM_NOISE_A, _STREAM_NOISE_B, _STREAM_DEVICE_OFFSET_A, _STREAM_DEVICE_OFFSET_B = 1, 2, 3, 4
_STREAM_DRIFT_SCALE, _STREAM_PHASE, _STREAM_SPIKE, _STREAM_SPIKE_SIGN = 5, 6, 7, 8
_STREAM_STUCK, _STREAM_STUCK_PHASE, _STREAM_DROPOUT, _STREAM_DROPOUT_PHASE = 9, 10, 11, 12

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-distributed 64-bit hash of a 64-bit counter."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _uniform(key: int, device: np.ndarray, sensor: int, tick: np.ndarray, stream: int) -> np.ndarray:
    """Uniform [0, 1) draws, one per element, a pure function of their arguments."""
    with np.errstate(over="ignore"):
        h = _mix(np.uint64(key) ^ (np.uint64(stream) * _GOLDEN))
        h = _mix(h ^ (device.astype(np.uint64) * _M1))
        h = _mix(h ^ np.uint64(sensor + 1) * _M2)
        h = _mix(h ^ tick.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _normal(key: int, device: np.ndarray, sensor: int, tick: np.ndarray, streams: tuple[int, int]) -> np.ndarray:
    """Standard normal draws by Box-Muller over two independent uniform streams."""
    u1 = _uniform(key, device, sensor, tick, streams[0])
    u2 = _uniform(key, device, sensor, tick, streams[1])
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def device_id(protocol: str, index: int) -> str:
    return f"{protocol}-{index:05d}"


def device_index(device: str) -> int:
    return int(device.rsplit("-", 1)[1])


@dataclass(frozen=True)
class TickBlock:
    """Readings of many (device, tick) pairs: arrays of shape (n,) and (n, n_sensors)."""

    devices: np.ndarray  # device indices
    ticks: np.ndarray  # sequence numbers
    times: np.ndarray  # source timestamps, seconds since the Unix epoch
    values: np.ndarray  # float64, NaN where quality is bad
    quality: np.ndarray  # uint8 codes, QUALITY_*
    anomaly: np.ndarray  # uint8 codes, ANOMALY_*


class SignalModel:
    """Realistic sensor series for one protocol's devices of one fleet."""

    def __init__(self, spec: FleetSpec, fleet: str, protocol: str, interval: float | None = None):
        self.spec = spec
        self.fleet = fleet
        self.protocol = protocol
        self.sensors: list[SensorSpec] = list(spec.sensors)
        self.interval = float(interval if interval is not None else spec.protocol(protocol).interval)
        self.epoch = spec.epoch.timestamp()
        # crc32, not hash(): str hashes are salted per process and replicas must agree.
        self.key = (spec.seed << 32) ^ zlib.crc32(f"{fleet}/{protocol}".encode())

    # --- time <-> tick --------------------------------------------------------------------------
    def phase(self, devices: np.ndarray) -> np.ndarray:
        return _uniform(self.key, devices, -1, np.zeros_like(devices), _STREAM_PHASE)

    def tick_times(self, devices: np.ndarray, ticks: np.ndarray) -> np.ndarray:
        return self.epoch + (ticks + self.phase(devices)) * self.interval

    def current_tick(self, devices: np.ndarray, now: float) -> np.ndarray:
        """Latest tick of each device whose time is not after `now`."""
        return np.floor((now - self.epoch) / self.interval - self.phase(devices)).astype(np.int64)

    # --- values -----------------------------------------------------------------------------------
    def _clean(self, s: int, devices: np.ndarray, ticks: np.ndarray, times: np.ndarray) -> np.ndarray:
        sensor = self.sensors[s]
        hour = (times % 86400.0) / 3600.0
        cycle = sensor.daily_amplitude * np.cos(2.0 * np.pi * (hour - sensor.peak_hour) / 24.0)
        days = (times - self.epoch) / 86400.0
        drift_scale = 0.5 + _uniform(self.key, devices, s, np.zeros_like(devices), _STREAM_DRIFT_SCALE)
        offset = sensor.device_spread * _normal(
            self.key, devices, s, np.zeros_like(devices), (_STREAM_DEVICE_OFFSET_A, _STREAM_DEVICE_OFFSET_B)
        )
        z = _normal(self.key, devices, s, ticks, (_STREAM_NOISE_A, _STREAM_NOISE_B))
        if s > 0 and sensor.noise_coupling:
            rho = sensor.noise_coupling
            z0 = _normal(self.key, devices, 0, ticks, (_STREAM_NOISE_A, _STREAM_NOISE_B))
            z = rho * z0 + np.sqrt(1.0 - rho * rho) * z
        return sensor.baseline + offset + cycle + sensor.drift_per_day * days * drift_scale + sensor.noise * z

    def _in_run(self, s: int, devices: np.ndarray, ticks: np.ndarray, length: int, probability: float, streams: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Whether each tick lies in a run (stuck-at or dropout) and the tick the run started at.

        Time is cut into blocks of `length` ticks (shifted per device so fleets don't fail in
        step); a block is a run with `probability`, so that fraction of readings is affected.
        """
        shift = np.floor(_uniform(self.key, devices, s, np.zeros_like(devices), streams[1]) * length).astype(np.int64)
        block = (ticks + shift) // length
        in_run = _uniform(self.key, devices, s, block, streams[0]) < probability
        return in_run, block * length - shift

    def block(self, devices: np.ndarray, ticks: np.ndarray) -> TickBlock:
        """All sensors of the given (device, tick) pairs."""
        devices = np.asarray(devices, dtype=np.int64)
        ticks = np.asarray(ticks, dtype=np.int64)
        times = self.tick_times(devices, ticks)
        n, m = len(devices), len(self.sensors)
        values = np.empty((n, m))
        quality = np.zeros((n, m), dtype=np.uint8)
        anomaly = np.zeros((n, m), dtype=np.uint8)
        a = self.spec.anomalies
        for s, sensor in enumerate(self.sensors):
            v = self._clean(s, devices, ticks, times)
            # Spikes: single readings pushed up or down by a multiple of the noise.
            spike = _uniform(self.key, devices, s, ticks, _STREAM_SPIKE) < a.spike_probability
            if spike.any():
                scale = sensor.noise if sensor.noise > 0 else 0.01 * (sensor.max - sensor.min)
                sign = np.where(_uniform(self.key, devices, s, ticks, _STREAM_SPIKE_SIGN) < 0.5, -1.0, 1.0)
                v = np.where(spike, v + sign * a.spike_magnitude * scale, v)
                anomaly[:, s] = np.where(spike, ANOMALY_SPIKE, ANOMALY_NONE)
            # Stuck-at: the value freezes at the run's first reading.
            stuck, start = self._in_run(s, devices, ticks, a.stuck_duration, a.stuck_probability, (_STREAM_STUCK, _STREAM_STUCK_PHASE))
            if stuck.any():
                frozen = self._clean(s, devices[stuck], start[stuck], self.tick_times(devices[stuck], start[stuck]))
                v[stuck] = frozen
                anomaly[stuck, s] = ANOMALY_STUCK
                quality[stuck, s] = QUALITY_UNCERTAIN
            v = np.clip(v, sensor.min, sensor.max)
            # Dropout: the sensor reports no value at all.
            dropout, _ = self._in_run(s, devices, ticks, a.dropout_duration, a.dropout_probability, (_STREAM_DROPOUT, _STREAM_DROPOUT_PHASE))
            if dropout.any():
                v[dropout] = np.nan
                anomaly[dropout, s] = ANOMALY_DROPOUT
                quality[dropout, s] = QUALITY_BAD
            values[:, s] = v
        return TickBlock(devices, ticks, times, values, quality, anomaly)

    def readings(self, block: TickBlock) -> list[Reading]:
        """The block as Reading objects (the slow, general path; hot paths encode arrays directly)."""
        out: list[Reading] = []
        for i, (d, k, t) in enumerate(zip(block.devices.tolist(), block.ticks.tolist(), block.times.tolist())):
            ts = datetime.fromtimestamp(t, tz=timezone.utc)
            dev = device_id(self.protocol, d)
            for s, sensor in enumerate(self.sensors):
                q = int(block.quality[i, s])
                value = None if q == QUALITY_BAD else float(block.values[i, s])
                out.append(Reading(self.fleet, self.protocol, dev, sensor.name, value, sensor.unit, ts, k, QUALITY_NAMES[q], ANOMALY_NAMES[block.anomaly[i, s]]))
        return out

    def reading_at(self, device: int, sensor: str, when: datetime) -> Reading:
        """The reading a device reports for one sensor at (or just before) a moment."""
        devices = np.array([device])
        tick = self.current_tick(devices, when.timestamp())
        s = [x.name for x in self.sensors].index(sensor)
        return self.readings(self.block(devices, tick))[s]


def shard_devices(total: int, replicas: int, index: int) -> range:
    """The contiguous device indices replica `index` of `replicas` simulates."""
    if not 0 <= index < replicas:
        raise ValueError(f"replica index {index} outside 0..{replicas - 1}")
    per, extra = divmod(total, replicas)
    start = index * per + min(index, extra)
    return range(start, start + per + (1 if index < extra else 0))


def utc(ts: float) -> datetime:
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=ts)
