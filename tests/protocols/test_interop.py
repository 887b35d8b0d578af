"""Independent clients talk to the simulators: libcoap's coap-client (C) for CoAP, asyncua's
command-line tools (uals / uaread, a separate client code path from the server) for OPC UA."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest

from sensorfleet.reading import reading_from_wire

COAP_CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")
BIN = Path(sys.executable).parent


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=timeout)


def _json_documents(text: str) -> list[dict]:
    """coap-client prints notifications back to back; split the concatenated JSON documents."""
    decoder, docs, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        doc, end = decoder.raw_decode(text, i)
        docs.append(doc)
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return docs


def test_coap_client_discovers_gets_and_observes_a_reading(write_fleet, procs, h, tmp_path, udp_port):
    assert COAP_CLIENT, "coap-client (Debian libcoap3-bin) is required for this test"
    fleet = write_fleet("coap", devices=3, interval=0.5)
    h.start_simulator(procs, "coap", fleet, tmp_path, udp_port)
    base = f"coap://127.0.0.1:{udp_port}"

    links = _run([COAP_CLIENT, "-m", "get", f"{base}/.well-known/core"]).stdout.decode()
    assert '</sensors/coap-00001/temperature>;rt="sensorfleet.reading"' in links and ";obs" in links
    assert links.count("</sensors/") == 3 * 3

    got = _run([COAP_CLIENT, "-m", "get", f"{base}/sensors/coap-00001/temperature"])
    reading = reading_from_wire(json.loads(got.stdout))
    assert (reading.device, reading.sensor, reading.unit, reading.protocol) == ("coap-00001", "temperature", "degC", "coap")

    as_cbor = _run([COAP_CLIENT, "-m", "get", "-A", "60", f"{base}/sensors/coap-00002/pressure"])
    reading = reading_from_wire(cbor2.loads(as_cbor.stdout))
    assert (reading.device, reading.sensor, reading.unit) == ("coap-00002", "pressure", "hPa")

    # Observe for 3 s at a 0.5 s interval: the registration response plus pushed notifications.
    observed = _run([COAP_CLIENT, "-m", "get", "-s", "3", f"{base}/sensors/coap-00000/humidity"])
    readings = [reading_from_wire(d) for d in _json_documents(observed.stdout.decode())]
    seqs = [r.seq for r in readings]
    assert len(readings) >= 4, observed
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "each notification is a new reading"
    assert all(r.device == "coap-00000" and r.sensor == "humidity" for r in readings)

    refused = _run([COAP_CLIENT, "-m", "get", "-A", "0", f"{base}/sensors/coap-00000/humidity"])
    assert b"4.06" in refused.stdout + refused.stderr, "text/plain is not offered: 4.06 Not Acceptable"
    missing = _run([COAP_CLIENT, "-m", "get", f"{base}/sensors/nope/temperature"])
    assert b"4.04" in missing.stdout + missing.stderr


def _ua(tool: str, url: str, *args: str) -> str:
    result = _run([str(BIN / tool), "-u", url, *args])
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return result.stdout.decode()


def test_opcua_cli_client_browses_the_folder_and_reads_a_value_with_its_unit(write_fleet, procs, h, tmp_path, tcp_port):
    # No dropouts: uaread exits with an error on a Bad value, which would make this test flaky.
    fleet = write_fleet("opcua", devices=3, interval=0.5, anomalies={"spikeProbability": 0, "stuckProbability": 0, "dropoutProbability": 0})
    h.start_simulator(procs, "opcua", fleet, tmp_path, tcp_port)
    url = f"opc.tcp://127.0.0.1:{tcp_port}/"

    namespaces = _ua("uaread", url, "-n", "i=2255")  # Server.NamespaceArray
    ns = eval(namespaces.strip().splitlines()[-1]).index("urn:sensorfleet:proto")  # noqa: S307 -- a printed list of str
    objects = _ua("uals", url, "-n", "i=85", "-l", "0")
    assert f"ns={ns};s=SensorFleet" in objects
    devices = _ua("uals", url, "-n", f"ns={ns};s=SensorFleet", "-l", "0")
    assert all(f"ns={ns};s=opcua-0000{i}" in devices for i in range(3))
    variables = _ua("uals", url, "-n", f"ns={ns};s=opcua-00001", "-l", "0")
    assert all(f"ns={ns};s=opcua-00001/{s}" in variables for s in ("temperature", "humidity", "pressure", "Seq"))

    value = _ua("uaread", url, "-n", f"ns={ns};s=opcua-00001/temperature", "-t", "datavalue").strip().splitlines()[-1]
    assert "SourceTimestamp=datetime.datetime(" in value
    assert "VariantType.Double" in value and "StatusCode=StatusCode(value=0)" in value, value
    unit = _ua("uaread", url, "-n", f"ns={ns};s=opcua-00001/temperature/EngineeringUnits").strip().splitlines()[-1]
    assert "Text='degC'" in unit and "UnitId=4408652" in unit  # UNECE "CEL"
    eu_range = _ua("uaread", url, "-n", f"ns={ns};s=opcua-00001/humidity/EURange").strip().splitlines()[-1]
    assert eu_range == "Range(Low=0.0, High=100.0)"
    seq = int(_ua("uaread", url, "-n", f"ns={ns};s=opcua-00001/Seq").strip().splitlines()[-1])
    assert seq > 0
