"""The SensorFleet and Mosquitto images, built here with no registry and no Docker engine.

Users build the image with Docker from the repository's Dockerfile (`make image`). This machine has
no Docker engine and may not pull from any registry, so the very same Dockerfile is built with
podman from a Debian base that debootstrap makes (its `BASE_IMAGE` build argument), and a Mosquitto
image is built from Debian's `mosquitto` package (hack/mosquitto.Containerfile). Both are tagged
exactly as the operator references them (`BuildOptions().image`, `spec.broker.image`), so pods
with `imagePullPolicy: IfNotPresent` find them in the node's containerd and pull nothing.

    debootstrap --variant=minbase bookworm  ->  base-<hash>.tar  ->  podman import
    Dockerfile (BASE_IMAGE=the base)        ->  sensorfleet-<hash>.oci.tar
    hack/mosquitto.Containerfile            ->  mosquitto-<hash>.oci.tar

Each archive is named by a hash of everything that goes into it (the base's recipe, the
Dockerfile, the files it copies), under ``~/.cache/sensorfleet/images/``: a second call with the
same inputs builds nothing, an edited source file rebuilds the app image only.

    python -m devcluster.images        # make images: build what is missing, print the archives
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
MOSQUITTO_CONTAINERFILE = REPO / "hack" / "mosquitto.Containerfile"
# What the Dockerfile COPYs (keep in step with it; tests/images checks that every COPY is here).
APP_CONTEXT = ("pyproject.toml", "README.md", "src", "operator", "simulators", "collectors", "forecasting")
# Matches .dockerignore's patterns for the copied folders: never part of the image.
IGNORED_PARTS = ("__pycache__", ".egg-info", ".pyc")

DEBIAN_SUITE = "bookworm"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# python3 + venv for the app; passwd for useradd; ca-certificates so TLS (S3, TimeGPT) works.
BASE_PACKAGES = ("python3", "python3-venv", "passwd", "ca-certificates")
# A container may not raise an rlimit here (no CAP_SYS_RESOURCE) and podman raises them by default:
# ask for no more than the host's hard limits.
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
# The host's CA bundle is bind-mounted over the image's during RUN steps only: pip inside the build
# then trusts whatever this machine trusts; the committed image keeps Debian's own bundle.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageArchive:
    """One image as an OCI archive: `ref` is the fully qualified name the node's containerd gets."""

    ref: str
    archive: Path
    built: bool  # False: taken from the cache


class ImageBuildError(RuntimeError):
    """A build step failed; the message names the step and the log file with its output."""


