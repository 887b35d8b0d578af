"""`sensorfleet generate`: the dataset a fleet would have collected, written straight from the signal model.

No simulator, broker or collector runs: the signal model is a pure function of (device, sensor,
tick), so the readings a live fleet would have published over D days can be computed in blocks
of numpy arrays and written as Arrow tables with the collectors' schema and Parquet layout.
The injected anomalies land in the `anomaly` column (the ground truth the forecasting job scores
its flags against), dropouts as null values with quality `bad`, exactly as a collector stores them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

from sensorfleet.dataset import FILE_SCHEMA, DatasetWriter
from sensorfleet.signals import ANOMALY_NAMES, QUALITY_BAD, QUALITY_NAMES, SignalModel, device_id
from sensorfleet.spec import SensorFleet

# Readings (device x tick pairs) computed per block: bounds memory at ~a few hundred MB whatever
# the fleet size, interval or number of days.
MAX_PAIRS_PER_BLOCK = 1_000_000
DAY = 86400.0


@dataclass
class GenerateSummary:
    """What `generate` wrote: rows and files per protocol, and the time range."""

    start: datetime
    end: datetime
    rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)
    anomalies: dict[str, int] = field(default_factory=dict)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def default_start(days: float, now: datetime | None = None) -> datetime:
    """Midnight UTC `days` days before today's midnight: the last D complete days."""
    now = now or datetime.now(timezone.utc)
    midnight = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight - timedelta(days=days)


def parse_start(text: str) -> datetime:
    """An ISO date or date-time; naive values are taken as UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--start: expected an ISO date like 2026-11-01 or 2026-11-01T06:00, got {text!r}") from None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def block_table(model: SignalModel, devices: np.ndarray, ticks: np.ndarray, lo: float, hi: float) -> pa.Table:
    """The readings of (device, tick) pairs whose time lies in [lo, hi), as one FILE_SCHEMA table."""
    block = model.block(devices, ticks)
    keep = (block.times >= lo) & (block.times < hi)
    devices, ticks, times = block.devices[keep], block.ticks[keep], block.times[keep]
    values, quality, anomaly = block.values[keep], block.quality[keep], block.anomaly[keep]
    n, m = len(devices), len(model.sensors)
    if n == 0:
        return FILE_SCHEMA.empty_table()
    # Rows ordered by (device, tick, sensor), the order a per-device collector would see them.
    order = np.lexsort((ticks, devices))
    devices, ticks, times = devices[order], ticks[order], times[order]
    values, quality, anomaly = values[order].ravel(), quality[order].ravel(), anomaly[order].ravel()
    row_device = np.repeat(devices, m)
    unique_devices, device_codes = np.unique(row_device, return_inverse=True)
    sensor_codes = np.tile(np.arange(m, dtype=np.int32), n)
    micros = np.repeat(np.round(times * 1e6).astype(np.int64), m)
    ts = pa.array(micros, type=pa.timestamp("us", tz="UTC"))

    def strings(codes: np.ndarray, names: Sequence[str | None]) -> pa.Array:
        return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(names), pa.string())).cast(pa.string())

    columns = {
        "fleet": strings(np.zeros(n * m, dtype=np.int32), [model.fleet]),
        "device": strings(device_codes, [device_id(model.protocol, int(d)) for d in unique_devices]),
        "sensor": strings(sensor_codes, [s.name for s in model.sensors]),
        "value": pa.array(values, type=pa.float64(), mask=quality == QUALITY_BAD),
        "unit": strings(sensor_codes, [s.unit for s in model.sensors]),
        "ts": ts,
        "seq": pa.array(np.repeat(ticks, m), type=pa.int64()),
        "quality": strings(quality, QUALITY_NAMES),
        # Code 0 maps to a null entry of the dictionary: "no anomaly" is stored as null.
        "anomaly": strings(anomaly, ANOMALY_NAMES),
        # Generated data never crossed a network: it is received when it is taken.
        "received_at": ts,
    }
    return pa.table(columns, schema=FILE_SCHEMA)


def time_chunks(start: float, end: float, devices: int, interval: float) -> list[tuple[float, float]]:
    """[lo, hi) windows that never cross midnight UTC and hold at most MAX_PAIRS_PER_BLOCK readings."""
    span = max(interval, np.floor(MAX_PAIRS_PER_BLOCK / max(devices, 1)) * interval)
    chunks = []
    lo = start
    while lo < end:
        midnight = (np.floor(lo / DAY) + 1) * DAY
        hi = min(end, midnight, lo + span)
        chunks.append((lo, hi))
        lo = hi
    return chunks


def generate_dataset(
    fleet: SensorFleet,
    data: str,
    days: float,
    start: datetime | None = None,
    interval: float | None = None,
    protocols: Sequence[str] | None = None,
    devices: int | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> GenerateSummary:
    """Write `days` days of the fleet's readings from `start` into the dataset at `data`.

    `interval` overrides every protocol's reading interval (seconds); `devices` overrides the
    device count. `on_chunk(done, total)` is called after every written block (progress bars).
    """
    if days <= 0:
        raise ValueError(f"--days: must be > 0, got {days}")
    if interval is not None and interval <= 0:
        raise ValueError(f"--interval: must be > 0 seconds, got {interval}")
    spec = fleet.spec
    chosen = list(protocols) if protocols else spec.enabled_protocols()
    unknown = [p for p in chosen if p not in ("mqtt", "coap", "opcua")]
    if unknown:
        raise ValueError(f"--protocol: unknown protocol {unknown[0]!r}; choose from mqtt, coap, opcua")
    start = start or default_start(days)
    end = start + timedelta(days=days)
    t0, t1 = start.timestamp(), end.timestamp()
    summary = GenerateSummary(start=start, end=end)
    plans = []
    for protocol in chosen:
        model = SignalModel(spec, fleet.name, protocol, interval=interval)
        n_devices = devices if devices is not None else spec.protocol(protocol).devices
        plans.append((protocol, model, n_devices, time_chunks(t0, t1, n_devices, model.interval)))
    total, done = sum(len(p[3]) for p in plans), 0
    for protocol, model, n_devices, chunks in plans:
        writer = DatasetWriter(data, protocol)
        device_range = np.arange(n_devices, dtype=np.int64)
        rows, counts = 0, np.zeros(len(ANOMALY_NAMES), dtype=np.int64)
        for lo, hi in chunks:
            # Every tick whose (phase-shifted) time can fall in [lo, hi); block_table trims the rest.
            k0 = int(np.floor((lo - model.epoch) / model.interval)) - 1
            k1 = int(np.ceil((hi - model.epoch) / model.interval)) + 1
            tick_range = np.arange(k0, k1, dtype=np.int64)
            table = block_table(model, np.repeat(device_range, len(tick_range)), np.tile(tick_range, n_devices), lo, hi)
            writer.write_table(table)
            rows += table.num_rows
            names = table["anomaly"].value_counts().to_pylist()
            for entry in names:
                if entry["values"] is not None:
                    counts[ANOMALY_NAMES.index(entry["values"])] += entry["counts"]
            done += 1
            if on_chunk:
                on_chunk(done, total)
        summary.rows[protocol] = rows
        summary.files[protocol] = writer.files_written
        summary.series[protocol] = n_devices * len(model.sensors)
        for code, name in enumerate(ANOMALY_NAMES):
            if name is not None:
                summary.anomalies[name] = summary.anomalies.get(name, 0) + int(counts[code])
    return summary
