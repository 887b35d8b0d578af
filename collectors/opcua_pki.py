"""The OPC UA collectors' own application certificates (Basic256Sha256): shared by the collector
of SensorFleet's simulators and the third-party source collector, so neither imports the other.

Self-signed by asyncua's cert_gen, made once per fleet and client name under SENSORFLEET_OPCUA_PKI
(default ~/.local/share/sensorfleet/opcua-pki; in a pod under its writable HOME, the root
filesystem being read-only)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

ENV_PKI = "SENSORFLEET_OPCUA_PKI"


async def ensure_client_certificate(app_uri: str, fleet: str, name: str = "collector") -> tuple[Path, Path]:
    """(certificate, key) of the client `name` of `fleet`, with application URI `app_uri`."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from asyncua.crypto.cert_gen import setup_self_signed_certificate

    base = os.environ.get(ENV_PKI) or os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "sensorfleet", "opcua-pki")
    directory = Path(base) / fleet
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}-cert.der", directory / f"{name}-key.pem"
    await setup_self_signed_certificate(key, cert, app_uri, socket.gethostname(), [ExtendedKeyUsageOID.CLIENT_AUTH],
                                        {"commonName": "SensorFleet collector", "organizationName": "SensorFleet"})
    return cert, key