def cache_dir() -> Path:
    root = os.environ.get("SENSORFLEET_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sensorfleet"
    return Path(root) / "images"


def qualified_ref(image: str) -> str:
    """`sensorfleet:0.1.0` -> `docker.io/library/sensorfleet:0.1.0`: the name the kubelet asks
    containerd for (Docker's reference normalisation), so an imported image matches a pod's."""
    name = image
    first, _, rest = name.partition("/")
    if not rest or ("." not in first and ":" not in first and first != "localhost"):
        name = f"docker.io/{name if rest else 'library/' + name}"
    if ":" not in name.rsplit("/", 1)[-1] and "@" not in name:
        name += ":latest"
    return name


def app_image_ref() -> str:
    from sensorfleet.operator.child_meta import BuildOptions

    return qualified_ref(BuildOptions().image)


def broker_image_ref() -> str:
    from sensorfleet.spec import BrokerSpec

    return qualified_ref(BrokerSpec().image)


def debian_mirror() -> str:
    """The first `URIs:` of the machine's Debian sources (the mirror apt already uses)."""
    try:
        for line in DEBIAN_SOURCES.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    except OSError:
        pass
    return DEFAULT_MIRROR


# --------------------------------------------------------------------------------------------
# input hashes
# --------------------------------------------------------------------------------------------


def _ignored(path: Path) -> bool:
    return any(part.endswith(IGNORED_PARTS) for part in path.parts)


def _hash_tree(digest: hashlib._Hash, root: Path, relative: str) -> None:
    path = root / relative
    if path.is_symlink():
        digest.update(f"L {relative} {os.readlink(path)}\n".encode())
    elif path.is_dir():
        for child in sorted(path.iterdir()):
            if not _ignored(child.relative_to(root)):
                _hash_tree(digest, root, str(child.relative_to(root)))
    elif path.is_file():
        digest.update(f"F {relative} {path.stat().st_mode & 0o111:o}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())


def base_hash(mirror: str | None = None) -> str:
    recipe = f"debootstrap minbase {DEBIAN_SUITE} {mirror or debian_mirror()} {','.join(BASE_PACKAGES)}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def app_hash(base: str, repo: Path = REPO) -> str:
    digest = hashlib.sha256(f"base {base} ref {app_image_ref()}\n".encode())
    _hash_tree(digest, repo, "Dockerfile")
    for name in APP_CONTEXT:
        _hash_tree(digest, repo, name)
    return digest.hexdigest()[:16]


def broker_hash(base: str, repo: Path = REPO) -> str:
    digest = hashlib.sha256(f"base {base} ref {broker_image_ref()}\n".encode())
    _hash_tree(digest, repo, str(MOSQUITTO_CONTAINERFILE.relative_to(REPO)))
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def _stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Steps:
    """Runs commands with their output in a log file, forwarding the lines worth a glance."""

    def __init__(self, logs: Path, progress: Progress):
        self.logs = logs
        self.progress = progress
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        self.progress(f"[images {elapsed // 60:3d}m{elapsed % 60:02d}s] {message}")

    def run(self, name: str, argv: list[str], *, stdin: int | None = None, forward: tuple[str, ...] = ()) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        self.say(f"▶ {name} (log: {log})")
        start = time.monotonic()
        with log.open("w") as out:
            out.write("$ " + " ".join(argv) + "\n")
            out.flush()
            process = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
            assert process.stdout is not None
            for line in process.stdout:
                out.write(line)
                out.flush()
                if any(token in line[:24] for token in forward):  # "[1/2] STEP 3/9: ..." too
                    self.say(f"  {name}: {line.strip()[:120]}")
            code = process.wait()
        if code != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
            raise ImageBuildError(f"{name} failed (exit {code}); last lines of {log}:\n{tail}")
        self.say(f"✓ {name} in {time.monotonic() - start:.0f}s")


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One build at a time per cache folder (make images and a test session may race)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _podman(*args: str) -> list[str]:
    return ["podman", *args]


def _podman_has(ref: str) -> bool:
    return subprocess.run(_podman("image", "exists", ref), capture_output=True).returncode == 0


def _require_tools() -> None:
    missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
    if missing:
        raise ImageBuildError(f"{', '.join(missing)} not on PATH: install hack/system-packages.txt (make system-packages)")
    if os.geteuid() != 0:
        raise ImageBuildError("debootstrap and podman import need root here (no user namespaces for rootless podman)")


def _ensure_base(steps: _Steps, folder: Path, base: str) -> str:
    """The debootstrap base as a podman image `localhost/sensorfleet-base:<hash>`; its rootfs
    tarball is cached so that a cleared podman storage only re-imports it."""
    ref = f"localhost/sensorfleet-base:{base}"
    if _podman_has(ref):
        return ref
    tarball = folder / f"base-{base}.tar"
    if not tarball.exists():
        rootfs = folder / f"rootfs-{base}.tmp"
        _remove_rootfs(rootfs)
        steps.run("debootstrap", ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                                  DEBIAN_SUITE, str(rootfs), debian_mirror()], forward=("I: Retrieving", "I: Base system"))
        # apt's lists and the downloaded .debs are not part of a base image
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / leftover).glob("*.deb" if leftover.endswith("archives") else "*_*"):
                entry.unlink()
        partial = tarball.with_suffix(".tar.tmp")
        steps.run("pack-base", ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."])
        partial.rename(tarball)
        _remove_rootfs(rootfs)
    steps.run("import-base", _podman("import", "--change", "CMD=[\"/bin/bash\"]", str(tarball), ref))
    return ref


def _remove_rootfs(rootfs: Path) -> None:
    """A debootstrap that failed half-way leaves /proc and /sys mounted inside its rootfs: unmount
    them before deleting anything, so nothing outside the rootfs is ever touched."""
    if not rootfs.exists():
        return
    prefix = str(rootfs.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mount], check=False)
    shutil.rmtree(rootfs)


