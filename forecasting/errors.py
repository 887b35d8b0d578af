"""The error types the forecasting stages raise for problems a user can fix, or wait out."""

from __future__ import annotations


class ForecastInputError(ValueError):
    """Bad input (empty or too-short dataset, missing columns, bad horizon...): one line that says
    what is wrong and how to fix it. The CLI prints it and exits with code 2, without a traceback."""


class NotEnoughData(ForecastInputError):
    """The dataset is young: it holds `have` steps of `freq` but the horizon, CV windows and daily
    season need `need`. Not a failure: time fixes it. The CLI reports "waiting for data" and exits 0
    (a fleet's forecast CronJob on a new fleet succeeds, and status.lastForecast says why)."""

    def __init__(self, have: int, need: int, freq: str, detail: str) -> None:
        self.have, self.need, self.freq, self.detail = have, need, freq, detail
        super().__init__(f"waiting for data: have {have} steps of {freq}, need {need} ({detail})")

    def __reduce__(self) -> tuple[type, tuple[int, int, str, str]]:
        # Raised in a `--jobs` shard process, it crosses to the parent pickled: rebuild it from
        # its fields, not from the one-string args.
        return (type(self), (self.have, self.need, self.freq, self.detail))


class NoReadings(ForecastInputError):
    """The dataset (or its window) holds no reading at all. An error for a user who named the wrong
    place; with `--wait-for-data` (a fleet's CronJob, whose collectors may not have written yet) it
    is a young dataset of 0 steps."""


class EmptySelection(ForecastInputError):
    """The dataset has readings but `keep` (a shard, a device list) selects none of them."""
