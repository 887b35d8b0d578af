"""Where a collector's microseconds go, without a broker: real simulator payloads (PayloadEncoder)
driven through the collector's own writer-thread step (`MqttCollector.handle`) into real Parquet
files, timed per reading. Complements bench_mqtt.py (which measures the whole pipeline).

Run: `python bench/profile_collector.py [--mode perDevice|gateway] [--profile] [--per-reading]`;
`--profile` prints the cProfile functions that take the most time; `--per-reading` switches the
columnar intake of large messages off (every message reading by reading, as before it existed).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from sensorfleet.collectors.mqtt import MqttCollector
from sensorfleet.metrics import FleetMetrics
from sensorfleet.runtime import BrokerAddress, CollectorOptions
from sensorfleet.signals import SignalModel
from sensorfleet.simulators.mqtt import PayloadEncoder
from sensorfleet.spec import load_fleet

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"


def payloads(fleet, mode: str, devices: int, ticks: int) -> list[tuple[str, bytes, int]]:
    model = SignalModel(fleet.spec, fleet.name, "mqtt")
    encoder = PayloadEncoder(model, fleet.spec.protocols.mqtt.topic_prefix, mode)
    ids = np.arange(devices, dtype=np.int64)
    start = model.current_tick(ids, time.time())
    out = []
    for k in range(ticks):
        out += encoder.messages(model.block(ids, start + k))
    return out


def run(mode: str, devices: int, ticks: int, profile: bool, per_reading: bool = False) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="sf-profile-collector-"))
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["protocols"]["mqtt"].update(devices=devices, interval=0.25, messageMode=mode)
    doc["spec"]["collector"].update(batchSize=20000, flushInterval=1.0)
    (workdir / "fleet.yaml").write_text(yaml.safe_dump(doc))
    fleet = load_fleet(workdir / "fleet.yaml")
    messages = payloads(fleet, mode, devices, ticks)
    readings = sum(n for _, _, n in messages)
    collector = MqttCollector(CollectorOptions(fleet, str(workdir / "data")), BrokerAddress("127.0.0.1", 1), FleetMetrics(fleet.name, "mqtt", "collector"))
    collector.subscriber = None  # acks go to paho's client, which is not connected: dropped
    if per_reading:
        collector.columnar_min_bytes = 1 << 62
    now = datetime.now(timezone.utc)
    items = [(payload, topic, i + 1, 1, 0, now) for i, (topic, payload, _) in enumerate(messages)]
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    cpu = time.process_time()
    if profiler:
        profiler.enable()
    for item in items:
        collector.handle(item)
    collector.flush_and_ack()
    collector.sink.close() if collector.sink.storage else None
    if profiler:
        profiler.disable()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert collector.sink.totals["stored"] == readings, collector.sink.totals
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    return {"mode": mode, "per_reading": per_reading, "columnar_messages": collector.columnar_messages, "messages": len(items), "readings": readings, "us_per_reading": round(cpu / readings * 1e6, 2), "us_per_message": round(cpu / len(items) * 1e6, 1), "readings_per_cpu_s": round(readings / cpu), "messages_per_cpu_s": round(len(items) / cpu), "wall_s": round(elapsed, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="both", choices=["both", "perDevice", "gateway"])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--per-reading", action="store_true", help="no columnar intake: every message reading by reading")
    args = parser.parse_args()
    for mode in (["perDevice", "gateway"] if args.mode == "both" else [args.mode]):
        print(run(mode, args.devices, args.ticks, args.profile, args.per_reading))


if __name__ == "__main__":
    main()
