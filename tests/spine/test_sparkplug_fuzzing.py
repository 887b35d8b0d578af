"""The Sparkplug B decode path of the MQTT collector under a coverage-guided fuzzer (atheris) and
hypothesis: every hostile message becomes readings, refusals by reason, a host event or data held
for its DBIRTH; nothing crashes the writer thread (harness: tests/spine/fuzz/sparkplug_ingest.py)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensorfleet.reading import MALFORMED_REASONS

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))
import ingest  # noqa: E402
import sparkplug_ingest  # noqa: E402


def test_coverage_guided_fuzzing_of_the_sparkplug_collector_counts_100000_hostile_messages(tmp_path):
    """About 40-50 s at load 3-5 on 2 cores (34 s of CPU)."""
    runs = 100_000
    args = [sys.executable, str(FUZZ / "fuzz_sparkplug.py"), f"-runs={runs}", "-seed=12345", "-max_len=4096", "-rss_limit_mb=4096", f"-artifact_prefix={tmp_path}/"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=dict(os.environ))
    lines = [line for line in run.stdout.splitlines() + run.stderr.splitlines() if line.startswith("FUZZ-SUMMARY ")]
    assert run.returncode == 0 and lines, f"exit {run.returncode}\n{run.stderr[-4000:]}"
    summary = json.loads(lines[-1].removeprefix("FUZZ-SUMMARY "))
    assert summary["cases"] == runs == sum(summary["by_kind"].values()), summary["by_kind"]
    assert set(summary["by_kind"]) == {"session", "raw_bytes", "mutated", "bad_topic", "hostile_metric", "before_birth", "large"}
    totals, reasons = summary["totals"], summary["malformed_by_reason"]
    assert sum(reasons.values()) == totals["malformed"] and set(reasons) <= set(MALFORMED_REASONS), reasons
    assert totals["received"] == totals["stored"] + totals["duplicates"] and totals["stored"] > 1000, totals
    # what the hostile messages became, each under its reason (the harness checked every message)
    assert set(reasons) >= {"not_sparkplug", "bad_topic", "foreign_fleet", "missing_field", "bad_birth", "bad_ts", "unknown_alias",
                            "wrong_type", "non_finite", "out_of_range", "too_large", "unknown_device"}, reasons
    assert {"nbirth", "ndeath", "dbirth", "ddeath", "seq_gap", "no_change"} <= set(summary["events"]), summary["events"]
    assert summary["outcomes"].get("held_for_dbirth", 0) > 0


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_any_sparkplug_message_is_stored_refused_or_an_event(tmp_path_factory, rng: random.Random):
    harness = sparkplug_ingest.SparkplugHarness(tmp_path_factory.mktemp("sparkplug"))
    for _ in range(50):
        harness.feed(harness.case(ingest.RandomDraw(rng)))  # raises when a message became nothing
    harness.close()
    harness.check()
