"""Running shards and merging them: `sensorfleet forecast --jobs N` (N local processes) and
`sensorfleet forecast --shard i/N --merge-when-done` (one pod of the operator's Indexed Job).

Both write each shard to OUT/shards/<i>/ and merge into OUT. A merge writes into a fresh
directory first and then moves each file into OUT with an atomic rename, so two shards that
finish together and both see every shard complete (both merge) leave a whole report either way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

from sensorfleet.forecasting.merge import merge_shards
from sensorfleet.forecasting.pipeline import ForecastOptions, ForecastRun, Progress, options_dict, run_forecast
from sensorfleet.forecasting.errors import EmptySelection
from sensorfleet.forecasting.shards import MANIFEST, SHARDS_DIR, complete_shards, parse_shard, shard_dir, write_manifest


def run_shard(options: ForecastOptions) -> float:
    """One shard of a run to be merged, into its own OUT; returns its seconds. A shard that no
    series hashes to writes a manifest saying so (N may exceed the series)."""
    started = time.perf_counter()
    Path(options.out).mkdir(parents=True, exist_ok=True)
    (Path(options.out) / MANIFEST).unlink(missing_ok=True)  # a directory of an earlier run is incomplete until rewritten
    try:
        run_forecast(options)
    except EmptySelection:
        index, count = parse_shard(options.shard or "0/1")
        write_manifest(Path(options.out), {"index": index, "count": count, "run_id": options.run_id, "empty": True, "options": options_dict(options)})
    return time.perf_counter() - started


def merge_into(root: Path, out: Path, progress: Progress | None = None, run_id: str | None = None) -> ForecastRun:
    """Merge the shards under `root` into `out`, file by file atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".merge-", dir=out))
    try:
        run = merge_shards(root, staging, progress, run_id)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "report.html"):  # the report last
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    run.metrics["options"]["out"] = str(out)
    return run


def run_jobs(options: ForecastOptions, jobs: int, progress: Progress) -> ForecastRun:
    """`--jobs N`: the N shards in N processes, then the merge into OUT."""
    out = Path(options.out)
    root = out / SHARDS_DIR
    shutil.rmtree(root, ignore_errors=True)  # no shard of an earlier run may be merged into this one
    run_id = uuid.uuid4().hex
    shards = [replace(options, shard=f"{i}/{jobs}", out=shard_dir(out, i), for_merge=True, run_id=run_id, n_jobs=1) for i in range(jobs)]
    with progress.running():
        with progress.stage(f"shards ({jobs} processes)", jobs) as advance:
            # spawn: a forked child would inherit the parent's threads (BLAS, rich's refresh thread).
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(run_shard, shard) for shard in shards]
                for done, future in enumerate(as_completed(futures), start=1):
                    future.result()  # a shard's ForecastInputError is the user's error: raise it here
                    advance(done, jobs)
    return merge_into(root, out, progress, run_id)


def run_shard_then_merge(options: ForecastOptions, progress: Progress) -> ForecastRun | None:
    """`--shard i/N --merge-when-done`: this shard into OUT/shards/<i>; then, when every shard
    of the run is complete, the merge into OUT. Returns the merged run, or None if others are
    still running (the last to finish merges)."""
    index, count = parse_shard(options.shard or "0/1")
    out = Path(options.out)
    run_shard(replace(options, out=shard_dir(out, index), for_merge=True))
    if complete_shards(out / SHARDS_DIR, count, options.run_id) is None:
        return None
    return merge_into(out / SHARDS_DIR, out, progress, options.run_id)
