"""CoAP collector: discovers every target's resources through `/.well-known/core`, observes them
(RFC 7641), falls back to polling where observe is refused, re-registers when a server restarts,
and hands every reading to the shared `CollectorSink` (dedupe, gap = lost, dataset, metrics).

Threads: the asyncio loop only receives (UDP must be drained promptly or the kernel drops
datagrams, silently); decoding, validation and Parquet writes run in one sink thread fed through a
deque, so a slow batch write never stalls reception.
"""

from __future__ import annotations

import asyncio
import gc
import collections
import json
import logging
import math
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import aiocoap
import cbor2
from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code
from aiocoap.util import linkformat

from sensorfleet.collectors.base import CollectorSink, SequenceSpace, drain_into_sink
from sensorfleet.internals import aiocoap_skip_non_deduplication
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import DEFAULT_MAX_PAYLOAD_BYTES, DecodedPayload, MalformedReading, decode_json_payload, readings_from_documents
from sensorfleet.runtime import CollectorOptions, stop_event_on_signals

log = logging.getLogger("sensorfleet.collectors.coap")

PROTOCOL = "coap"
CF_JSON, CF_CBOR, CF_LINK_FORMAT = 50, 60, 40
RESOURCE_TYPE = "sensorfleet.reading"
REGISTRATION_TIMEOUT = 5.0  # seconds to wait for the first response of a registration
MAX_CONCURRENT_REQUESTS = 128  # registrations / polls in flight per target
MAX_BACKOFF = 2.0  # seconds between registration attempts at most
RECEIVE_BUFFER = 4 * 1024 * 1024  # bytes; capped by net.core.rmem_max

# Observations are driven through callbacks: aiocoap's `async for` interface is a lossy one-slot
# queue (two notifications arriving before the consumer runs keep only the last one).
warnings.filterwarnings("ignore", message="register_(call|err)back", category=DeprecationWarning)


