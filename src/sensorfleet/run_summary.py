"""The final account of a `sensorfleet run`, per protocol: what was published, stored, lost, and
why the figures differ where they do. Pure: counts in, verdicts out (the runner does the I/O).

    published = stored + lost + unobserved      (each reading of this run, once)
    a third-party source (spec.sources, row `source <name>`): stored and refused only (no seq)
    offline   = readings never produced while the fleet was stopped (the gap between the
                dataset's last reading of a series and this run's first one): not loss

`lost` never hides behind a collector that stopped counting: whatever was published and neither
stored nor counted is lost for MQTT (the broker holds every reading for the collector), and for
CoAP / OPC UA as soon as a collector died; for healthy CoAP / OPC UA collectors it is `unobserved`
(a server produces readings before any collector subscribes; they were never sent).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

_SUMMARY_LINE = re.compile(r"SUMMARY (\{.*\})")


def child_summary(log_path: Path) -> dict | None:
    """The last `SUMMARY {json}` line a simulator or collector logged when it stopped."""
    try:
        lines = _SUMMARY_LINE.findall(log_path.read_text(errors="replace"))
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


@dataclass
class ProtocolCounts:
    """What the children of one protocol counted (sums over replicas)."""

    published: float = 0
    received: float = 0
    stored: float = 0
    lost: float = 0  # gaps in seq, net of late arrivals
    late: float = 0
    duplicates: float = 0
    malformed: float = 0
    offline: float = 0
    malformed_by_reason: dict[str, float] = field(default_factory=dict)


@dataclass
class ProtocolSummary:
    published: int
    stored: int
    lost: int
    late: int
    duplicate: int
    malformed: int
    malformed_by_reason: dict[str, int]
    offline: int  # never produced: the fleet was stopped
    unobserved: int  # produced by a server before any collector observed it: never sent
    notes: list[str]


def summarize(protocol: str, counts: ProtocolCounts, collectors_healthy: bool) -> ProtocolSummary:
    published, stored, lost = int(counts.published), int(counts.stored), int(counts.lost)
    notes: list[str] = []
    if protocol.startswith("source "):
        # A third-party source (spec.sources): nothing published that we know of, no sequence.
        notes.append(f"{stored:,} readings of third-party devices stored ({int(counts.malformed):,} messages refused); "
                     "they carry no sequence numbers, so loss is not accounted" + ("" if collectors_healthy else "; its collector died"))
        return ProtocolSummary(published=0, stored=stored, lost=lost, late=0, duplicate=0, malformed=int(counts.malformed),
                               malformed_by_reason={k: int(v) for k, v in sorted(counts.malformed_by_reason.items()) if v},
                               offline=0, unobserved=0, notes=notes)
    unaccounted = published - stored - lost
    unobserved = 0
    if unaccounted > 0:
        if protocol == "mqtt" or not collectors_healthy:
            why = "a collector died" if not collectors_healthy else "they were not received before the collector stopped"
            notes.append(f"{unaccounted:,} published readings never reached the dataset ({why}): counted lost")
            lost += unaccounted
        else:
            unobserved = unaccounted
            notes.append(f"{unobserved:,} readings were produced by a server before a collector observed them (never sent, not lost)")
    elif unaccounted < 0 and stored > published:
        notes.append(f"stored exceeds published by {stored - published:,}: readings produced before this run, delivered now "
                     "(the broker's persistent session redelivers what an earlier collector had not acknowledged)")
    if counts.offline:
        notes.append(f"{int(counts.offline):,} readings were never produced while the fleet was stopped (offline, not lost)")
    return ProtocolSummary(
        published=published, stored=stored, lost=lost, late=int(counts.late), duplicate=int(counts.duplicates),
        malformed=int(counts.malformed), malformed_by_reason={k: int(v) for k, v in sorted(counts.malformed_by_reason.items()) if v},
        offline=int(counts.offline), unobserved=unobserved, notes=notes,
    )


def summary_document(fleet: str, exit_code: int, protocols: dict[str, ProtocolSummary], dataset_rows: dict[str, int]) -> dict:
    """What `sensorfleet run --summary PATH` writes, for scripts and CI."""
    return {"fleet": fleet, "exit_code": exit_code, "protocols": {p: asdict(s) for p, s in protocols.items()}, "dataset_rows": dataset_rows}