def snapshot_context(target: Path, repo: Path = REPO) -> Path:
    """A copy of what the builds read, so that files edited during a build cannot end up in an
    archive named by the hash of their previous content."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("Dockerfile", ".dockerignore", *APP_CONTEXT, str(MOSQUITTO_CONTAINERFILE.relative_to(REPO))):
        source, copy = repo / name, target / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, symlinks=True, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, copy)
    return target


def _image_id(ref: str) -> str | None:
    found = subprocess.run(_podman("image", "inspect", "--format", "{{.Id}}", ref), capture_output=True, text=True)
    return found.stdout.strip() or None if found.returncode == 0 else None


def _remove_replaced(steps: _Steps, ref: str, previous: str | None) -> None:
    """Remove the image a rebuild took the tag from: left untagged (dangling), its own layers — the
    app's whole virtualenv, copied from the build stage — would pile up with every code edit. Only
    that image: the build cache (the dependency layer above all) is other images and stays, so an
    edit still rebuilds in a minute. Not forced: an image a container still uses stays."""
    if previous is None or previous == _image_id(ref):
        return
    if subprocess.run(_podman("rmi", previous), capture_output=True).returncode == 0:
        steps.say(f"removed the replaced image {previous[:12]} (was {ref})")


def _build(steps: _Steps, name: str, context: Path, containerfile: Path, base_ref: str, ref: str, archive: Path) -> None:
    previous = _image_id(ref)
    argv = _podman(
        "build", "--network", "host", *ULIMITS, "--pull=never",
        "--build-arg", f"BASE_IMAGE={base_ref}",
        "--file", str(context / containerfile.relative_to(REPO)), "--tag", ref,
    )
    if HOST_CA_BUNDLE.exists():
        argv += ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    steps.run(f"build-{name}", [*argv, str(context)], forward=("STEP ", "COMMIT"))
    partial = archive.with_name(archive.name + ".tmp")
    partial.unlink(missing_ok=True)
    steps.run(f"save-{name}", _podman("save", "--format", "oci-archive", "--output", str(partial), ref))
    partial.rename(archive)
    _remove_replaced(steps, ref, previous)


def ensure_images(progress: Progress = _stderr_progress) -> list[ImageArchive]:
    """The app and broker images as OCI archives, built only when their inputs changed.

    Returns them in the order [app, broker]; `ref` is the name to import them under."""
    folder = cache_dir()
    steps = _Steps(folder / "logs", progress)
    base = base_hash()
    context = snapshot_context(folder / f"context-{os.getpid()}")
    try:
        return _ensure(steps, folder, base, context)
    finally:
        shutil.rmtree(context, ignore_errors=True)


def _ensure(steps: _Steps, folder: Path, base: str, context: Path) -> list[ImageArchive]:
    wanted = [
        ("sensorfleet", app_image_ref(), DOCKERFILE, folder / f"sensorfleet-{app_hash(base, context)}.oci.tar"),
        ("mosquitto", broker_image_ref(), MOSQUITTO_CONTAINERFILE, folder / f"mosquitto-{broker_hash(base, context)}.oci.tar"),
    ]
    if all(archive.exists() for *_, archive in wanted):
        for name, ref, _, archive in wanted:
            steps.say(f"{name}: cached {archive.name} ({ref})")
        return [ImageArchive(ref, archive, built=False) for _, ref, _, archive in wanted]
    _require_tools()
    results: list[ImageArchive] = []
    with _locked(folder):
        base_ref: str | None = None
        for name, ref, containerfile, archive in wanted:
            if archive.exists():  # cached, or built by the build that held the lock
                _used_marker(archive).touch()  # in use: _prune keeps it
                steps.say(f"{name}: cached {archive.name} ({ref})")
                results.append(ImageArchive(ref, archive, built=False))
                continue
            base_ref = base_ref or _ensure_base(steps, folder, base)
            _build(steps, name, context, containerfile, base_ref, ref, archive)
            steps.say(f"{name}: built {archive.name} ({archive.stat().st_size / 2**20:.0f} MiB, {ref})")
            results.append(ImageArchive(ref, archive, built=True))
        _prune(folder, {archive.name for *_, archive in wanted})
    return results


# Other checkouts on this machine (worktrees, a CI clone) may be using the archive of their own
# inputs right now: only archives nobody has built or used for this long are removed.
PRUNE_UNUSED_AFTER_S = 6 * 3600


def _prune(folder: Path, keep: set[str], *, now: float | None = None) -> list[Path]:
    """Archives of older inputs are dead weight (each is a few hundred MB); returns those removed."""
    now = time.time() if now is None else now
    removed = []
    for stale in folder.glob("*.oci.tar"):
        marker = _used_marker(stale)
        last_used = max(stale.stat().st_mtime, marker.stat().st_mtime if marker.exists() else 0.0)
        if stale.name not in keep and now - last_used > PRUNE_UNUSED_AFTER_S:
            stale.unlink()
            marker.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def _used_marker(archive: Path) -> Path:
    """Touched on each cache hit (the archive's own mtime says when it was built)."""
    return archive.with_name(archive.name + ".used")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.images", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    try:
        images = ensure_images()
    except ImageBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for image in images:
        print(f"{image.ref}\t{image.archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
