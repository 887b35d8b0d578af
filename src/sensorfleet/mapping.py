"""How a payload of a device SensorFleet did not write becomes a Reading: MQTT topic patterns with
named segments, JSON pointers (RFC 6901) and timestamp formats. Pure: no I/O, no protocol library,
so the spec validates with it and every collector of third-party sources shares it.

A topic pattern is an MQTT topic filter whose single-level segments may be named:

    plant/+/{device}/{sensor}      `+` any one level, `{name}` any one level, captured as `name`
    plant/{device}/#               `#` the rest (last level only)

The broker is subscribed to the filter with every `{name}` as `+`; the captured names fill the
device and sensor templates (`"{site}-{device}"`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

TimestampFormat = Literal["iso8601", "unixSeconds", "unixMilliseconds"]
TIMESTAMP_FORMATS: tuple[str, ...] = ("iso8601", "unixSeconds", "unixMilliseconds")
_NAMED = re.compile(r"^\{([a-z][a-z0-9_]{0,30})\}$")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_POINTER_ESCAPE = re.compile(r"~(?![01])")
# Unix timestamps outside [1970, 2200) are far more likely a wrong format than a real reading.
_MAX_UNIX_SECONDS = 7_258_118_400


class MappingError(ValueError):
    """A payload the mapping cannot turn into a reading; `kind` is a MALFORMED_REASONS label."""

    def __init__(self, kind: str, detail: str):
        self.kind = kind
        super().__init__(detail)


# --- topic patterns ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopicPattern:
    pattern: str
    levels: tuple[str, ...]  # "+", "#", a literal, or "{name}"
    names: tuple[str, ...]

    @classmethod
    def parse(cls, pattern: str) -> TopicPattern:
        """Raise ValueError naming the level at fault."""
        if not pattern or len(pattern) > 512:
            raise ValueError("a topic pattern has 1 to 512 characters")
        if pattern.startswith("$"):
            raise ValueError("topics starting with '$' are the broker's own ($SYS, $share)")
        levels = tuple(pattern.split("/"))
        names: list[str] = []
        for index, level in enumerate(levels):
            if level == "#":
                if index != len(levels) - 1:
                    raise ValueError(f"level {index + 1}: '#' may only be the last level")
                continue
            if level == "+":
                continue
            named = _NAMED.match(level)
            if named:
                if named.group(1) in names:
                    raise ValueError(f"level {index + 1}: the name {{{named.group(1)}}} is used twice")
                names.append(named.group(1))
                continue
            if any(c in level for c in "+#{}"):
                raise ValueError(f"level {index + 1} ({level!r}): '+', '#' and '{{name}}' must fill a whole level; names are lower case, e.g. {{device}}")
        return cls(pattern, levels, tuple(names))

    @property
    def subscription(self) -> str:
        """The MQTT topic filter: every named level as `+`."""
        return "/".join("+" if _NAMED.match(level) else level for level in self.levels)

    def match(self, topic: str) -> dict[str, str] | None:
        """The named levels of `topic`, or None when the pattern does not match it."""
        parts = topic.split("/")
        captured: dict[str, str] = {}
        for index, level in enumerate(self.levels):
            if level == "#":
                return captured
            if index >= len(parts):
                return None
            if level == "+":
                continue
            named = _NAMED.match(level)
            if named:
                captured[named.group(1)] = parts[index]
            elif level != parts[index]:
                return None
        return captured if len(parts) == len(self.levels) else None


def template_names(template: str) -> list[str]:
    """The `{name}` placeholders of a device or sensor template."""
    return _PLACEHOLDER.findall(template)


def fill(template: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# --- JSON pointers (RFC 6901) -------------------------------------------------------------------
def check_pointer(pointer: str) -> str:
    """Raise ValueError unless `pointer` is an RFC 6901 JSON pointer ("" or "/a/b~1c/0")."""
    if pointer and not pointer.startswith("/"):
        raise ValueError(f"a JSON pointer is empty (the whole document) or starts with '/', e.g. /value; got {pointer!r}")
    if _POINTER_ESCAPE.search(pointer):
        raise ValueError(f"'~' must be followed by 0 ('~') or 1 ('/') in a JSON pointer, got {pointer!r}")
    return pointer


def resolve(document: Any, pointer: str) -> Any:
    """The value `pointer` names in `document`; MappingError("missing_field") when there is none."""
    if not pointer:
        return document
    current = document
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(current, dict):
            if token not in current:
                raise MappingError("missing_field", f"JSON pointer {pointer}: no member {token!r}")
            current = current[token]
        elif isinstance(current, list):
            if not token.isdigit() or (len(token) > 1 and token.startswith("0")) or int(token) >= len(current):
                raise MappingError("missing_field", f"JSON pointer {pointer}: no element {token!r} in an array of {len(current)}")
            current = current[int(token)]
        else:
            raise MappingError("missing_field", f"JSON pointer {pointer}: {token!r} reaches into a {type(current).__name__}")
    return current


# --- values and timestamps ----------------------------------------------------------------------
def number(raw: Any, where: str) -> float:
    """A finite float from a JSON number (or a numeric string, which many devices send)."""
    if isinstance(raw, bool) or raw is None:
        raise MappingError("wrong_type", f"{where}: expected a number, got {_shown(raw)}")
    if isinstance(raw, str):
        try:
            raw = float(raw.strip())
        except ValueError:
            raise MappingError("wrong_type", f"{where}: expected a number, got {_shown(raw)}") from None
    if not isinstance(raw, int | float):
        raise MappingError("wrong_type", f"{where}: expected a number, got {_shown(raw)}")
    try:
        value = float(raw)
    except OverflowError:
        raise MappingError("out_of_range", f"{where}: {raw!r:.40} does not fit a double") from None
    if not math.isfinite(value):
        raise MappingError("non_finite", f"{where}: {value} is not a finite number")
    return value


def timestamp(raw: Any, fmt: str, where: str) -> datetime:
    """A UTC datetime from a timestamp in `fmt` (TIMESTAMP_FORMATS); MappingError("bad_ts")."""
    try:
        if fmt == "iso8601":
            if not isinstance(raw, str):
                raise ValueError(f"expected an ISO 8601 string, got {_shown(raw)}")
            ts = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
            if ts.tzinfo is None:
                raise ValueError(f"{raw!r:.40} has no time zone (add Z or +01:00)")
            return ts.astimezone(timezone.utc)
        seconds = number(raw, where) / (1000.0 if fmt == "unixMilliseconds" else 1.0)
        if not 0 <= seconds < _MAX_UNIX_SECONDS:
            raise ValueError(f"{raw!r:.40} is not a Unix time in {'milliseconds' if fmt == 'unixMilliseconds' else 'seconds'} between 1970 and 2200")
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    except MappingError as exc:
        raise MappingError("bad_ts", str(exc)) from None
    except (ValueError, OverflowError, OSError) as exc:
        raise MappingError("bad_ts", f"{where}: {exc}") from None


def _shown(raw: Any) -> str:
    return type(raw).__name__ if isinstance(raw, dict | list) else f"{raw!r:.40}"
