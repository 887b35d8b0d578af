"""The images built with no registry: the Dockerfile users build with Docker, built here with podman
from a debootstrap base; the Mosquitto image from Debian's package; OCI archives cached by the hash
of their inputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from devcluster import images
from sensorfleet.operator.child_meta import BuildOptions
from sensorfleet.spec import BrokerSpec


def _podman_run(ref: str, *argv: str, user: str) -> subprocess.CompletedProcess[str]:
    # --read-only-tmpfs=false: no tmpfs on /tmp either, as in a pod that mounts nothing there
    return subprocess.run(["podman", "run", "--rm", "--pull=never", "--network", "none", *images.ULIMITS,
                           "--read-only", "--read-only-tmpfs=false", "--user", user, ref, *argv],
                          capture_output=True, text=True, timeout=300)


def test_images_are_named_as_the_operator_references_them(built_images):
    app, broker = built_images
    assert app.ref == images.qualified_ref(BuildOptions().image) == "docker.io/library/sensorfleet:0.1.0"
    assert broker.ref == images.qualified_ref(BrokerSpec().image) == "docker.io/library/eclipse-mosquitto:2.0.20"
    for image in built_images:
        with tarfile.open(image.archive) as archive:
            index = json.load(archive.extractfile("index.json"))
        names = {m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in index["manifests"]}
        assert any(name and image.ref.endswith(name) for name in names), names


def test_second_call_builds_nothing(built_images):
    before = {image.archive: image.archive.stat().st_mtime_ns for image in built_images}
    lines: list[str] = []
    again = images.ensure_images(progress=lines.append)
    assert [image.built for image in again] == [False, False]
    assert [image.archive for image in again] == [image.archive for image in built_images]
    assert {image.archive: image.archive.stat().st_mtime_ns for image in again} == before
    assert all("cached" in line for line in lines) and len(lines) == 2


def test_app_image_runs_as_non_root_on_a_read_only_root(built_images):
    app = built_images[0]
    result = _podman_run(app.ref, "sensorfleet", "--help", user="10001")
    assert result.returncode == 0, result.stderr
    assert "simulate" in result.stdout and "collect" in result.stdout
    who = _podman_run(app.ref, "sh", "-c", "id -u; touch /opt/sensorfleet/x 2>&1 || echo refused", user="10001")
    assert who.stdout.split()[0] == "10001"
    assert "refused" in who.stdout  # the root filesystem really is read-only


def test_broker_image_is_debian_mosquitto_laid_out_like_eclipse_mosquitto(built_images):
    broker = built_images[1]
    result = _podman_run(broker.ref, "sh", "-c", "command -v mosquitto; command -v mosquitto_passwd; id -u mosquitto; ls -nd /mosquitto/data",
                         user="1883")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0].endswith("/mosquitto") and lines[1].endswith("/mosquitto_passwd")
    assert lines[2] == "1883"  # the uid the operator's broker pod runs as
    assert " 1883 1883 " in lines[3]


def _copy_context(target: Path) -> None:
    for name in ("Dockerfile", *images.APP_CONTEXT, "hack/mosquitto.Containerfile"):
        source = images.REPO / name
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target / name)


def test_only_changed_inputs_change_an_archive_name(tmp_path):
    _copy_context(tmp_path)
    base = images.base_hash("http://deb.debian.org/debian")
    app, broker = images.app_hash(base, tmp_path), images.broker_hash(base, tmp_path)
    assert images.app_hash(base, tmp_path) == app  # stable
    (tmp_path / "src/sensorfleet/__pycache__").mkdir(exist_ok=True)
    (tmp_path / "src/sensorfleet/__pycache__/x.cpython-311.pyc").write_bytes(b"\0")
    assert images.app_hash(base, tmp_path) == app  # .dockerignore'd files do not count
    with (tmp_path / "src/sensorfleet/spec.py").open("a") as source:
        source.write("\n# edited\n")
    assert images.app_hash(base, tmp_path) != app
    assert images.broker_hash(base, tmp_path) == broker
    other_base = images.base_hash("http://mirror.example/debian")
    assert other_base != base and images.app_hash(other_base, tmp_path) != images.app_hash(base, tmp_path)


def test_every_file_the_dockerfile_copies_is_hashed():
    text = images.DOCKERFILE.read_text()
    copied = {src for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M) for src in line.split()[:-1]}
    assert copied and copied <= set(images.APP_CONTEXT)
    # users' `make image` keeps the public base by default
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]


def test_docker_references_are_normalised_like_the_kubelet_does():
    assert images.qualified_ref("sensorfleet:0.1.0") == "docker.io/library/sensorfleet:0.1.0"
    assert images.qualified_ref("eclipse-mosquitto") == "docker.io/library/eclipse-mosquitto:latest"
    assert images.qualified_ref("acme/sf:1") == "docker.io/acme/sf:1"
    assert images.qualified_ref("registry.example:5000/sf:1") == "registry.example:5000/sf:1"
    assert images.qualified_ref("localhost/sf:1") == "localhost/sf:1"


def test_a_rebuild_removes_the_image_it_replaced_and_keeps_the_build_cache(tmp_path):
    """Every app rebuild moves the tag and leaves the previous image dangling, with its own copy of
    the virtualenv: hundreds of MB of podman storage per code edit until removed. A two-stage build
    like the Dockerfile's, with nothing to download (scratch + COPY)."""
    tag = f"localhost/sensorfleet-prune-test:{tmp_path.name[-12:].lower()}"
    label = f"sensorfleet.test.prune={tmp_path.name[-12:].lower()}"  # on every image of this test, for the clean-up
    (tmp_path / "Containerfile").write_text(
        f"FROM scratch AS build\nLABEL {label}\nCOPY deps /deps\nCOPY code /code\n"
        f"FROM scratch\nLABEL {label}\nCOPY --from=build /code /app\n")
    (tmp_path / "deps").write_text("the dependency layer: the same in both builds\n")
    steps = images._Steps(tmp_path / "logs", lambda line: None)

    def build(code: str) -> tuple[str | None, str]:
        (tmp_path / "code").write_text(code)
        previous = images._image_id(tag)
        out = subprocess.run(["podman", "build", "--pull=never", "--tag", tag, "--file", str(tmp_path / "Containerfile"), str(tmp_path)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        images._remove_replaced(steps, tag, previous)
        return images._image_id(tag), out.stdout + out.stderr

    try:
        first, _ = build("version 1\n")
        again, _ = build("version 1\n")
        assert again == first  # nothing changed: the same image, nothing removed
        second, log = build("version 2\n")
        assert second and second != first
        assert subprocess.run(["podman", "image", "exists", first]).returncode != 0, "the replaced image is gone"
        assert "Using cache" in log, "the unchanged dependency step came from the build cache"
    finally:
        subprocess.run(["podman", "rmi", "--force", tag], capture_output=True)
        ours = subprocess.run(["podman", "images", "--all", "--quiet", "--filter", f"label={label}"], capture_output=True, text=True).stdout.split()
        for image in ours:  # the build stage's images this test made (newest first: children before parents)
            subprocess.run(["podman", "rmi", image], capture_output=True)


def test_archives_another_checkout_may_be_using_are_kept(tmp_path):
    """A worktree or CI clone with other inputs shares the cache: only archives unused for hours go."""
    now = 1_000_000.0
    wanted, recent, used_lately, old = (tmp_path / f"{n}.oci.tar" for n in ("wanted", "recent", "used", "old"))
    for archive, built_ago in ((wanted, 10 * 3600), (recent, 60), (used_lately, 10 * 3600), (old, 10 * 3600)):
        archive.write_bytes(b"")
        os.utime(archive, (now - built_ago, now - built_ago))
    images._used_marker(used_lately).touch()
    os.utime(images._used_marker(used_lately), (now - 120, now - 120))

    removed = images._prune(tmp_path, {wanted.name}, now=now)

    assert removed == [old]
    assert sorted(p.name for p in tmp_path.glob("*.oci.tar")) == ["recent.oci.tar", "used.oci.tar", "wanted.oci.tar"]
