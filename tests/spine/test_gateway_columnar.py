"""The columnar intake of gateway messages (MqttCollector.handle -> decode_json_columns ->
CollectorSink.accept_columns) stores the same rows and counts the same readings as the
per-reading path, on real simulator payloads and on every irregularity that must send a message
down the per-reading path; and the intake deque is bounded in bytes."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sensorfleet.collectors import mqtt as mqtt_collector
from sensorfleet.collectors.base import SequenceSpace
from sensorfleet.collectors.mqtt import MqttCollector
from sensorfleet.dataset import read_dataset
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import format_ts, parse_ts
from sensorfleet.runtime import BrokerAddress, CollectorOptions
from sensorfleet.signals import SignalModel
from sensorfleet.simulators.mqtt import PayloadEncoder
from sensorfleet.spec import load_fleet

DEVICES = 250
COUNTED = ("received", "lost", "late", "duplicates", "offline", "malformed", "other_space")


class Gateway:
    """The simulator's own encoder (PayloadEncoder, gateway mode): real payloads, 30 readings each."""

    def __init__(self, fleet):
        self.model = SignalModel(fleet.spec, fleet.name, "mqtt")
        self.encoder = PayloadEncoder(self.model, fleet.spec.protocols.mqtt.topic_prefix, "gateway", gateway_batch=30)
        self.start = int(self.model.current_tick(np.arange(DEVICES), time.time()).min()) - 50

    def tick(self, k: int, devices: list[int] | None = None) -> list[bytes]:
        ids = np.array(devices if devices is not None else range(DEVICES), dtype=np.int64)
        return [payload for _, payload, _ in self.encoder.messages(self.model.block(ids, np.full(len(ids), self.start + k)))]

    def ticks(self, device_ticks: list[tuple[int, int]]) -> bytes:
        ids, ks = zip(*device_ticks)
        block = self.model.block(np.array(ids, dtype=np.int64), np.array(ks, dtype=np.int64) + self.start)
        (message,) = PayloadEncoder(self.model, "sensorfleet", "gateway", gateway_batch=10_000).messages(block)
        return message[1]


def edited(payload: bytes, edit) -> bytes:
    """The payload with `edit(documents)` applied, encoded as the simulator does."""
    documents = json.loads(payload)
    edit(documents)
    return json.dumps(documents, separators=(",", ":")).encode()


def collector(fleet, data: Path, columnar: bool) -> MqttCollector:
    c = MqttCollector(CollectorOptions(fleet, str(data)), BrokerAddress("127.0.0.1", 1), FleetMetrics(fleet.name, "mqtt", "collector"))
    c.subscriber = None  # not connected: acknowledgements go to paho's idle client and are dropped
    c.columnar_min_bytes = 0 if columnar else 1 << 62
    return c


def feed(c: MqttCollector, payloads: list[bytes]) -> list[tuple[bool, tuple[int, ...]]]:
    """Each payload through the network thread's step and the writer thread's; per payload:
    whether the columnar intake took it whole, and what it added to each count."""
    steps = []
    for mid, payload in enumerate(payloads, 1):
        before = (c.columnar_messages, *(c.sink.totals[k] for k in COUNTED))
        c._take((payload, "sensorfleet/demo/gateway/0", mid, 1, 0, pd.Timestamp("2026-12-02T12:00:00Z").to_pydatetime()))
        c.handle(c.intake.popleft())
        after = (c.columnar_messages, *(c.sink.totals[k] for k in COUNTED))
        steps.append((after[0] > before[0], tuple(a - b for a, b in zip(after[1:], before[1:]))))
    c.flush_and_ack()
    return steps


def outcome(c: MqttCollector, data: Path) -> tuple[dict, dict, dict, pd.DataFrame]:
    samples = {f"{f.name}:{s.name}:{sorted(s.labels.items())}": s.value for f in c.metrics.registry.collect() if f.name.startswith("sensorfleet_") for s in f.samples
               if s.name.endswith("_total") and "seconds" not in s.name and "batch" not in s.name}
    rows = read_dataset(str(data)).sort_values(["device", "sensor", "seq"], kind="stable").reset_index(drop=True)
    return {k: c.sink.totals[k] for k in COUNTED} | {"stored": c.sink.totals["stored"]}, dict(c.sink.malformed_by_reason), samples, rows


@pytest.fixture
def fleet(write_fleet):
    return load_fleet(write_fleet({"protocols": {"mqtt": {"devices": DEVICES, "interval": 1.0, "messageMode": "gateway", "gatewayBatch": 30}},
                                   "collector": {"batchSize": 100_000, "flushInterval": 3600}}))


