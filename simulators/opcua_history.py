"""HistoryRead (raw values) of the OPC UA simulator, answered from the signal model: nothing is
stored. The value a device had at tick k is `SignalModel.block([d], [k], write log)`, exactly what
was served live, so a historian client can backfill the last `spec.protocols.opcua.historyHours`
of every sensor variable after an outage.

OPC UA Part 11 ReadRawModifiedDetails, as served here:
- StartTime < EndTime: values with StartTime <= ts < EndTime, oldest first;
  StartTime > EndTime: values with EndTime < ts <= StartTime, newest first;
  only StartTime: oldest first from StartTime; only EndTime: newest first from EndTime.
- Only ticks already served and inside the history window count (never a future value).
- NumValuesPerNode (0: no limit) and the server's `max_history_data_response_size` (10,000) bound
  one response; when more values remain, the response carries a continuation point, and the next
  request continues exactly at the following value. (asyncua's HistoryManager packs the next
  value's source timestamp as the continuation point; our ticks are found from it again within a
  hundredth of an interval.) A read with only EndTime returns at most one response: the
  continuation would be taken as a StartTime and turn the order around.
- Timestamps, StatusCodes and values are those of the live variables (Good / Uncertain stuck-at /
  Bad_NoCommunication with a null value).

asyncua's `HistoryStorageInterface` is the extension point; `iserver.history_manager.set_storage`
installs it (guarded by tests/protocols/test_opcua_history.py).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from asyncua import ua
from asyncua.server.history import HistoryStorageInterface

from sensorfleet.signals import QUALITY_BAD, QUALITY_GOOD

STATUS_GOOD = ua.StatusCode(ua.StatusCodes.Good)
STATUS_STUCK = ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)
STATUS_DROPOUT = ua.StatusCode(ua.StatusCodes.BadNoCommunication)
TICK_TOLERANCE = 0.01  # ticks: a timestamp this close to a tick's time is that tick's
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _utc(ts: float) -> dt.datetime:
    return _EPOCH + dt.timedelta(seconds=ts)


def _seconds(when: dt.datetime) -> float:
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


class ModelHistory(HistoryStorageInterface):
    """History of every sensor variable of one simulator, computed from the signal model."""

    def __init__(self, model: Any, variables: dict[ua.NodeId, tuple[int, int]], indices: np.ndarray, phase: np.ndarray,
                 served: Callable[[int], int], controls: Callable[[], Any], hours: float):
        super().__init__()
        self.model = model
        self.variables = variables  # node -> (row, sensor index)
        self.indices = indices
        self.phase = phase
        self.served = served  # row -> last tick served live
        self.controls = controls  # -> the write log (or None)
        self.hours = hours

    async def init(self) -> None:
        return None

    async def new_historized_node(self, node_id: ua.NodeId, period: dt.timedelta | None, count: int = 0) -> None:
        return None  # every sensor variable has history already

    async def save_node_value(self, node_id: ua.NodeId, datavalue: ua.DataValue) -> None:
        return None  # nothing is stored: the model is the history

    async def stop(self) -> None:
        return None

    # --- ticks of a time range ------------------------------------------------------------------
    def _position(self, row: int, when: float) -> float:
        return (when - self.model.epoch) / self.model.interval - float(self.phase[row])

    def ticks(self, row: int, start: dt.datetime | None, end: dt.datetime | None, now: float | None = None) -> np.ndarray:
        """The ticks a raw read of [start, end) (or reversed) covers, in the order to return them."""
        unset = ua.get_win_epoch()
        has_start = start is not None and start > unset
        has_end = end is not None and end > unset
        now = time.time() if now is None else now
        oldest = max(0, math.ceil(self._position(row, now - self.hours * 3600.0) - TICK_TOLERANCE))
        newest = int(self.served(row))
        if newest < oldest or not (has_start or has_end):
            return np.zeros(0, dtype=np.int64)
        first_at_or_after = lambda t: math.ceil(self._position(row, _seconds(t)) - TICK_TOLERANCE)  # noqa: E731
        last_at_or_before = lambda t: math.floor(self._position(row, _seconds(t)) + TICK_TOLERANCE)  # noqa: E731
        if has_start and (not has_end or start < end):  # type: ignore[operator]
            lo = max(oldest, first_at_or_after(start))
            hi = min(newest, first_at_or_after(end) - 1) if has_end else newest
            return np.arange(lo, hi + 1, dtype=np.int64)
        if has_start and start == end:
            k = first_at_or_after(start)
            return np.array([k] if oldest <= k <= min(newest, last_at_or_before(start)) else [], dtype=np.int64)
        top = min(newest, last_at_or_before(start if has_start else end))
        bottom = max(oldest, last_at_or_before(end) + 1) if has_start else oldest
        return np.arange(top, bottom - 1, -1, dtype=np.int64)

    def data_values(self, row: int, s: int, ticks: np.ndarray) -> list[ua.DataValue]:
        if not len(ticks):
            return []
        block = self.model.block(np.full(len(ticks), self.indices[row]), ticks, self.controls())
        out = []
        for value, q, t in zip(block.values[:, s].tolist(), block.quality[:, s].tolist(), block.times.tolist()):
            ts = _utc(t)
            if q == QUALITY_BAD:
                out.append(ua.DataValue(ua.Variant(None, ua.VariantType.Null), StatusCode=STATUS_DROPOUT, SourceTimestamp=ts, ServerTimestamp=ts))
            else:
                out.append(ua.DataValue(ua.Variant(value, ua.VariantType.Double), StatusCode=STATUS_GOOD if q == QUALITY_GOOD else STATUS_STUCK, SourceTimestamp=ts, ServerTimestamp=ts))
        return out

    async def read_node_history(self, node_id: ua.NodeId, start: dt.datetime | None, end: dt.datetime | None, nb_values: int) -> tuple[list[ua.DataValue], dt.datetime | None]:
        where = self.variables.get(node_id)
        if where is None:
            return [], None
        row, s = where
        ticks = self.ticks(row, start, end)
        limit = min(nb_values or self.max_history_data_response_size, self.max_history_data_response_size)
        unset = ua.get_win_epoch()
        reverse_from_end = not (start is not None and start > unset)
        cont = None
        if len(ticks) > limit:
            if not reverse_from_end:
                cont = _utc(float(self.model.tick_times(np.array([self.indices[row]]), ticks[limit : limit + 1])[0]))
            ticks = ticks[:limit]
        return self.data_values(row, s, ticks), cont

    async def new_historized_event(self, source_id: ua.NodeId, evtypes: list[ua.NodeId], period: dt.timedelta | None, count: int = 0) -> None:
        return None

    async def save_event(self, event: Any) -> None:
        return None

    async def read_event_history(self, source_id: ua.NodeId, start: dt.datetime | None, end: dt.datetime | None, nb_values: int, evfilter: Any) -> tuple[list, dt.datetime | None]:
        return [], None
