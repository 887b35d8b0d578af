"""OPC UA collector, device events: subscribe to the server's `SensorFleetControlEventType`
events (setpoint writes, InjectFault, Reset on a two-way simulator, see simulators/opcua_control.py)
and store each one in the dataset's events table (`sensorfleet.events`).

The event type is found by browse name under BaseEventType in the fleet's namespace; a server
without it (a read-only simulator, a third-party server) simply has no events to store. Events are
live: those emitted while the collector was away are not replayed (the readings they changed are,
as readings, accounted as usual).
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import datetime, timezone
from typing import Any

from asyncua import Client, ua

from sensorfleet.events import EventWriter

log = logging.getLogger("sensorfleet.collectors.opcua.events")

EVENT_TYPE = "SensorFleetControlEventType"  # the simulator's event types (docs/protocols.md)
LIMIT_EVENT_TYPE = "SensorFleetLimitEventType"  # limit alarms: action limit_high | limit_low | limit_normal
PUBLISHING_INTERVAL_MS = 500.0


class ControlEventSink:
    """Turns event notifications into rows of the events table; writes off the event loop."""

    def __init__(self, fleet: str, url: str, protocol: str, writer_id: str | None = None):
        self.fleet = fleet
        self.writer = EventWriter(url, protocol, writer_id)
        self.stored = 0
        self.pending: set[asyncio.Task] = set()

    def row(self, event: Any) -> dict:
        fields = vars(event)

        def text(name: str) -> str | None:
            value = fields.get(name)
            return str(value) if value not in (None, "") else None

        value = fields.get("Value")
        duration = fields.get("DurationSeconds")
        message = fields.get("Message")
        ts = fields.get("Time") or datetime.now(timezone.utc)
        action = text("Action") or (f"limit_{text('State')}" if "State" in fields else None)
        return {
            "fleet": self.fleet, "device": text("Device") or text("SourceName"),
            "ts": ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc), "action": action, "sensor": text("Sensor"),
            "value": float(value) if isinstance(value, int | float) and math.isfinite(value) else None,
            "fault": text("Fault") if "Fault" in fields else None,
            "duration": float(duration) if action == "fault" and isinstance(duration, int | float) else None,
            "message": message.Text if isinstance(message, ua.LocalizedText) else text("Message"),
            "client": text("Client"), "received_at": datetime.now(timezone.utc),
        }

    def event_notification(self, event: Any) -> None:
        """asyncua's handler callback, on the event loop: hand the write to a thread."""
        row = self.row(event)
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._write, row))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    def _write(self, row: dict) -> None:
        try:
            self.writer.write([row])
            self.stored += 1
        except OSError as exc:
            log.error("cannot store device event %s: %s", row, exc)

    async def drain(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)


async def subscribe_control_events(client: Client, namespace_uri: str, sink: ControlEventSink) -> bool:
    """Subscribe to the server's control and limit events; False when it has none to offer."""
    try:
        ns = await client.get_namespace_index(namespace_uri)
    except ValueError:
        return False
    etypes = []
    for name in (EVENT_TYPE, LIMIT_EVENT_TYPE):
        try:
            etypes.append(await client.nodes.base_event_type.get_child(f"{ns}:{name}"))
        except ua.UaStatusCodeError:
            continue
    if not etypes:
        return False
    subscription = await client.create_subscription(PUBLISHING_INTERVAL_MS, sink)
    await subscription.subscribe_events(client.nodes.server, etypes)
    log.info("%s: subscribed to %d device event type(s)", client.server_url.geturl() if hasattr(client.server_url, "geturl") else client.server_url, len(etypes))
    return True
