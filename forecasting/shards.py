"""Hash shards of the series: `sensorfleet forecast --shard i/N` forecasts the series whose
crc32(protocol/device/sensor) modulo N is i, so N processes (or the N pods of an Indexed Job)
cover each series exactly once; `merge.py` writes one report from their outputs.

A shard that is to be merged writes its outputs to `OUT/shards/<i>/` and, last, `shard.json`
(its index, N, the run id and what the merge needs that the tables do not hold). `shard.json` is
written after everything else, so its presence means the shard is complete.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sensorfleet.forecasting.errors import ForecastInputError

SHARDS_DIR = "shards"
MANIFEST = "shard.json"


def parse_shard(text: str) -> tuple[int, int]:
    """`i/N` -> (i, N) with 0 <= i < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ForecastInputError(f"--shard: expected i/N like 0/4, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ForecastInputError(f"--shard: index must be in 0..N-1 and N >= 1, got {text!r}")
    return index, count


def shard_of(unique_ids: Sequence[str], count: int) -> np.ndarray:
    """The shard of each series: crc32 of its unique_id (protocol/device/sensor) modulo N, the
    same in every process and on every run (str hash() is salted per process)."""
    return np.array([zlib.crc32(u.encode()) % count for u in unique_ids], dtype=np.int64)


def series_of_rows(readings: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """(the distinct unique_ids `protocol/device/sensor` of the rows, each row's index into them),
    from the columns' categorical codes: strings are built once per series, never per reading
    (ten million Python strings would cost gigabytes and minutes)."""
    key = np.zeros(len(readings), dtype=np.int64)
    cats = []
    for column in ("protocol", "device", "sensor"):
        cat = readings[column].astype("category").cat
        cats.append(np.asarray(cat.categories, dtype=object))
        key *= len(cat.categories) + 1
        key += cat.codes.to_numpy().astype(np.int64) + 1
    inverse, keys = pd.factorize(key)
    ids = []
    for k in keys:
        parts = []
        for categories in reversed(cats):
            k, code = divmod(int(k), len(categories) + 1)
            parts.append(str(categories[code - 1]))
        ids.append("/".join(reversed(parts)))
    return ids, inverse


def shard_filter(shard: str) -> Callable[[pd.DataFrame], np.ndarray]:
    """`keep(readings) -> mask` of the rows whose series falls in shard `i/N` (for
    `load.read_selected`, which applies it to each part as it is read)."""
    index, count = parse_shard(shard)

    def keep(readings: pd.DataFrame) -> np.ndarray:
        ids, inverse = series_of_rows(readings)
        return (shard_of(ids, count) == index)[inverse]

    return keep


def series_filter(unique_ids: Sequence[str]) -> Callable[[pd.DataFrame], np.ndarray]:
    """`keep(readings) -> mask` of the rows of these series."""
    wanted = set(unique_ids)

    def keep(readings: pd.DataFrame) -> np.ndarray:
        ids, inverse = series_of_rows(readings)
        return np.array([u in wanted for u in ids], dtype=bool)[inverse]

    return keep


def shard_dir(out: Path, index: int) -> Path:
    return Path(out) / SHARDS_DIR / str(index)


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    """Write `shard.json` atomically (rename), the shard's last act."""
    path = Path(out) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(path)
    return path


def complete_shards(root: Path, count: int, run_id: str | None) -> dict[int, Path] | None:
    """The shard directories under `root` (= OUT/shards) of run `run_id`, when all `count` are
    complete; None while some are missing."""
    found: dict[int, Path] = {}
    for index in range(count):
        path = Path(root) / str(index) / MANIFEST
        if not path.exists():
            return None
        manifest = json.loads(path.read_text())
        if manifest.get("count") != count or manifest.get("run_id") != run_id:
            return None
        found[index] = path.parent
    return found
