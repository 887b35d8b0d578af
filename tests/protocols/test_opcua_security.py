"""OPC UA security by configuration: Basic256Sha256 with self-signed certificates generated on
first start, and username/password from the environment."""

from __future__ import annotations

import asyncio

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from sensorfleet.collectors.opcua_pki import ensure_client_certificate


async def test_signed_encrypted_session_with_username_collects_and_wrong_password_is_refused(write_fleet, procs, h, tmp_path, tcp_port, monkeypatch):
    pki = tmp_path / "pki"
    monkeypatch.setenv("SENSORFLEET_OPCUA_PKI", str(pki))
    monkeypatch.setenv("SENSORFLEET_OPCUA_USERNAME", "plant")
    monkeypatch.setenv("SENSORFLEET_OPCUA_PASSWORD", "s3cret-Passw0rd")
    fleet = write_fleet("opcua", devices=2, interval=0.5, security="Basic256Sha256", authentication="username")
    await asyncio.to_thread(h.start_simulator, procs, "opcua", fleet, tmp_path, tcp_port)
    assert (pki / "proto" / "server-cert.der").is_file() and (pki / "proto" / "server-key.pem").is_file()
    url = f"opc.tcp://127.0.0.1:{tcp_port}/"

    col = await asyncio.to_thread(h.start_collector, procs, "opcua", fleet, tmp_path, tmp_path / "data", url)
    await asyncio.to_thread(h.wait_until, lambda: col.metric("sensorfleet_readings_stored_total") >= 12, 60, 0.2, "readings stored over the secure channel")
    result = await asyncio.to_thread(h.stop, col)
    assert result["lost"] == 0 and result["malformed"] == 0

    cert, key = await ensure_client_certificate("urn:sensorfleet:proto:opcua-collector", "proto")

    async def connect(password: str | None, secure: bool) -> None:
        client = Client(url, timeout=20)
        client.application_uri = "urn:sensorfleet:proto:opcua-collector"
        if password is not None:
            client.set_user("plant")
            client.set_password(password)
        if secure:
            await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key), mode=ua.MessageSecurityMode.SignAndEncrypt)
        await client.connect()
        await client.disconnect()

    await connect("s3cret-Passw0rd", secure=True)  # the right credentials work from a second client too
    with pytest.raises(Exception):  # noqa: B017 -- asyncua raises BadUserAccessDenied or BadIdentityTokenRejected
        await connect("wrong", secure=True)
    with pytest.raises(Exception):  # noqa: B017 -- no anonymous sessions, no unsecured channel
        await connect(None, secure=False)