def test_columnar_and_per_reading_intake_store_the_same_rows_and_counts(fleet, tmp_path):
    """Each case has 10 devices of its own, all at tick 0 before it: its payloads hold the one
    irregularity under test (a refused reading also leaves its series behind: a gap later)."""
    gateway = Gateway(fleet)

    def tick(k, case):
        (payload,) = gateway.tick(k, list(range(10 * case, 10 * case + 10)))
        return payload

    def twice(case, order):
        return gateway.ticks([(d, k) for d in (10 * case, 10 * case + 1) for k in order])

    escaped = tick(1, 11).replace(b'"unit":"d', b'"unit":"\\u0064', 1)  # a JSON escape of the same unit, "degC"
    assert escaped != tick(1, 11)
    cases = {
        "devices in reverse order": lambda i: [gateway.ticks([(d, 1) for d in reversed(range(10 * i, 10 * i + 10))])],
        "a duplicate message": lambda i: [tick(0, i)],
        "a wrong type in one document, then the next tick": lambda i: [edited(tick(1, i), lambda d: d[3].update(value="21.5")), tick(2, i)],
        "a value beyond float64": lambda i: [edited(tick(1, i), lambda d: d[3].update(value=10**400))],
        "a default left out (valid)": lambda i: [edited(tick(1, i), lambda d: d[0].pop("quality"))],
        "an unknown field (valid)": lambda i: [edited(tick(1, i), lambda d: d[1].update(firmware="1.2"))],
        "a repeated field": lambda i: [tick(1, i).replace(b'"seq":', b'"seq":1,"seq":', 1)],
        "a repeated field that is a default": lambda i: [tick(1, i).replace(b'"quality":', b'"quality":"bad","quality":', 1)],
        "the same instant spelled +00:00 (valid)": lambda i: [edited(tick(1, i), lambda d: d[2].update(ts=d[2]["ts"][:-1] + "+00:00"))],
        "February 30 in the canonical form": lambda i: [edited(tick(1, i), lambda d: d[4].update(ts="2026-02-30T12:00:00.000000Z"))],
        "year 0, which Arrow alone would take": lambda i: [edited(tick(1, i), lambda d: d[0].update(ts="0000-01-01T00:00:00.000000Z"))],
        "an escaped character": lambda i: [escaped],
        "an escaped quote (valid)": lambda i: [edited(tick(1, i), lambda d: d[0].update(unit='deg"C'))],
        "a reading of another fleet": lambda i: [edited(tick(1, i), lambda d: d[1].update(fleet="other"))],
        "a reading of another protocol": lambda i: [edited(tick(1, i), lambda d: d[5].update(protocol="coap"))],
        "a dropout: no value, quality bad": lambda i: [edited(tick(1, i), lambda d: d[0].update(value=None, quality="bad"))],
        "no value with quality good": lambda i: [edited(tick(1, i), lambda d: d[0].update(value=None))],
        "valid values whose sum overflows": lambda i: [edited(tick(1, i), lambda d: [d[k].update(value=1.7e308) for k in (0, 3)])],
        "a gap, then the late tick": lambda i: [tick(2, i), tick(1, i)],
        "one series twice, in order": lambda i: [twice(i, (1, 2))],
        "one series twice, out of order": lambda i: [twice(i, (2, 1))],
        "an empty array": lambda i: [b"[]"],
        "not JSON, then fine": lambda i: [b"[" + tick(1, i)[1:-1] + b',{"fleet":', tick(1, i)],
        "the next tick": lambda i: [tick(1, i)],
    }
    assert 10 * len(cases) <= DEVICES
    names = ["new series"] * len(cases) + [name for i, (name, make) in enumerate(cases.items()) for _ in make(i)]
    payloads = [tick(0, i) for i in range(len(cases))] + [payload for i, make in enumerate(cases.values()) for payload in make(i)]
    results, steps = [], []
    for columnar in (True, False):
        data = tmp_path / f"data-{columnar}"
        c = collector(fleet, data, columnar)
        steps.append(feed(c, payloads))
        results.append(outcome(c, data))
    (totals, reasons, samples, rows), (totals_ref, reasons_ref, samples_ref, rows_ref) = results
    assert totals == totals_ref and reasons == reasons_ref
    assert samples == samples_ref
    pd.testing.assert_frame_equal(rows, rows_ref)
    assert [deltas for _, deltas in steps[0]] == [deltas for _, deltas in steps[1]]
    assert totals["late"] == 3 * 10 + 3 * 2 and totals["duplicates"] == 30 and totals["lost"] == 1, totals  # lost net of late: the wrong type's series
    assert set(reasons) == {"wrong_type", "out_of_range", "duplicate_key", "bad_ts", "foreign_fleet", "bad_value", "empty_batch", "not_json"}
    assert len(rows) == totals["stored"] == totals["received"] - totals["duplicates"]
    # Taken whole: exactly the messages with nothing to count, in the simulator's own form.
    valid_other_form = {"a default left out (valid)", "an unknown field (valid)", "the same instant spelled +00:00 (valid)", "an escaped quote (valid)", "valid values whose sum overflows"}
    regular = [i for i, (name, (_, deltas)) in enumerate(zip(names, steps[1])) if name not in valid_other_form and deltas[0] > 0 and not any(deltas[1:])]
    assert [i for i, (whole, _) in enumerate(steps[0]) if whole] == regular
    assert {names[i] for i in regular} == {"new series", "devices in reverse order", "an escaped character", "a dropout: no value, quality bad", "one series twice, in order", "not JSON, then fine", "the next tick"}
    assert not any(whole for whole, _ in steps[1])


