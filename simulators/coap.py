"""CoAP simulator: one aiocoap server process serving a shard of the fleet's CoAP devices.

Resources (see docs/protocols.md):

    /.well-known/core                 RFC 6690 link format listing every resource below
    /sensors/<device>/<sensor>        the current reading of one sensor; GET and Observe (RFC 7641)

Representations: the reading wire document of `sensorfleet.reading`, as JSON (content-format 50,
the default) or CBOR (60) when the request carries `Accept: 60`; anything else is 4.06.

Built not to collapse under overload (docs/protocols.md, "Throughput"):
- notifications are NON by default (`spec.protocols.coap.confirmable: false`): a CON notification
  needs an ACK and aiocoap keeps NSTART = 1 outstanding CON per peer, so CON throughput is one
  message per round trip; in confirmable mode the per-peer backlog is capped and notifications
  beyond it are skipped (RFC 7641 4.5.2 lets a server skip intermediate states) and counted;
- a notification is pushed straight into each observation's pipe when a reading becomes current,
  without waking one task per observer, and the encoded payload is shared by all observers;
- the update loop never queues: if it falls behind, a device jumps to its current tick and the
  readings it skipped are counted in `sensorfleet_readings_dropped_total{reason="overload"}`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import cbor2
import numpy as np
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import CON, NON

from sensorfleet.internals import aiocoap_backlog
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import format_ts
from sensorfleet.runtime import SimulatorOptions, stop_event_on_signals
from sensorfleet.signals import ANOMALY_NAMES, QUALITY_BAD, QUALITY_NAMES, SignalModel, device_id, shard_devices, utc

log = logging.getLogger("sensorfleet.simulators.coap")

PROTOCOL = "coap"
CF_LINK_FORMAT = 40
CF_JSON = 50
CF_CBOR = 60
ENCODERS: dict[int, Callable[[dict[str, Any]], bytes]] = {
    CF_JSON: lambda doc: json.dumps(doc, separators=(",", ":")).encode(),
    CF_CBOR: cbor2.dumps,
}
RESOURCE_TYPE = "sensorfleet.reading"
# CON notifications waiting for their turn (NSTART = 1) per peer before further ones are skipped.
MAX_CON_BACKLOG = 256
# The update loop sleeps at most this long, so a stop request or a clock jump is noticed quickly.
MAX_SLEEP = 0.05
# Readings due within one round are computed together: the signal model is vectorised, and one
# round per due device would spend most of the time in numpy call overhead. A reading is served at
# most this late (its source timestamp stays exact).
MAX_ROUND = 0.05


@dataclass
class _Observer:
    pipe: Any  # aiocoap Pipe of the registering request
    content_format: int
    remote: Any
    parked: asyncio.Future
    number: int = 0


@dataclass
class SensorResource:
    """One `/sensors/<device>/<sensor>` resource: its current reading and its observers."""

    device: str
    sensor: str
    unit: str
    doc: dict[str, Any] | None = None
    observers: list[_Observer] = field(default_factory=list)
    _encoded: dict[int, bytes] = field(default_factory=dict)

    def payload(self, content_format: int) -> bytes:
        cached = self._encoded.get(content_format)
        if cached is None:
            cached = self._encoded[content_format] = ENCODERS[content_format](self.doc)
        return cached

    def set_reading(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self._encoded.clear()


def negotiate(accept: int | None) -> int | None:
    """The content format to answer with, or None when the client accepts nothing we have."""
    if accept is None:
        return CF_JSON
    return accept if accept in ENCODERS else None


class CoapSite:
    """The whole server's resource tree, dispatched by path with one dict lookup.

    aiocoap's `Site` keeps one resource object per path too, but goes through its generic
    observation machinery (one task woken per observer and notification); here a notification is
    a direct `pipe.add_response`."""

    def __init__(self, sim: CoapSimulator):
        self.sim = sim
        self.resources: dict[tuple[str, ...], SensorResource] = {}
        self._link_format: bytes = b""

    def add(self, resource: SensorResource) -> None:
        self.resources[("sensors", resource.device, resource.sensor)] = resource

    def build_link_format(self) -> None:
        links = [
            f'</sensors/{r.device}/{r.sensor}>;rt="{RESOURCE_TYPE}";if="sensor";ct="50 60";obs;title="{r.unit}"'
            for r in self.resources.values()
        ]
        self._link_format = ",".join(links).encode()

    def link_format(self, queries: list[str]) -> bytes:
        """RFC 6690 4.1 filtering on `rt` and `href` (a trailing `*` is a prefix match)."""
        if not queries:
            return self._link_format
        selected = []
        for path, r in self.resources.items():
            href = "/" + "/".join(path)
            if all(_link_matches(q, href, RESOURCE_TYPE) for q in queries):
                selected.append(f'<{href}>;rt="{RESOURCE_TYPE}";if="sensor";ct="50 60";obs;title="{r.unit}"')
        return ",".join(selected).encode()

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        path = tuple(request.opt.uri_path)
        if path == (".well-known", "core"):
            await self._render_well_known(pipe)
            return
        resource = self.resources.get(path)
        if resource is None:
            pipe.add_response(aiocoap.Message(code=Code.NOT_FOUND), is_last=True)
            return
        if request.code != Code.GET:
            pipe.add_response(aiocoap.Message(code=Code.METHOD_NOT_ALLOWED), is_last=True)
            return
        content_format = negotiate(request.opt.accept)
        if content_format is None:
            pipe.add_response(aiocoap.Message(code=Code.NOT_ACCEPTABLE, payload=b"accepted content formats: 50 (JSON), 60 (CBOR)"), is_last=True)
            return
        if resource.doc is None:
            self.sim.refresh_now()
        payload = resource.payload(content_format)
        self.sim.count_published(1)
        if request.opt.observe != 0:
            pipe.add_response(self.sim.response(payload, content_format), is_last=True)
            return
        parked = asyncio.get_running_loop().create_future()
        observer = _Observer(pipe, content_format, request.remote, parked)
        first = self.sim.response(payload, content_format)
        first.opt.observe = 0
        # One observation per client endpoint and resource: a client that re-registers (e.g. after
        # it judged the observation lost) replaces its old one. NON notifications to a token the
        # client forgot are ignored silently by the client, so without this they would flow forever.
        for old in [o for o in resource.observers if o.remote == request.remote]:
            resource.observers.remove(old)
            if not old.parked.done():
                old.parked.set_result(None)
        resource.observers.append(observer)
        self.sim.observations += 1
        try:
            pipe.add_response(first, is_last=False)
            # Parked until the client loses interest (aiocoap cancels this task) or re-registers.
            await parked
        finally:
            self.sim.observations -= 1
            try:
                resource.observers.remove(observer)
            except ValueError:
                pass

    async def _render_well_known(self, pipe: Any) -> None:
        request = pipe.request
        if request.code != Code.GET:
            pipe.add_response(aiocoap.Message(code=Code.METHOD_NOT_ALLOWED), is_last=True)
            return
        if request.opt.accept not in (None, CF_LINK_FORMAT):
            pipe.add_response(aiocoap.Message(code=Code.NOT_ACCEPTABLE), is_last=True)
            return
        payload = self.link_format(list(request.opt.uri_query))
        # Block-wise transfer (RFC 7959): the listing of a large shard spans many blocks.
        block2 = request.opt.block2
        szx = min(block2.size_exponent, 6) if block2 is not None else 6
        number = block2.block_number if block2 is not None else 0
        size = 1 << (szx + 4)
        chunk = payload[number * size : (number + 1) * size]
        if number * size > len(payload) and payload:
            pipe.add_response(aiocoap.Message(code=Code.BAD_OPTION), is_last=True)
            return
        response = aiocoap.Message(code=Code.CONTENT, payload=chunk, content_format=CF_LINK_FORMAT)
        if len(payload) > size or block2 is not None:
            from aiocoap.optiontypes import BlockOption

            response.opt.block2 = BlockOption.BlockwiseTuple(number, (number + 1) * size < len(payload), szx)
        pipe.add_response(response, is_last=True)


def _link_matches(query: str, href: str, rt: str) -> bool:
    name, _, wanted = query.partition("=")
    value = {"href": href, "rt": rt}.get(name)
    if value is None:
        return False
    if wanted.endswith("*"):
        return value.startswith(wanted[:-1])
    return value == wanted


class CoapSimulator:
    """Keeps every resource's reading current and notifies its observers."""

    def __init__(self, opts: SimulatorOptions):
        fleet = opts.fleet
        self.spec = fleet.spec
        self.cfg = fleet.spec.protocols.coap
        self.fleet_name = fleet.name
        self.model = SignalModel(fleet.spec, fleet.name, PROTOCOL)
        self.metrics = FleetMetrics(fleet.name, PROTOCOL, "simulator")
        self.host = opts.host
        self.port = opts.port if opts.port is not None else self.cfg.port
        shard = shard_devices(self.cfg.devices, self.cfg.replicas, opts.replica)
        self.indices = np.arange(shard.start, shard.stop, dtype=np.int64)
        self.phase = self.model.phase(self.indices)
        self.last_tick = np.full(len(self.indices), -1, dtype=np.int64)
        self.min_round = min(MAX_ROUND, self.model.interval / 5)
        self.site = CoapSite(self)
        sensors = self.model.sensors
        self.grid: list[list[SensorResource]] = []
        for i in self.indices.tolist():
            row = [SensorResource(device_id(PROTOCOL, i), s.name, s.unit) for s in sensors]
            for r in row:
                self.site.add(r)
            self.grid.append(row)
        self.site.build_link_format()
        self.observations = 0
        self.totals = {"published": 0, "dropped": 0}
        self.max_age = max(1, math.ceil(self.model.interval))
        self.context: aiocoap.Context | None = None

    # --- messages -------------------------------------------------------------------------------
    def response(self, payload: bytes, content_format: int) -> aiocoap.Message:
        return aiocoap.Message(code=Code.CONTENT, payload=payload, content_format=content_format, max_age=self.max_age)

    def _backlog(self, remote: Any) -> int:
        """CON notifications aiocoap holds back for `remote` (NSTART = 1)."""
        return aiocoap_backlog(self.context, remote) if self.context is not None else 0

    def count_published(self, n: int) -> None:
        self.metrics.published.inc(n)
        self.metrics.last_activity.set(time.time())
        self.totals["published"] += n

    # --- the update loop --------------------------------------------------------------------------
    def due_ticks(self, now: float) -> np.ndarray:
        return np.floor((now - self.model.epoch) / self.model.interval - self.phase).astype(np.int64)

    def refresh_now(self) -> int:
        """Make every device's reading for the current time current and notify observers."""
        now = time.time()
        ticks = self.due_ticks(now)
        changed = np.nonzero(ticks > self.last_tick)[0]
        if not len(changed):
            return 0
        started = self.last_tick[changed] >= 0
        skipped = int(np.sum((ticks[changed] - self.last_tick[changed] - 1)[started]))
        if skipped:
            self.metrics.dropped("overload").inc(skipped * len(self.model.sensors))
            self.totals["dropped"] += skipped * len(self.model.sensors)
        self.last_tick[changed] = ticks[changed]
        block = self.model.block(self.indices[changed], ticks[changed])
        self._apply(changed, block)
        # How late the earliest of these readings is being served.
        self.metrics.schedule_lag.set(max(0.0, now - float(block.times.min()) - self.model.interval))
        return len(changed)

    def _apply(self, rows: np.ndarray, block: Any) -> None:
        confirmable = self.cfg.confirmable
        mtype = CON if confirmable else NON
        sensors = self.model.sensors
        values = block.values.tolist()
        quality = block.quality.tolist()
        anomaly = block.anomaly.tolist()
        ticks = block.ticks.tolist()
        times = block.times.tolist()
        sent = 0
        skipped = 0
        for j, row in enumerate(rows.tolist()):
            resources = self.grid[row]
            ts = format_ts(utc(times[j]))
            for s, resource in enumerate(resources):
                q = quality[j][s]
                resource.set_reading(
                    {
                        "fleet": self.fleet_name,
                        "protocol": PROTOCOL,
                        "device": resource.device,
                        "sensor": resource.sensor,
                        "value": None if q == QUALITY_BAD else values[j][s],
                        "unit": sensors[s].unit,
                        "ts": ts,
                        "seq": ticks[j],
                        "quality": QUALITY_NAMES[q],
                        "anomaly": ANOMALY_NAMES[anomaly[j][s]],
                    }
                )
                for observer in list(resource.observers):
                    if confirmable and self._backlog(observer.remote) >= MAX_CON_BACKLOG:
                        skipped += 1
                        continue
                    observer.number = (observer.number + 1) & 0xFFFFFF
                    message = self.response(resource.payload(observer.content_format), observer.content_format)
                    message.mtype = mtype
                    message.opt.observe = observer.number
                    try:
                        observer.pipe.add_response(message, is_last=False)
                    except Exception as exc:  # noqa: BLE001 -- one dead observation must not stop the others
                        # aiocoap ends a pipe (peer sent RST, deregistered) slightly before it
                        # cancels the render task that would remove the observer.
                        self._forget(resource, observer)
                        self.metrics.error("notify_failed").inc()
                        log.debug("notification to %s failed: %r", observer.remote, exc)
                        continue
                    sent += 1
        if sent:
            self.count_published(sent)
        if skipped:
            self.metrics.dropped("con_backlog").inc(skipped)
            self.totals["dropped"] += skipped

    def _forget(self, resource: SensorResource, observer: _Observer) -> None:
        try:
            resource.observers.remove(observer)
        except ValueError:
            pass

    def next_due(self) -> float:
        """Unix time at which the next device reading becomes current."""
        return float(self.model.epoch + ((self.last_tick + 1 + self.phase) * self.model.interval).min())

    async def run(self, stop: threading.Event, duration: float | None) -> None:
        self.context = await aiocoap.Context.create_server_context(self.site, bind=(self.host, self.port), transports=["udp6"])
        log.info(
            "CoAP simulator of fleet %s: %d devices x %d sensors on coap://%s:%d (%s notifications)",
            self.fleet_name, len(self.indices), len(self.model.sensors), self.host, self.port,
            "confirmable" if self.cfg.confirmable else "non-confirmable",
        )
        self.metrics.devices.set(len(self.indices))
        self.metrics.connected.set(1)
        gc.freeze()  # the resource tree lives as long as the process; spare the cyclic GC walking it
        deadline = time.monotonic() + duration if duration else math.inf
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                self.refresh_now()
                self.metrics.queue.set(self.observations)
                delay = self.next_due() - time.time()
                await asyncio.sleep(min(MAX_SLEEP, max(self.min_round, delay)))
        finally:
            self.metrics.connected.set(0)
            await self.context.shutdown()


def run(opts: SimulatorOptions) -> int:
    """Serve the CoAP devices of shard `opts.replica` until SIGINT/SIGTERM or `opts.duration`."""
    stop = stop_event_on_signals()
    try:
        sim = CoapSimulator(opts)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        sim.metrics.serve(opts.metrics_port, opts.metrics_host, opts.metrics_port_file)
        asyncio.run(sim.run(stop, opts.duration))
    except OSError as exc:
        log.error("CoAP simulator cannot start: %s", exc)
        return 1
    # last_tick_sum: sum over devices of the last tick served; lets a test check the tail exactly.
    log.info("SUMMARY %s", json.dumps({"component": "simulator", "protocol": PROTOCOL, **sim.totals, "devices": len(sim.indices), "last_tick_sum": int(sim.last_tick.sum())}))
    return 0