def decode_payload(payload: bytes, content_format: int | None, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> DecodedPayload:
    """The readings in a CoAP representation, and a reason for every document refused. Never raises."""
    if content_format == CF_CBOR:
        if len(payload) > max_bytes:
            return DecodedPayload([], [MalformedReading("too_large", f"payload of {len(payload):,} bytes is larger than the limit of {max_bytes:,}")])
        try:
            doc = cbor2.loads(payload)
        except RecursionError:
            return DecodedPayload([], [MalformedReading("too_deep", "CBOR payload nests deeper than the decoder allows")])
        except Exception as exc:  # cbor2 raises several types for garbage; all mean the same here
            kind = "too_deep" if "nesting depth" in str(exc) else "not_cbor"
            return DecodedPayload([], [MalformedReading(kind, f"payload is not CBOR: {exc}")])
        return readings_from_documents(doc)
    if content_format in (CF_JSON, None):
        return decode_json_payload(payload, max_bytes)
    return DecodedPayload([], [MalformedReading("bad_content_format", f"content-format {content_format} is neither 50 (JSON) nor 60 (CBOR)")])


def tune_context(context: aiocoap.Context) -> None:
    """Make an aiocoap client fit for a telemetry stream.

    - Duplicate detection of NON messages is switched off: aiocoap remembers every (peer, message
      ID) for EXCHANGE_LIFETIME (247 s), and a server sending more than 65536 / 247 = 265
      messages/s wraps its 16-bit message IDs inside that window, so genuine notifications get
      dropped as "duplicates" -- the collapse measured in the notes. Readings are de-duplicated on
      (device, sensor, seq) by the sink instead, which is exact.
    - The socket's receive buffer is enlarged so a burst survives a moment of GIL contention.
    The first uses an aiocoap internal, wrapped in sensorfleet.internals (it fails loudly if gone).
    """
    aiocoap_skip_non_deduplication(context)
    for ri in context.request_interfaces:
        manager = getattr(ri, "token_interface", None)
        transport = getattr(getattr(manager, "message_interface", None), "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            except OSError:
                pass


@dataclass
class _Resource:
    path: str
    request: Any = None
    mode: str = "observe"  # or "poll" when the server refused the observation
    last_seen: float = 0.0
    registering: bool = False
    retry_at: float = 0.0


class TargetCollector:
    """Everything about one CoAP server: discovery, observations, polling, recovery."""

    def __init__(self, url: str, context: aiocoap.Context, intake: collections.deque, interval: float, metrics: FleetMetrics):
        parts = urlsplit(url)
        if parts.scheme != "coap" or not parts.hostname:
            raise ValueError(f"target {url!r}: expected coap://host[:port]")
        self.base = f"coap://{parts.hostname}:{parts.port or 5683}"
        self.context = context
        self.intake = intake
        self.interval = interval
        self.metrics = metrics
        # A target silent for this long has forgotten our observations (restarted or gone) ...
        self.target_stale_after = 2.0 * interval + 2.0
        # ... and a single resource silent for this long has lost its observation. Lenient: under
        # CPU starvation single notifications do get lost, and re-registering costs more.
        self.stale_after = 10.0 * interval + 10.0
        self.last_seen = 0.0
        self.resources: dict[str, _Resource] = {}
        self.semaphore = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self.backoff = 0.5
        self.observing = 0

    # --- discovery ------------------------------------------------------------------------------
    async def discover(self) -> int:
        request = aiocoap.Message(code=Code.GET, uri=f"{self.base}/.well-known/core?rt={RESOURCE_TYPE}")
        response = await asyncio.wait_for(self.context.request(request).response, timeout=30)
        if not response.code.is_successful():
            raise ConnectionError(f"{self.base}/.well-known/core answered {response.code}")
        paths = [link.href for link in linkformat.parse(response.payload.decode()).links]
        if not paths:
            raise ConnectionError(f"{self.base}/.well-known/core lists no rt={RESOURCE_TYPE} resources (yet)")
        for path in paths:
            self.resources.setdefault(path, _Resource(path))
        log.info("%s: discovered %d resources", self.base, len(paths))
        gc.freeze()  # long-lived state: keep full GC passes short so the UDP socket is drained
        return len(paths)

    # --- intake ---------------------------------------------------------------------------------
    def _on_message(self, resource: _Resource, message: aiocoap.Message) -> None:
        resource.last_seen = self.last_seen = time.monotonic()
        if message.code.is_successful():
            self.intake.append((message.payload, message.opt.content_format, datetime.now(timezone.utc)))
        else:
            self.metrics.error("coap_error_response").inc()

    # --- observation ----------------------------------------------------------------------------
    async def register(self, resource: _Resource) -> None:
        async with self.semaphore:
            if resource.request is not None:
                self._drop(resource)
            # NON request: aiocoap allows only one outstanding CON per peer (NSTART = 1), which
            # would serialise thousands of registrations; a lost NON is retried after a timeout.
            message = aiocoap.Message(code=Code.GET, transport_tuning=aiocoap.Unreliable, uri=self.base + resource.path, observe=0, accept=CF_CBOR)
            request = self.context.request(message)
            resource.request = request

            def on_error(exc: Exception, resource: _Resource = resource) -> None:
                # Observation ended (network error, server restart); the supervisor re-registers.
                if resource.request is request:
                    resource.request = None
                    resource.retry_at = time.monotonic() + self.backoff

            try:
                first = await asyncio.wait_for(request.response, timeout=REGISTRATION_TIMEOUT)
            except (asyncio.TimeoutError, coap_error.Error, OSError) as exc:
                self._drop(resource)
                resource.retry_at = time.monotonic() + self.backoff
                self.backoff = min(MAX_BACKOFF, self.backoff * 2)
                log.debug("%s%s: registration failed: %r", self.base, resource.path, exc)
                return
            self.backoff = 0.5
            self._on_message(resource, first)
            if first.opt.observe is None or not first.code.is_successful():
                # Observe refused: poll at the device interval instead.
                self._drop(resource)
                if first.code.is_successful():
                    resource.mode = "poll"
                    log.debug("%s%s: observe refused, polling", self.base, resource.path)
                else:
                    resource.retry_at = time.monotonic() + self.stale_after
                return
            if resource.request is request:
                request.observation.register_callback(lambda m, r=resource: self._on_message(r, m))
                request.observation.register_errback(on_error)

    def _drop(self, resource: _Resource) -> None:
        request, resource.request = resource.request, None
        if request is not None and not request.observation.cancelled:
            request.observation.cancel()

    async def poll(self, resource: _Resource) -> None:
        async with self.semaphore:
            message = aiocoap.Message(code=Code.GET, transport_tuning=aiocoap.Unreliable, uri=self.base + resource.path, accept=CF_CBOR)
            try:
                response = await asyncio.wait_for(self.context.request(message).response, timeout=REGISTRATION_TIMEOUT)
            except (asyncio.TimeoutError, coap_error.Error, OSError):
                self.metrics.error("poll_failed").inc()
                return
            self._on_message(resource, response)

    # --- supervision ----------------------------------------------------------------------------
    async def supervise(self, stop: asyncio.Event) -> None:
        tasks: set[asyncio.Task] = set()
        next_poll = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if not self.resources:
                try:
                    await self.discover()
                    self.backoff = 0.5
                except (asyncio.TimeoutError, coap_error.Error, OSError, ConnectionError) as exc:
                    self.metrics.error("discovery_failed").inc()
                    log.warning("%s: discovery failed (%s); retrying in %.1f s", self.base, exc or type(exc).__name__, self.backoff)
                    await _sleep_or_stop(stop, self.backoff)
                    self.backoff = min(MAX_BACKOFF, self.backoff * 2)
                    continue
            polling = now >= next_poll
            if polling:
                next_poll = now + self.interval
            target_silent = self.last_seen and now - self.last_seen > self.target_stale_after
            stale_count = 0
            for resource in self.resources.values():
                if resource.registering:
                    continue
                if resource.mode == "poll":
                    if polling:
                        self._spawn(tasks, self.poll(resource), resource)
                    continue
                limit = self.target_stale_after if target_silent else self.stale_after
                stale = resource.request is not None and now - resource.last_seen > limit
                if stale:
                    stale_count += 1
                if (resource.request is None and now >= resource.retry_at) or stale:
                    self._spawn(tasks, self.register(resource), resource)
            if stale_count:
                log.info("%s: %d observation(s) silent too long%s, re-registering", self.base, stale_count, " (server restarted or gone)" if target_silent else "")
                self.metrics.error("observation_stale").inc(stale_count)
            self.observing = sum(1 for r in self.resources.values() if r.request is not None or r.mode == "poll")
            await _sleep_or_stop(stop, min(0.5, self.interval))
        for resource in self.resources.values():
            self._drop(resource)
        for task in tasks:
            task.cancel()

    def _spawn(self, tasks: set[asyncio.Task], coro: Any, resource: _Resource) -> None:
        resource.registering = True
        task = asyncio.ensure_future(coro)
        tasks.add(task)

        def done(t: asyncio.Task, resource: _Resource = resource) -> None:
            tasks.discard(t)
            resource.registering = False
            if resource.last_seen == 0.0:
                resource.last_seen = time.monotonic()  # staleness counts from the first attempt

        task.add_done_callback(done)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


def handle_item(sink: CollectorSink, item: tuple) -> None:
    """One received representation -> readings in the sink, or counted refusals."""
    payload, content_format, received_at = item
    sink.accept_decoded(decode_payload(payload, content_format), received_at)


def sink_worker(sink: CollectorSink, intake: collections.deque, done: threading.Event) -> None:
    """Decode, validate and store what the network loop received, until `done` and drained."""
    drain_into_sink(sink, intake, done, lambda item: handle_item(sink, item), flush_check_every=2000)


async def collect(opts: CollectorOptions, sink: CollectorSink, intake: collections.deque, stop_flag: threading.Event) -> None:
    interval = opts.fleet.spec.protocols.coap.interval
    # aiocoap logs every unmatched notification at INFO (e.g. stragglers of a replaced observation).
    logging.getLogger("coap").setLevel(logging.WARNING)
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    tune_context(context)
    targets = [TargetCollector(url, context, intake, interval, sink.metrics) for url in opts.targets]
    stop = asyncio.Event()
    deadline = time.monotonic() + opts.duration if opts.duration else math.inf

    async def watch_stop() -> None:
        while not stop_flag.is_set() and time.monotonic() < deadline and not sink.metrics.dead_workers():
            sink.metrics.connected.set(1 if all(t.resources and t.observing == len(t.resources) for t in targets) else 0)
            await asyncio.sleep(0.2)
        stop.set()

    try:
        await asyncio.gather(watch_stop(), *(t.supervise(stop) for t in targets))
    finally:
        sink.metrics.connected.set(0)
        await context.shutdown()


def run(opts: CollectorOptions) -> int:
    """Collect from every CoAP server in `opts.targets` until SIGINT/SIGTERM or `opts.duration`."""
    stop = stop_event_on_signals()
    if not opts.targets:
        log.error("no CoAP targets given (e.g. --target coap://127.0.0.1:5683)")
        return 2
    fleet = opts.fleet
    metrics = FleetMetrics(fleet.name, PROTOCOL, "collector")
    sink = CollectorSink(fleet.name, PROTOCOL, opts.data_url, metrics, fleet.spec.collector.batch_size, fleet.spec.collector.flush_interval,
                         writer_id=opts.client_id, buffer_limit=fleet.spec.storage.max_buffered_readings)
    try:
        metrics.serve(opts.metrics_port, opts.metrics_host, opts.metrics_port_file)
    except OSError as exc:
        log.error("%s", exc)
        return 1
    resumed = sink.resume_from_dataset(space=SequenceSpace.of(fleet.spec, PROTOCOL))
    if resumed:
        log.info("resuming %d series from the dataset", resumed)
    intake: collections.deque = collections.deque()
    sink.start_storage_thread()  # bounded buffer; beyond it readings are counted lost (backpressure.py)
    done = threading.Event()
    worker = metrics.watch(threading.Thread(target=sink_worker, args=(sink, intake, done), name="coap-sink", daemon=True))
    worker.start()
    code = 0
    try:
        asyncio.run(collect(opts, sink, intake, stop))
    except ValueError as exc:
        log.error("%s", exc)
        code = 2
    finally:
        died = metrics.dead_workers()  # before `done`: from then on the worker ends by design
        done.set()
        worker.join(timeout=60)
    if died and code == 0:
        log.error("thread(s) %s ended unexpectedly; exiting so the collector is restarted", ", ".join(died))
        metrics.error("worker_died").inc()
        code = 1
    log.info("SUMMARY %s", json.dumps(sink.summary()))
    return code
