"""Coverage-guided fuzzing (atheris) of the three collectors' real ingest paths.

    python tests/spine/fuzz/fuzz_ingest.py -runs=100000 [-seed=N] [-max_len=4096] [corpus dirs]

Each input becomes one hostile case (see ingest.py); a crash, a case counted zero or wrongly, or a
reason outside MALFORMED_REASONS stops the fuzzer with the input saved. At the end one JSON line
`FUZZ-SUMMARY {...}` tells how many cases of each kind ran and what was counted under each reason.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["sensorfleet"]):
    import ingest  # noqa: E402  (instrumented: its imports of sensorfleet are what is measured)

if os.environ.get("SENSORFLEET_FUZZ_DECODER") == "old":  # the test that the fuzzer can fail
    import old_decoder

    from sensorfleet.collectors import mqtt as mqtt_collector

    mqtt_collector.decode_json_payload = old_decoder.old_mqtt_decoding

workdir = Path(tempfile.mkdtemp(prefix="sf-fuzz-"))
harness = ingest.IngestHarness(workdir)
runs = 0


# libFuzzer ends the process with _exit (no atexit): report from the last input ourselves.
target_runs = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("-runs=")), 0)


def one_input(data: bytes) -> None:
    global runs
    runs += 1
    harness.feed(harness.case(ingest.FuzzDraw(atheris.FuzzedDataProvider(data))))
    if runs == target_runs:
        report()


def report() -> None:
    harness.close()
    harness.check_totals()
    harness.check_stored()
    stored = sum(s.totals["stored"] for s in harness.sinks.values())
    summary = {"cases": runs, "by_kind": dict(harness.cases), "documents": harness.documents, "stored": stored, "totals": harness.totals(), "malformed_by_reason": harness.reasons()}
    print("FUZZ-SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
