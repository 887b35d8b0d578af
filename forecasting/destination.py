"""Where a forecast run's files go: a folder, or an fsspec URL such as `s3://bucket/fleet/_reports`
(the operator puts the report beside the dataset, so a fleet with `spec.storage.url` gets a URL).

The pipeline writes with plain paths (pyarrow, matplotlib, the HTML report), so for a URL it
writes into a local temporary folder that is copied up once the run has succeeded: a failed or
waiting run leaves the previous report in the store untouched, never half of a new one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sensorfleet.dataset import filesystem, is_local


def is_remote(out: str) -> bool:
    """An object-store (or other non-local fsspec) URL rather than a folder of this machine."""
    if "://" not in out:
        return False
    fs, _ = filesystem(out)
    return not is_local(fs)


@contextmanager
def staged(out: str) -> Iterator[tuple[Path, Callable[[], list[str]]]]:
    """(folder to write into, publish) — publish copies every file up and returns their URLs."""
    if not is_remote(out):
        yield Path(out.removeprefix("file://")), list
        return
    staging = Path(tempfile.mkdtemp(prefix="sensorfleet-report-"))
    fs, root = filesystem(out)
    scheme = out.split("://", 1)[0]

    def publish() -> list[str]:
        fs.makedirs(root, exist_ok=True)  # s3fs: creates the bucket when missing
        written = []
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = f"{root}/{path.relative_to(staging).as_posix()}"
            fs.put_file(str(path), target)
            written.append(f"{scheme}://{target}")
        return written

    try:
        yield staging, publish
    finally:
        shutil.rmtree(staging, ignore_errors=True)
