"""A small asyncio Kubernetes client for the operator's own calls (apply, list, delete, status, events).

kopf watches; this applies. It reads credentials the way `kubernetes` does (kubeconfig or in-cluster
service-account token, refreshed on every call), and speaks plain REST over aiohttp so a hundred
fleets reconcile concurrently without a thread pool. Server-side apply (`application/apply-patch`)
with one field manager makes every apply idempotent: an unchanged child is not written.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

FIELD_MANAGER = "sensorfleet-operator"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Every call gives up after this long: shorter than the leader Lease, so a reconcile stuck on a
# slow API server cannot outlive the leadership it started under.
REQUEST_TIMEOUT = 10.0


class NotLeading(Exception):
    """A write refused because this replica is not (or no longer) the leader."""


@dataclass(frozen=True)
class Kind:
    group_version: str  # "v1", "apps/v1"
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name)}"
        if subresource:
            base += f"/{subresource}"
        return base


KINDS: dict[str, Kind] = {
    "ConfigMap": Kind("v1", "configmaps"),
    "Secret": Kind("v1", "secrets"),
    "Service": Kind("v1", "services"),
    "PersistentVolumeClaim": Kind("v1", "persistentvolumeclaims"),
    "Pod": Kind("v1", "pods"),
    "Event": Kind("v1", "events"),
    "Deployment": Kind("apps/v1", "deployments"),
    "CronJob": Kind("batch/v1", "cronjobs"),
    "Job": Kind("batch/v1", "jobs"),
    "PodMonitor": Kind("monitoring.coreos.com/v1", "podmonitors"),
    "Lease": Kind("coordination.k8s.io/v1", "leases"),
    "NetworkPolicy": Kind("networking.k8s.io/v1", "networkpolicies"),
    "SensorFleet": Kind("sensorfleet.io/v1alpha1", "sensorfleets"),
}


class ApiError(Exception):
    """A non-2xx answer; `status` and `reason` from the API server's Status object."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        message = body.get("message", body) if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: {status} {self.reason} {message}".strip())


class KubeClient:
    """Async REST client bound to one set of credentials (kubeconfig or in-cluster)."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None, *,
                 connections: int = 32, timeout: float = REQUEST_TIMEOUT,
                 may_write: Callable[[], bool] | None = None,
                 on_write: Callable[[str, str, float], None] | None = None) -> None:
        """`may_write` is asked right before every write (the leader Lease's fence: False refuses
        it with NotLeading); `on_write(method, path, wall_time)` is told of every write sent."""
        from kubernetes import client as k8s_client
        from kubernetes import config as k8s_config

        configuration = k8s_client.Configuration()
        if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ and not os.environ.get("KUBECONFIG"):
            k8s_config.load_incluster_config(client_configuration=configuration)
        else:
            k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
        self._configuration = configuration
        self.host = configuration.host.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._connections = connections
        self._timeout = timeout
        self.may_write = may_write
        self.on_write = on_write

    def _ssl(self) -> ssl.SSLContext | bool:
        cfg = self._configuration
        if not self.host.startswith("https"):
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
        if not cfg.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        return context

    def _headers(self) -> dict[str, str]:
        token = self._configuration.get_api_key_with_prefix("authorization") or self._configuration.get_api_key_with_prefix("BearerToken")
        return {"Authorization": token} if token else {}

    def connection_info(self) -> Any:
        """The same credentials as a kopf.ConnectionInfo (kopf watches with what we apply with)."""
        import kopf

        cfg = self._configuration
        header = self._headers().get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return kopf.ConnectionInfo(
            server=self.host,
            ca_path=cfg.ssl_ca_cert or None,
            insecure=not cfg.verify_ssl,
            scheme=scheme or None,
            token=token or None,
            certificate_path=cfg.cert_file or None,
            private_key_path=cfg.key_file or None,
        )

    async def __aenter__(self) -> KubeClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=self._connections)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self._timeout))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json", timeout: float | None = None) -> Any:
        await self.open()
        assert self._session is not None
        url = self.host + path + (f"?{urlencode(params)}" if params else "")
        headers = {"Accept": "application/json", **self._headers()}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        if method in WRITE_METHODS:
            if self.may_write is not None and not self.may_write():
                raise NotLeading(f"{method} {path}: refused, this replica does not hold the leader lease")
            if self.on_write is not None:
                self.on_write(method, path, time.time())
        extra = {"timeout": aiohttp.ClientTimeout(total=timeout)} if timeout else {}
        async with self._session.request(method, url, data=data, headers=headers, **extra) as response:
            text = await response.text()
            try:
                payload = json.loads(text) if text else {}
            except ValueError:
                payload = text
            if response.status >= 400:
                raise ApiError(method, path, response.status, payload)
            return payload

    # --- verbs ---------------------------------------------------------------------------------

    async def apply(self, manifest: dict[str, Any], *, field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply (forced: the operator owns the fields it sets, hand edits are reverted)."""
        kind = KINDS[manifest["kind"]]
        meta = manifest["metadata"]
        path = kind.path(meta.get("namespace"), meta["name"])
        return await self.request("PATCH", path, body=manifest, content_type="application/apply-patch+yaml",
                                  params={"fieldManager": field_manager, "force": "true"})

    async def get(self, kind: str, namespace: str | None, name: str, *, timeout: float | None = None) -> dict[str, Any] | None:
        try:
            return await self.request("GET", KINDS[kind].path(namespace, name), timeout=timeout)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str | None, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self.request("GET", KINDS[kind].path(namespace), params=params)
        return list(result.get("items", []))

    async def delete(self, kind: str, namespace: str | None, name: str, *, uid: str | None = None) -> bool:
        """Delete (background propagation); False if it was already gone. `uid` guards against
        deleting a newer object of the same name."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", KINDS[kind].path(namespace, name), body=body)
            return True
        except ApiError as error:
            if error.status in (404, 409):
                return False
            raise

    async def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", KINDS[kind].path(namespace, name, "status"), body={"status": status},
                                  content_type="application/merge-patch+json")

    async def create(self, manifest: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        kind = KINDS[manifest["kind"]]
        return await self.request("POST", kind.path(manifest["metadata"].get("namespace")), body=manifest, timeout=timeout)

    async def replace(self, manifest: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        kind = KINDS[manifest["kind"]]
        meta = manifest["metadata"]
        return await self.request("PUT", kind.path(meta.get("namespace"), meta["name"]), body=manifest, timeout=timeout)
