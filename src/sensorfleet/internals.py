"""Every private name of a library that SensorFleet relies on, in one place.

Each was chosen because the public API has no equivalent and the hot path needs it (the reasons
are at each function). A release within our pinned ranges may rename any of them: then the
function raises `LibraryInternalsChanged` naming the library, its version and the name, instead
of the patch silently no longer applying, and tests/spine/test_library_guards.py fails in CI
against the installed versions before such a release reaches a user.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any


class LibraryInternalsChanged(RuntimeError):
    def __init__(self, distribution: str, name: str, use: str):
        super().__init__(f"{distribution} {version(distribution)} no longer has {name}, which SensorFleet uses to {use}; "
                         "pin the previous release or adapt sensorfleet/internals.py")


# --- paho-mqtt ---------------------------------------------------------------------------------
def paho_unacknowledged(client: Any) -> int:
    """QoS 1/2 messages paho holds until the broker acknowledges them (no public getter)."""
    queue = getattr(client, "_out_messages", None)
    if queue is None:
        raise LibraryInternalsChanged("paho-mqtt", "Client._out_messages", "count messages not yet acknowledged")
    return len(queue)


# --- aiocoap -----------------------------------------------------------------------------------
def _token_managers(context: Any) -> list[Any]:
    return [ri.token_interface for ri in getattr(context, "request_interfaces", []) if hasattr(ri, "token_interface")]


def aiocoap_skip_non_deduplication(context: Any) -> None:
    """Switch off aiocoap's duplicate detection for NON messages (see collectors/coap.py
    `tune_context` for why: at > 265 msg/s message ids wrap inside its 247 s window)."""
    managers = [m for m in _token_managers(context) if hasattr(m, "_deduplicate_message")]
    if not managers:
        raise LibraryInternalsChanged("aiocoap", "TokenManager._deduplicate_message", "keep NON notifications above 265 msg/s from being dropped as duplicates")
    from aiocoap.numbers.types import NON

    for manager in managers:
        original = manager._deduplicate_message
        manager._deduplicate_message = lambda message, _orig=original: False if message.mtype is NON else _orig(message)


def aiocoap_backlog(context: Any, remote: Any) -> int:
    """CON notifications aiocoap holds back for `remote` (NSTART = 1)."""
    managers = [m for m in _token_managers(context) if hasattr(m, "_backlogs")]  # UDP ones; TCP has none
    if not managers:
        raise LibraryInternalsChanged("aiocoap", "TokenManager._backlogs", "cap the CON notifications held back per client")
    return sum(len(m._backlogs[remote]) for m in managers if remote in m._backlogs)


# --- asyncua -----------------------------------------------------------------------------------
async def asyncua_add_nodes(server: Any, items: list[Any]) -> list[Any]:
    """Add thousands of nodes in one call on the server's internal session (the public
    `add_variable` costs a round of checks per node: minutes for a large fleet)."""
    session = getattr(getattr(server, "iserver", None), "isession", None)
    if session is None or not hasattr(session, "add_nodes"):
        raise LibraryInternalsChanged("asyncua", "Server.iserver.isession.add_nodes", "build the address space in one call")
    return await session.add_nodes(items)


def asyncua_value_attribute(server: Any, nodeid: Any) -> Any:
    """The stored Value attribute of a node, written directly on every tick (the public write
    path validates and copies each value)."""
    from asyncua import ua

    nodes = getattr(getattr(getattr(server, "iserver", None), "aspace", None), "_nodes", None)
    if nodes is None:
        raise LibraryInternalsChanged("asyncua", "AddressSpace._nodes", "write sensor values without a copy per tick")
    return nodes[nodeid].attributes[ua.AttributeIds.Value]


# --- prometheus_client -------------------------------------------------------------------------
def histogram_observe_many(histogram: Any, amounts: Any) -> None:
    """`Histogram.observe` for a whole array at once: a written batch's reading latencies (one
    `observe` per reading cost ~2 µs of the collector's ~20 µs per reading). The public API only
    observes one value at a time; the child keeps per-bucket (non-cumulative) counts, `_sum` and
    `_upper_bounds`, which this updates as `observe` would for each amount."""
    import numpy as np

    bounds, buckets, total = (getattr(histogram, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        raise LibraryInternalsChanged("prometheus-client", "Histogram._upper_bounds/_buckets/_sum", "observe a batch's latencies at once")
    amounts = np.asarray(amounts, dtype=np.float64)
    if not len(amounts):
        return
    # observe() counts an amount in the first bucket whose bound is >= it (the last is +Inf).
    counts = np.bincount(np.searchsorted(np.asarray(bounds, dtype=np.float64), amounts, side="left"), minlength=len(bounds))
    total.inc(float(amounts.sum()))
    for bucket, count in zip(buckets, counts.tolist()):
        if count:
            bucket.inc(count)
