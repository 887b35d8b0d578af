"""The one error type the forecasting stages raise for problems a user can fix."""

from __future__ import annotations


class ForecastInputError(ValueError):
    """Bad input (empty or too-short dataset, missing columns, bad horizon...): one line that says
    what is wrong and how to fix it. The CLI prints it and exits with code 2, without a traceback."""
