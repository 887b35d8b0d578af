"""Fixtures for the image tests: the images built by devcluster.images (once per session, before
the per-test timeout starts), and `pods`, which runs the containers of a pod the operator's
builders emit with podman, honouring what the kubelet would enforce: the image, command and args
(with `$(VAR)` expansion), env from literal values and from Secret keys, the pod's user, a
read-only root filesystem (no tmpfs anywhere the pod did not ask for one), dropped capabilities,
emptyDir / configMap / claim volumes. Containers share the host's network; Service names are
host aliases of 127.0.0.1, so every port in the fleet must be a free one."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devcluster import images as devimages

_IMAGES = pytest.StashKey[object]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A cold build takes longer than the per-test timeout: build here, only when a test needs it.
    if config.option.collectonly or not any("built_images" in getattr(i, "fixturenames", ()) for i in items):
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        try:
            config.stash[_IMAGES] = devimages.ensure_images()
        except devimages.ImageBuildError as error:
            config.stash[_IMAGES] = error


@pytest.fixture(scope="session")
def built_images(request: pytest.FixtureRequest) -> list[devimages.ImageArchive]:
    """[app, broker], loaded into podman's storage from their archives when missing there."""
    result = request.config.stash.get(_IMAGES, None) or devimages.ensure_images()
    if isinstance(result, Exception):
        raise result
    for image in result:
        if subprocess.run(["podman", "image", "exists", image.ref]).returncode != 0:
            subprocess.run(["podman", "load", "--input", str(image.archive)], check=True, capture_output=True)
            subprocess.run(["podman", "tag", image.ref, image.ref], check=True)
    return result


def _expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion in command and args (`$$` escapes)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


@dataclass
class RunningContainer:
    name: str
    log: Path

    def logs(self) -> str:
        out = subprocess.run(["podman", "logs", self.name], capture_output=True, text=True)
        return out.stdout + out.stderr

    def running(self) -> bool:
        out = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", self.name], capture_output=True, text=True)
        return out.stdout.strip() == "true"

    def exit_code(self, timeout: float = 300) -> int:
        out = subprocess.run(["podman", "wait", self.name], capture_output=True, text=True, timeout=timeout)
        return int(out.stdout.strip().splitlines()[-1])


@dataclass
class PodRunner:
    root: Path
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)

    def add_objects(self, manifests: list[dict[str, Any]]) -> None:
        """ConfigMaps and Secrets the pods reference (the operator's children, or the user's)."""
        import base64

        for m in manifests:
            if m["kind"] == "ConfigMap":
                self.configmaps[m["metadata"]["name"]] = dict(m["data"])
            elif m["kind"] == "Secret":
                data = {k: base64.b64decode(v).decode() for k, v in (m.get("data") or {}).items()}
                self.secrets[m["metadata"]["name"]] = {**data, **(m.get("stringData") or {})}
            elif m["kind"] == "Service":
                self.hosts.append(m["metadata"]["name"])

    def claim_dir(self, claim: str) -> Path:
        path = self.root / "claims" / claim
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        return path

    def _volume_source(self, pod_id: str, volume: dict[str, Any]) -> tuple[Path, bool]:
        if "emptyDir" in volume:
            path = self.root / "pods" / pod_id / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)
            return path, False
        if "configMap" in volume:
            path = self.root / "pods" / pod_id / "configmaps" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            for key, text in self.configmaps[volume["configMap"]["name"]].items():
                (path / key).write_text(text)
            return path, True
        if "persistentVolumeClaim" in volume:
            return self.claim_dir(volume["persistentVolumeClaim"]["claimName"]), False
        raise AssertionError(f"volume kind not handled by this runner: {volume}")

    def _env(self, container: dict[str, Any], extra_env: dict[str, str]) -> dict[str, str]:
        env: dict[str, str] = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                # the kubelet refuses to start a container whose Secret or key is missing
                assert ref["name"] in self.secrets, f"Secret {ref['name']} is missing (CreateContainerConfigError)"
                env[item["name"]] = self.secrets[ref["name"]][ref["key"]]
        return {**env, **extra_env}

    def run(self, pod_spec: dict[str, Any], container: dict[str, Any], *, extra_env: dict[str, str] | None = None,
            detach: bool = True, pod_id: str | None = None) -> RunningContainer:
        """One container of a pod; containers given the same `pod_id` share its emptyDirs."""
        pod_id = pod_id or uuid.uuid4().hex[:8]
        name = f"sf-test-{container['name']}-{uuid.uuid4().hex[:6]}"
        pod_security = pod_spec.get("securityContext", {})
        security = container.get("securityContext", {})
        env = self._env(container, extra_env or {})
        argv = ["podman", "run", "--name", name, "--pull=never", "--network", "host", *devimages.ULIMITS,
                "--read-only-tmpfs=false"]
        if security.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
        if security.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        for cap in security.get("capabilities", {}).get("drop", []):
            argv += ["--cap-drop", cap]
        uid = security.get("runAsUser", pod_security.get("runAsUser"))
        gid = security.get("runAsGroup", pod_security.get("runAsGroup"))
        if uid is not None:
            argv += ["--user", f"{uid}:{gid if gid is not None else uid}"]
        for host in self.hosts:
            argv += ["--add-host", f"{host}:127.0.0.1"]
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            source, read_only = self._volume_source(pod_id, volumes[mount["name"]])
            ro = read_only or mount.get("readOnly", False)
            argv += ["--volume", f"{source}:{mount['mountPath']}:{'ro' if ro else 'rw'}"]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        argv += ["--detach"] if detach else []
        argv.append(devimages.qualified_ref(container["image"]))
        argv += [_expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
        log = self.root / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.started.append(name)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0 and detach:
            raise AssertionError(f"podman run failed ({result.returncode}): {result.stderr}")
        return RunningContainer(name, log)

    def run_pod(self, pod_spec: dict[str, Any], **kwargs: Any) -> RunningContainer:
        """Init containers to completion (each must exit 0), then the first container, detached."""
        pod_id = uuid.uuid4().hex[:8]
        for init in pod_spec.get("initContainers", []):
            done = self.run(pod_spec, init, detach=True, pod_id=pod_id, **kwargs)
            code = done.exit_code()
            assert code == 0, f"init container {init['name']} exited {code}: {done.logs()}"
        return self.run(pod_spec, pod_spec["containers"][0], pod_id=pod_id, **kwargs)

    @staticmethod
    def pod_spec_of(manifest: dict[str, Any]) -> dict[str, Any]:
        """The pod template of a Deployment or CronJob."""
        if manifest["kind"] == "CronJob":
            return manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return manifest["spec"]["template"]["spec"]

    def stop_all(self) -> None:
        for name in reversed(self.started):
            subprocess.run(["podman", "stop", "--time", "10", name], capture_output=True)
        for name in self.started:
            subprocess.run(["podman", "rm", "--force", name], capture_output=True)


@pytest.fixture
def pods(tmp_path: Path, built_images: list[devimages.ImageArchive]) -> Iterator[PodRunner]:
    runner = PodRunner(tmp_path / "pods")
    try:
        yield runner
    finally:
        for name in runner.started:  # what a failing test's containers said
            out = subprocess.run(["podman", "logs", "--tail", "30", name], capture_output=True, text=True)
            sys.stderr.write(f"--- {name}\n{out.stdout}{out.stderr}")
        runner.stop_all()


