"""The signal model: (device, sensor, tick) -> reading. Pure, seeded, vectorised, no I/O.

Every random draw is a counter-based hash of (seed, protocol, device, sensor, tick, stream), so the
same seed and time always give the same value, in any process, in any order, with no state carried
between calls. That is what lets simulator replicas, restarts and `sensorfleet generate` agree.

A reading of device d at tick k is taken at `epoch + (k + phase_d) * interval`; the per-device
phase spreads a fleet's readings evenly over each interval instead of in one burst.

On top of baseline + daily cosine + drift + noise, `spec.realism` adds what real plants show
(each still O(1) per reading and stateless): a weather-like slow component shared by a site's
devices (a sum of seeded random-period, random-phase sinusoids with a red spectrum), a weekday
occupancy pattern, setpoint steps, noise that grows as a sensor ages, per-device gain errors,
quantization and outages that take a whole site off line. Faults that last a window (drift,
level shift, noise burst, oscillation) are labelled on every reading of their window.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from sensorfleet.controls import ControlLog
from sensorfleet.reading import ANOMALIES, Reading
from sensorfleet.spec import FleetSpec, SensorSpec

QUALITY_GOOD, QUALITY_UNCERTAIN, QUALITY_BAD = 0, 1, 2
QUALITY_NAMES = ("good", "uncertain", "bad")
ANOMALY_NONE, ANOMALY_SPIKE, ANOMALY_STUCK, ANOMALY_DROPOUT = 0, 1, 2, 3
ANOMALY_DRIFT, ANOMALY_LEVEL_SHIFT, ANOMALY_NOISE_BURST, ANOMALY_OSCILLATION = 4, 5, 6, 7
ANOMALY_NAMES: tuple[str | None, ...] = (None, "spike", "stuck", "dropout", "drift", "level_shift", "noise_burst", "oscillation")
assert set(ANOMALY_NAMES[1:]) == set(ANOMALIES), "reading.ANOMALIES and the signal model's fault kinds must agree"

# Independent random streams; a new draw gets a new number, never reuses one.
_STREAM_NOISE_A, _STREAM_NOISE_B, _STREAM_DEVICE_OFFSET_A, _STREAM_DEVICE_OFFSET_B = 1, 2, 3, 4
_STREAM_DRIFT_SCALE, _STREAM_PHASE, _STREAM_SPIKE, _STREAM_SPIKE_SIGN = 5, 6, 7, 8
_STREAM_STUCK, _STREAM_STUCK_PHASE, _STREAM_DROPOUT, _STREAM_DROPOUT_PHASE = 9, 10, 11, 12
_STREAM_WEATHER_PERIOD, _STREAM_WEATHER_PHASE, _STREAM_REGIME_LENGTH, _STREAM_REGIME_SHIFT = 13, 14, 15, 16
_STREAM_REGIME_A, _STREAM_REGIME_B, _STREAM_INSTALL_AGE, _STREAM_GAIN_A, _STREAM_GAIN_B = 17, 18, 19, 20, 21
_STREAM_OUTAGE, _STREAM_OUTAGE_PHASE, _STREAM_FAULT_SIGN, _STREAM_BURST_A, _STREAM_BURST_B = 22, 23, 24, 25, 26
# (run stream, run phase stream) of each windowed fault
_FAULT_STREAMS = {"drift": (27, 28), "level_shift": (29, 30), "noise_burst": (31, 32), "oscillation": (33, 34)}

WEATHER_STEP_S = 60.0  # the weather is evaluated once per site and minute
WEATHER_COMPONENTS = 8  # sinusoids per (site, sensor): enough for an irregular, AR-like path
MAX_INSTALL_AGE_DAYS = 180.0
_SITE_LEVEL = 1000  # the "sensor" number of draws shared by a site's devices and sensors

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
    def _scale(self, s: int) -> float:
        """The sensor's natural size of variation: realism amplitudes are multiples of it."""
        sensor = self.sensors[s]
        if sensor.daily_amplitude > 0:
            return sensor.daily_amplitude
        return 10.0 * sensor.noise if sensor.noise > 0 else 0.01 * (sensor.max - sensor.min)

    def _fault_scale(self, s: int) -> float:
        sensor = self.sensors[s]
        return sensor.noise if sensor.noise > 0 else 0.01 * (sensor.max - sensor.min)

    def _per_device(self, devices: np.ndarray, s: int, stream: int) -> np.ndarray:
        return _uniform(self.key, devices, s, np.zeros_like(devices), stream)

    def _weather(self, s: int, sites: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Unit-variance slow process of each site: random-period sinusoids, amplitude ~ sqrt(period).

        It is evaluated once per (site, minute) present and shared by the readings of that minute:
        with periods of hours, a minute's change is far below any sensor's resolution."""
        r = self.spec.realism
        minute = np.floor((times - self.epoch) / WEATHER_STEP_S).astype(np.int64)
        first = int(minute.min()) if len(minute) else 0
        span = int(minute.max()) - first + 1 if len(minute) else 1
        pair_keys, inverse = np.unique(sites * span + (minute - first), return_inverse=True)
        unique_sites, site_of_pair = np.unique(pair_keys // span, return_inverse=True)
        t = ((pair_keys % span) + first).astype(np.float64) * WEATHER_STEP_S
        j = np.arange(WEATHER_COMPONENTS, dtype=np.int64)
        site_grid, comp_grid = np.repeat(unique_sites, len(j)), np.tile(j, len(unique_sites))
        u = _uniform(self.key, site_grid, s, comp_grid, _STREAM_WEATHER_PERIOD).reshape(len(unique_sites), -1)
        # log-uniform periods between weather_hours / 5 and weather_hours * 5
        period = r.weather_hours * 3600.0 * np.exp(np.log(5.0) * (2.0 * u - 1.0))
        phase = 2.0 * np.pi * _uniform(self.key, site_grid, s, comp_grid, _STREAM_WEATHER_PHASE).reshape(len(unique_sites), -1)
        weight = np.sqrt(period)
        amplitude = weight * np.sqrt(2.0 / (weight**2).sum(axis=1, keepdims=True))
        a, p, ph = amplitude[site_of_pair], period[site_of_pair], phase[site_of_pair]
        return (a * np.sin(2.0 * np.pi * t[:, None] / p + ph)).sum(axis=1)[inverse]

    def _realism(self, s: int, devices: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(additive slow components, gain, noise factor) of each reading."""
        r = self.spec.realism
        sensor = self.sensors[s]
        scale = self._scale(s)
        sites = devices // r.devices_per_site
        slow = np.zeros(len(devices))
        if r.weather_amplitude:
            w = self._weather(s, sites, times)
            if s > 0 and sensor.noise_coupling:
                rho = sensor.noise_coupling
                w = rho * self._weather(0, sites, times) + np.sqrt(1.0 - rho * rho) * w
            slow += r.weather_amplitude * scale * w
        if r.weekly_amplitude:
            day = np.floor(times / 86400.0)
            hour = (times - day * 86400.0) / 3600.0
            weekday = (day.astype(np.int64) + 3) % 7 < 5  # 1970-01-01 was a Thursday
            occupied = weekday * np.clip(hour - 7.5, 0.0, 1.0) * np.clip(18.5 - hour, 0.0, 1.0)
            sign = -1.0 if sensor.noise_coupling < 0 else 1.0
            slow += sign * r.weekly_amplitude * scale * (occupied - 50.0 / 168.0)
        if r.regime_amplitude:
            # Setpoint blocks of a per-device length (0.5x to 1.5x regime_hours), shifted per device.
            length = r.regime_hours * 3600.0 * (0.5 + self._per_device(devices, s, _STREAM_REGIME_LENGTH))
            position = (times - self.epoch) / length + self._per_device(devices, s, _STREAM_REGIME_SHIFT)
            block = np.floor(position).astype(np.int64)
            # A plant settles on a new setpoint over regime_ramp_hours, it does not jump.
            settled = np.clip((position - block) * length / (r.regime_ramp_hours * 3600.0), 0.0, 1.0) if r.regime_ramp_hours else 1.0
            level = _normal(self.key, devices, s, block, (_STREAM_REGIME_A, _STREAM_REGIME_B))
            previous = _normal(self.key, devices, s, block - 1, (_STREAM_REGIME_A, _STREAM_REGIME_B))
            slow += r.regime_amplitude * scale * (previous + settled * (level - previous))
        gain = 1.0 + r.calibration_gain_spread * _normal(self.key, devices, s, np.zeros_like(devices), (_STREAM_GAIN_A, _STREAM_GAIN_B))
        age_days = np.maximum((times - self.epoch) / 86400.0 + MAX_INSTALL_AGE_DAYS * self._per_device(devices, s, _STREAM_INSTALL_AGE), 0.0)
        noise_factor = 1.0 + r.ageing_noise_per_day * age_days
        return slow, gain, noise_factor

    def _clean(self, s: int, devices: np.ndarray, ticks: np.ndarray, times: np.ndarray) -> np.ndarray:
        sensor = self.sensors[s]
        hour = (times % 86400.0) / 3600.0
        cycle = sensor.daily_amplitude * np.cos(2.0 * np.pi * (hour - sensor.peak_hour) / 24.0)
        days = (times - self.epoch) / 86400.0
        drift_scale = 0.5 + _uniform(self.key, devices, s, np.zeros_like(devices), _STREAM_DRIFT_SCALE)
        offset = self.nominal(devices, s) - sensor.baseline
        z = _normal(self.key, devices, s, ticks, (_STREAM_NOISE_A, _STREAM_NOISE_B))
        if s > 0 and sensor.noise_coupling:
            rho = sensor.noise_coupling
            z0 = _normal(self.key, devices, 0, ticks, (_STREAM_NOISE_A, _STREAM_NOISE_B))
            z = rho * z0 + np.sqrt(1.0 - rho * rho) * z
        moving = cycle + sensor.drift_per_day * days * drift_scale
        if not self.spec.realism.enabled:
            return sensor.baseline + offset + moving + sensor.noise * z
        slow, gain, noise_factor = self._realism(s, devices, times)
        return sensor.baseline + offset + gain * (moving + slow) + sensor.noise * noise_factor * z

    def nominal(self, devices: np.ndarray, s: int) -> np.ndarray:
        """The device's nominal level of sensor `s`: baseline + its fixed offset (what a setpoint
        is measured against, and a setpoint variable shows before any write)."""
        sensor = self.sensors[s]
        devices = np.asarray(devices, dtype=np.int64)
        return sensor.baseline + sensor.device_spread * _normal(self.key, devices, s, np.zeros_like(devices), (_STREAM_DEVICE_OFFSET_A, _STREAM_DEVICE_OFFSET_B))

    # --- what clients did (sensorfleet.controls) -----------------------------------------------
    def _controlled_rows(self, devices: np.ndarray, controls: ControlLog | None) -> list[tuple[int, np.ndarray]]:
        if controls is None or not controls.actions:
            return []
        rows = np.nonzero(np.isin(devices, controls.devices()))[0]
        return [(d, rows[devices[rows] == d]) for d in np.unique(devices[rows]).tolist()]

    def _control_offset(self, s: int, devices: np.ndarray, times: np.ndarray, controls: ControlLog | None) -> np.ndarray | None:
        """The lagged setpoint offset of every reading, None when no reading has one."""
        out = None
        name = self.sensors[s].name
        for d, sel in self._controlled_rows(devices, controls):
            nominal = float(self.nominal(np.array([d]), s)[0])
            offset = controls.offset(d, name, nominal, times[sel])  # type: ignore[union-attr]
            if offset is not None:
                out = np.zeros(len(devices)) if out is None else out
                out[sel] = offset
        return out

    def _injected(self, devices: np.ndarray, times: np.ndarray, controls: ControlLog | None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """kind -> (inside, start tick, length in ticks) of the injected faults (InjectFault)."""
        out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        n = len(devices)
        for d, sel in self._controlled_rows(devices, controls):
            phase = float(self.phase(np.array([d]))[0])
            for kind, t0, t1 in controls.fault_windows(d):  # type: ignore[union-attr]
                t = times[sel]
                hit = sel[(t > t0) & (t <= t1)]
                if not len(hit):
                    continue
                inside, start, length = out.setdefault(kind, (np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)))
                inside[hit] = True
                start[hit] = int(np.floor((t0 - self.epoch) / self.interval - phase)) + 1
                length[hit] = max(1, int(np.ceil((t1 - t0) / self.interval)))
        return out

    def _resolution(self, s: int) -> float:
        sensor = self.sensors[s]
        if not self.spec.realism.enabled:
            return 0.0
        return sensor.resolution if sensor.resolution is not None else sensor.noise * self.spec.realism.quantization

    def _site_outage(self, devices: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Whether each reading falls into an outage of its device's site (time blocks shared by the site)."""
        r = self.spec.realism
        if not (r.enabled and r.site_outage_probability):
            return np.zeros(len(devices), dtype=bool)
        sites = devices // r.devices_per_site
        length = r.site_outage_duration * self.interval
        shift = _uniform(self.key, sites, _SITE_LEVEL, np.zeros_like(sites), _STREAM_OUTAGE_PHASE)
        block = np.floor((times - self.epoch) / length + shift).astype(np.int64)
        return _uniform(self.key, sites, _SITE_LEVEL, block, _STREAM_OUTAGE) < r.site_outage_probability

    def _windowed_faults(self, s: int, devices: np.ndarray, ticks: np.ndarray, v: np.ndarray, anomaly: np.ndarray, injected: dict | None = None) -> None:
        """Drift, level shift, noise burst and oscillation faults (the model's and the injected
        ones), applied in place and labelled."""
        a = self.spec.anomalies
        scale = self._fault_scale(s)
        plans = (
            ("drift", ANOMALY_DRIFT, a.drift_fault_probability, a.drift_fault_duration),
            ("level_shift", ANOMALY_LEVEL_SHIFT, a.level_shift_probability, a.level_shift_duration),
            ("noise_burst", ANOMALY_NOISE_BURST, a.noise_burst_probability, a.noise_burst_duration),
            ("oscillation", ANOMALY_OSCILLATION, a.oscillation_probability, a.oscillation_duration),
        )
        for kind, code, probability, duration in plans:
            forced = (injected or {}).get(kind)
            if not probability and forced is None:
                continue
            if probability:
                inside, start = self._in_run(s, devices, ticks, duration, probability, _FAULT_STREAMS[kind])
            else:
                inside, start = np.zeros(len(devices), dtype=bool), np.zeros(len(devices), dtype=np.int64)
            lengths = np.full(len(devices), duration, dtype=np.int64)
            if forced is not None:
                inside, start, lengths = inside | forced[0], np.where(forced[0], forced[1], start), np.where(forced[0], forced[2], lengths)
            if not inside.any():
                continue
            d, k, k0 = devices[inside], ticks[inside], start[inside]
            sign = np.where(_uniform(self.key, d, s, k0, _STREAM_FAULT_SIGN + code) < 0.5, -1.0, 1.0)
            elapsed = (k - k0).astype(np.float64)
            if kind == "drift":
                delta = sign * a.drift_fault_magnitude * scale * np.minimum(elapsed + 1.0, lengths[inside]) / lengths[inside]
            elif kind == "level_shift":
                delta = sign * a.level_shift_magnitude * scale
            elif kind == "noise_burst":
                extra = np.sqrt(a.noise_burst_magnitude**2 - 1.0)
                delta = extra * scale * _normal(self.key, d, s, k, (_STREAM_BURST_A, _STREAM_BURST_B))
            else:
                delta = sign * a.oscillation_magnitude * scale * np.sin(2.0 * np.pi * elapsed / a.oscillation_period)
            v[inside] += delta
            anomaly[inside] = code

    def _in_run(self, s: int, devices: np.ndarray, ticks: np.ndarray, length: int, probability: float, streams: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Whether each tick lies in a run (stuck-at or dropout) and the tick the run started at.

        Time is cut into blocks of `length` ticks (shifted per device so fleets don't fail in
        step); a block is a run with `probability`, so that fraction of readings is affected.
        """
        shift = np.floor(_uniform(self.key, devices, s, np.zeros_like(devices), streams[1]) * length).astype(np.int64)
        block = (ticks + shift) // length
        in_run = _uniform(self.key, devices, s, block, streams[0]) < probability
        return in_run, block * length - shift

    def block(self, devices: np.ndarray, ticks: np.ndarray, controls: ControlLog | None = None) -> TickBlock:
        """All sensors of the given (device, tick) pairs, given what clients did (`controls`)."""
        devices = np.asarray(devices, dtype=np.int64)
        ticks = np.asarray(ticks, dtype=np.int64)
        times = self.tick_times(devices, ticks)
        n, m = len(devices), len(self.sensors)
        if n == 0:
            empty = np.zeros((0, m), dtype=np.uint8)
            return TickBlock(devices, ticks, times, np.zeros((0, m)), empty, empty.copy())
        values = np.empty((n, m))
        quality = np.zeros((n, m), dtype=np.uint8)
        anomaly = np.zeros((n, m), dtype=np.uint8)
        a = self.spec.anomalies
        outage = self._site_outage(devices, times)
        injected = self._injected(devices, times, controls)
        none = np.zeros(n, dtype=bool)
        for s, sensor in enumerate(self.sensors):
            v = self._clean(s, devices, ticks, times)
            offset = self._control_offset(s, devices, times, controls)
            if offset is not None:
                v += offset
            labels = np.zeros(n, dtype=np.uint8)
            self._windowed_faults(s, devices, ticks, v, labels, injected)
            # Spikes: single readings pushed up or down by a multiple of the noise.
            spike = (_uniform(self.key, devices, s, ticks, _STREAM_SPIKE) < a.spike_probability) | injected.get("spike", (none,))[0]
            if spike.any():
                scale = self._fault_scale(s)
                sign = np.where(_uniform(self.key, devices, s, ticks, _STREAM_SPIKE_SIGN) < 0.5, -1.0, 1.0)
                v = np.where(spike, v + sign * a.spike_magnitude * scale, v)
                labels[spike] = ANOMALY_SPIKE
            # Stuck-at: the value freezes at the run's first (clean) reading.
            stuck, start = self._in_run(s, devices, ticks, a.stuck_duration, a.stuck_probability, (_STREAM_STUCK, _STREAM_STUCK_PHASE))
            if "stuck" in injected:
                forced, forced_start, _ = injected["stuck"]
                stuck, start = stuck | forced, np.where(forced, forced_start, start)
            if stuck.any():
                frozen_times = self.tick_times(devices[stuck], start[stuck])
                frozen = self._clean(s, devices[stuck], start[stuck], frozen_times)
                frozen_offset = self._control_offset(s, devices[stuck], frozen_times, controls)
                if frozen_offset is not None:
                    frozen += frozen_offset
                v[stuck] = frozen
                labels[stuck] = ANOMALY_STUCK
                quality[stuck, s] = QUALITY_UNCERTAIN
            v = np.clip(v, sensor.min, sensor.max)
            resolution = self._resolution(s)
            if resolution > 0:
                v = np.clip(np.round(v / resolution) * resolution, sensor.min, sensor.max)
            # Dropout: the sensor (or its whole site) reports no value at all.
            dropout, _ = self._in_run(s, devices, ticks, a.dropout_duration, a.dropout_probability, (_STREAM_DROPOUT, _STREAM_DROPOUT_PHASE))
            dropout |= outage | injected.get("dropout", (none,))[0]
            if dropout.any():
                v[dropout] = np.nan
                labels[dropout] = ANOMALY_DROPOUT
                quality[dropout, s] = QUALITY_BAD
            values[:, s] = v
            anomaly[:, s] = labels
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

    def reading_at(self, device: int, sensor: str, when: datetime, controls: ControlLog | None = None) -> Reading:
        """The reading a device reports for one sensor at (or just before) a moment."""
        devices = np.array([device])
        tick = self.current_tick(devices, when.timestamp())
        s = [x.name for x in self.sensors].index(sensor)
        return self.readings(self.block(devices, tick, controls))[s]


def shard_devices(total: int, replicas: int, index: int) -> range:
    """The contiguous device indices replica `index` of `replicas` simulates."""
    if not 0 <= index < replicas:
        raise ValueError(f"replica index {index} outside 0..{replicas - 1}")
    per, extra = divmod(total, replicas)
    start = index * per + min(index, extra)
    return range(start, start + per + (1 if index < extra else 0))


def utc(ts: float) -> datetime:
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=ts)
