"""Certificates, keys and kubeconfigs of a dev cluster: one CA per cluster, a client certificate
per component, the service-account signing key. Made fresh for every cluster (30-day validity)."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(common_name: str) -> tuple[KeyPair, Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), key_pem(key)), cert, key


def issue_certificate(
    ca_cert: Any,
    ca_key: Any,
    common_name: str,
    *,
    groups: Sequence[str] = (),
    server_names: Sequence[str] = (),
) -> KeyPair:
    """A leaf certificate: a client certificate (CN=user, O=groups) or, with server_names, a server one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = new_key()
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server_names:
        sans: list[x509.GeneralName] = []
        for entry in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(entry)))
            except ValueError:
                sans.append(x509.DNSName(entry))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH]
    else:
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_private(path: Path, data: bytes | str) -> None:
    """Write a file only its owner can read (keys, kubeconfigs with credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)


def write_kubeconfig(
    path: Path,
    server: str,
    ca_pem: bytes,
    user: str,
    *,
    client: KeyPair | None = None,
    token: str | None = None,
    namespace: str | None = None,
    cluster_name: str = "sensorfleet-dev",
    tls_server_name: str | None = None,
) -> Path:
    """A self-contained kubeconfig (everything embedded) with one context, made current."""
    credentials: dict[str, str] = {}
    if client is not None:
        credentials["client-certificate-data"] = b64(client.cert_pem)
        credentials["client-key-data"] = b64(client.key_pem)
    if token is not None:
        credentials["token"] = token
    context: dict[str, str] = {"cluster": cluster_name, "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster_name,
                "cluster": {"server": server, "certificate-authority-data": b64(ca_pem),
                            **({"tls-server-name": tls_server_name} if tls_server_name else {})},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": f"{user}@{cluster_name}", "context": context}],
        "current-context": f"{user}@{cluster_name}",
    }
    write_private(path, yaml.safe_dump(config, sort_keys=False))
    return path


def make_control_plane_pki(pki: Path, server: str, admin_kubeconfig: Path) -> None:
    """CA, apiserver serving cert, one client cert a component, SA signing key, kubeconfigs."""
    from cryptography.hazmat.primitives import serialization

    ca, ca_cert, ca_key = make_ca("sensorfleet-devcluster-ca")
    write_private(pki / "ca.crt", ca.cert_pem)
    write_private(pki / "ca.key", ca.key_pem)
    # A separate CA for the aggregation layer's front proxy (as kubeadm does), so aggregated API
    # servers work and the controllers' delegated authentication finds a request-header CA.
    front_proxy_ca, fp_cert, fp_key = make_ca("sensorfleet-devcluster-front-proxy-ca")
    front_proxy_client = issue_certificate(fp_cert, fp_key, "front-proxy-client")
    write_private(pki / "front-proxy-ca.crt", front_proxy_ca.cert_pem)
    write_private(pki / "front-proxy-client.crt", front_proxy_client.cert_pem)
    write_private(pki / "front-proxy-client.key", front_proxy_client.key_pem)
    serving = issue_certificate(
        ca_cert, ca_key, "kube-apiserver",
        server_names=("127.0.0.1", "localhost", "10.0.0.1", "kubernetes", "kubernetes.default",
                      "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
    )
    write_private(pki / "apiserver.crt", serving.cert_pem)
    write_private(pki / "apiserver.key", serving.key_pem)

    sa_key = new_key()
    write_private(pki / "sa.key", key_pem(sa_key))
    write_private(pki / "sa.pub", sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    # The bootstrap RBAC policy already binds these user names to their ClusterRoles.
    clients = {
        "admin": issue_certificate(ca_cert, ca_key, "sensorfleet-admin", groups=["system:masters"]),
        "kube-controller-manager": issue_certificate(ca_cert, ca_key, "system:kube-controller-manager"),
        "kube-scheduler": issue_certificate(ca_cert, ca_key, "system:kube-scheduler"),
        # kwok plays every kubelet (node and pod status, leases); an admin identity keeps it simple.
        "kwok": issue_certificate(ca_cert, ca_key, "kwok-controller", groups=["system:masters"]),
        # the API server's identity towards kubelets (logs, exec, port-forward on the real node)
        "apiserver-kubelet-client": issue_certificate(ca_cert, ca_key, "kube-apiserver-kubelet-client",
                                                      groups=["system:masters"]),
    }
    write_private(pki / "admin.crt", clients["admin"].cert_pem)
    write_private(pki / "admin.key", clients["admin"].key_pem)
    write_private(pki / "apiserver-kubelet-client.crt", clients["apiserver-kubelet-client"].cert_pem)
    write_private(pki / "apiserver-kubelet-client.key", clients["apiserver-kubelet-client"].key_pem)
    for name, pair in clients.items():
        if name not in ("admin", "apiserver-kubelet-client"):
            write_kubeconfig(pki / f"{name}.kubeconfig", server, ca.cert_pem, name, client=pair)
    write_kubeconfig(admin_kubeconfig, server, ca.cert_pem, "sensorfleet-admin", client=clients["admin"])



def load_ca(pki: Path) -> tuple[bytes, Any, Any]:
    """The cluster CA made by make_control_plane_pki: (PEM, certificate, key), to sign more leaves."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pem = (pki / "ca.crt").read_bytes()
    return pem, x509.load_pem_x509_certificate(pem), serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
