"""Collector of one third-party CoAP source (`spec.sources.coap[]`): observe (RFC 7641) each listed
resource of any server and store every representation as a reading of the device and sensor the
spec gives it, `seq` null. The payload is a plain number in text or a JSON document read with JSON
pointers (collectors/foreign.py).

A resource whose server does not let us observe it is polled every `pollInterval`; an observation
the server ends (an error, a restart) is registered again with back-off. CoAP notifications are
"eventually consistent" (RFC 7641, 3.2): a server may skip states of a resource that changes
quickly, and without sequence numbers that cannot be counted; the collector counts what it
received, stored and refused.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import threading
import time
from datetime import datetime, timezone

import aiocoap
from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code

from sensorfleet.collectors.base import CollectorSink, drain_into_sink
from sensorfleet.collectors.foreign import coap_reading
from sensorfleet.metrics import FleetMetrics
from sensorfleet.reading import Reading
from sensorfleet.runtime import CollectorOptions, stop_event_on_signals
from sensorfleet.sources import CoapResource, CoapSource

log = logging.getLogger("sensorfleet.collectors.foreign_coap")

REQUEST_TIMEOUT = 30.0
MAX_BACKOFF = 30.0


class ForeignCoapCollector:
    def __init__(self, opts: CollectorOptions, source: CoapSource, metrics: FleetMetrics):
        self.fleet = opts.fleet.name
        self.source = source
        self.metrics = metrics
        self.intake: collections.deque = collections.deque()
        self.observing: set[str] = set()

    def _take(self, resource: CoapResource, message: aiocoap.Message) -> None:
        if message.code.is_successful():
            self.intake.append((resource, message.payload, datetime.now(timezone.utc)))
        else:
            self.metrics.error("coap_error_response").inc()
            log.warning("source %s: %s answered %s", self.source.name, resource.uri, message.code)

    async def follow(self, context: aiocoap.Context, resource: CoapResource, stop: asyncio.Event) -> None:
        """Observe `resource` until `stop`, registering again whenever the observation ends."""
        backoff = 0.5
        while not stop.is_set():
            request = context.request(aiocoap.Message(code=Code.GET, uri=resource.uri, observe=0))
            ended = asyncio.Event()
            try:
                first = await asyncio.wait_for(request.response, timeout=REQUEST_TIMEOUT)
            except (asyncio.TimeoutError, coap_error.Error, OSError) as exc:
                self.metrics.error("observe_failed").inc()
                log.warning("source %s: %s: %s; retrying in %.1f s", self.source.name, resource.uri, exc or type(exc).__name__, backoff)
                await _sleep_or_stop(stop, backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            self._take(resource, first)
            if not first.code.is_successful():
                await _sleep_or_stop(stop, backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            backoff = 0.5
            if first.opt.observe is None:
                # The server does not let us observe it: poll.
                if not request.observation.cancelled:
                    request.observation.cancel()
                await self.poll(context, resource, stop)
                return
            self.observing.add(resource.uri)
            request.observation.register_callback(lambda message, r=resource: self._take(r, message))
            request.observation.register_errback(lambda _exc: ended.set())
            stopping = asyncio.ensure_future(stop.wait())
            ending = asyncio.ensure_future(ended.wait())
            await asyncio.wait([stopping, ending], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            ending.cancel()
            self.observing.discard(resource.uri)
            if not request.observation.cancelled:
                request.observation.cancel()
            if not stop.is_set():
                self.metrics.error("observation_ended").inc()
                log.info("source %s: the observation of %s ended; registering again", self.source.name, resource.uri)

    async def poll(self, context: aiocoap.Context, resource: CoapResource, stop: asyncio.Event) -> None:
        log.info("source %s: %s cannot be observed; polling every %.1f s", self.source.name, resource.uri, self.source.poll_interval)
        while not stop.is_set():
            await _sleep_or_stop(stop, self.source.poll_interval)
            if stop.is_set():
                return
            try:
                response = await asyncio.wait_for(context.request(aiocoap.Message(code=Code.GET, uri=resource.uri)).response, timeout=REQUEST_TIMEOUT)
            except (asyncio.TimeoutError, coap_error.Error, OSError):
                self.metrics.error("poll_failed").inc()
                continue
            self._take(resource, response)

    def handle(self, sink: CollectorSink, item: tuple) -> None:
        resource, payload, received_at = item
        result = coap_reading(self.fleet, resource, payload, received_at)
        if isinstance(result, Reading):
            sink.accept(result, received_at)
        else:
            sink.reject(result.kind, str(result))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


async def _collect(collector: ForeignCoapCollector, stop_flag: threading.Event, duration: float | None) -> None:
    logging.getLogger("coap").setLevel(logging.WARNING)
    context = await aiocoap.Context.create_client_context()
    stop = asyncio.Event()
    deadline = time.monotonic() + duration if duration else math.inf

    async def watch_stop() -> None:
        while not stop_flag.is_set() and time.monotonic() < deadline and not collector.metrics.dead_workers():
            collector.metrics.connected.set(1 if len(collector.observing) == len(collector.source.resources) else 0)
            await asyncio.sleep(0.2)
        stop.set()

    try:
        await asyncio.gather(watch_stop(), *(collector.follow(context, r, stop) for r in collector.source.resources))
    finally:
        collector.metrics.connected.set(0)
        await context.shutdown()


def run(opts: CollectorOptions) -> int:
    stop = stop_event_on_signals()
    source = opts.fleet.spec.sources.named(opts.source or "")
    assert isinstance(source, CoapSource)  # the CLI checked the source's protocol
    fleet = opts.fleet
    metrics = FleetMetrics(fleet.name, "coap", "collector")
    sink = CollectorSink(fleet.name, "coap", opts.data_url, metrics, fleet.spec.collector.batch_size, fleet.spec.collector.flush_interval,
                         writer_id=opts.client_id or f"{fleet.name}-src-{source.name}", buffer_limit=fleet.spec.storage.max_buffered_readings)
    collector = ForeignCoapCollector(opts, source, metrics)
    metrics.serve(opts.metrics_port, opts.metrics_host, opts.metrics_port_file)
    sink.start_storage_thread()
    done = threading.Event()
    worker = metrics.watch(threading.Thread(target=drain_into_sink, args=(sink, collector.intake, done, lambda item: collector.handle(sink, item)),
                                            name="source-coap-sink", daemon=True))
    worker.start()
    try:
        asyncio.run(_collect(collector, stop, opts.duration))
    finally:
        died = metrics.dead_workers()
        done.set()
        worker.join(timeout=60)
    code = 0
    if died:
        log.error("thread(s) %s ended unexpectedly; exiting so the collector is restarted", ", ".join(died))
        code = 1
    log.info("SUMMARY %s", json.dumps({**sink.summary(), "source": source.name}))
    return code
