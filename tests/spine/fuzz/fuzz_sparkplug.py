"""Coverage-guided fuzzing (atheris) of the MQTT collector's Sparkplug B ingest path.

    python tests/spine/fuzz/fuzz_sparkplug.py -runs=100000 [-seed=N] [-max_len=4096] [corpus dirs]

Each input becomes one hostile message (see sparkplug_ingest.py); a crash or a message that
became nothing (no reading, no refusal, no host event, not held back) stops the fuzzer with the
input saved. At the end one JSON line `FUZZ-SUMMARY {...}` tells how many messages of each kind
ran and what each became.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Coverage of what reads a Sparkplug message (the collector, the host state machine, the payload
# and the reading validation) steers the fuzzer; the sink and the dataset below them run
# uninstrumented, which halves the cost of a case.
with atheris.instrument_imports(include=["sensorfleet.sparkplug", "sensorfleet.collectors.sparkplug", "sensorfleet.reading"]):
    import ingest  # noqa: E402
    import sparkplug_ingest  # noqa: E402

harness = sparkplug_ingest.SparkplugHarness(Path(tempfile.mkdtemp(prefix="sf-fuzz-sparkplug-")))
runs = 0
# libFuzzer ends the process with _exit (no atexit): report from the last input ourselves.
target_runs = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("-runs=")), 0)


def one_input(data: bytes) -> None:
    global runs
    runs += 1
    harness.feed(harness.case(ingest.FuzzDraw(atheris.FuzzedDataProvider(data))))
    if runs == target_runs:
        harness.close()
        harness.check()
        print("FUZZ-SUMMARY " + json.dumps(harness.summary()), flush=True)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