def test_after_a_restart_columnar_and_per_reading_intake_count_the_same_offline_readings(fleet, tmp_path):
    gateway = Gateway(fleet)
    results = []
    for columnar in (True, False):
        data = tmp_path / f"data-{columnar}"
        first = collector(fleet, data, columnar)
        feed(first, [*gateway.tick(0), *gateway.tick(1)])
        second = collector(fleet, data, columnar)
        assert second.sink.resume_from_dataset(space=SequenceSpace.of(fleet.spec, "mqtt")) == DEVICES * 3
        # Devices 0-9 go on at tick 2 (whole), the others come back at tick 9: offline 7 each;
        # tick 3 of devices 0-9 a day late is of another spec's sequence space (another epoch);
        # then devices 0-9 skip tick 3: lost, no longer offline (they went on after the restart).
        (other_epoch,) = gateway.tick(3, list(range(10)))
        other_epoch = edited(other_epoch, lambda d: [doc.update(ts=format_ts(parse_ts(doc["ts"]) + timedelta(days=1))) for doc in d])
        feed(second, [*gateway.tick(2, list(range(10))), *gateway.tick(9, list(range(10, DEVICES))), *gateway.tick(1), other_epoch, *gateway.tick(4, list(range(10)))])
        results.append((outcome(second, data), second.columnar_messages))
    ((totals, reasons, samples, rows), taken), ((totals_ref, reasons_ref, samples_ref, rows_ref), _) = results
    assert totals == totals_ref and reasons == reasons_ref and samples == samples_ref
    pd.testing.assert_frame_equal(rows, rows_ref)
    assert totals["offline"] == (DEVICES - 10) * 3 * 7 and totals["duplicates"] == DEVICES * 3 and totals["lost"] == 30, totals
    assert totals["other_space"] == 30, totals
    assert taken == 1  # tick 2 of devices 0-9: one message of 30 readings


def test_the_intake_holds_a_bounded_number_of_bytes(fleet, tmp_path, monkeypatch):
    """The network thread waits while the intake holds INTAKE_MAX_BYTES of payloads (before, only
    the number of messages was bounded: 500-reading messages piled up to hundreds of MiB)."""
    monkeypatch.setattr(mqtt_collector, "INTAKE_MAX_BYTES", 1 << 20)
    c = collector(fleet, tmp_path / "data", columnar=True)
    gateway = Gateway(fleet)
    payloads = [m for k in range(40) for m in gateway.tick(k)]
    size = len(payloads[0])
    taken = threading.Thread(target=lambda: [c._take((p, "sensorfleet/demo/gateway/0", i, 1, 0, pd.Timestamp.now(tz="UTC").to_pydatetime())) for i, p in enumerate(payloads)])
    taken.start()
    try:
        time.sleep(1.0)
        held = len(c.intake)
        assert held < len(payloads) and sum(len(item[0]) for item in c.intake) < (1 << 20) + size
        assert held >= (1 << 20) // size - 1
        while taken.is_alive() or c.intake:
            if c.intake:
                c.handle(c.intake.popleft())
            else:
                time.sleep(0.01)
        c.flush_and_ack()
        assert c.sink.totals["stored"] == 30 * len(payloads) and c.columnar_messages == len(payloads)
    finally:
        c._stop.set()
        taken.join(10)
