"""TLS for MQTT: the client context of simulators and collectors, errors that name the field to
fix, and certificates generated with `cryptography` (a CA, the broker's server certificate and one
client certificate) for a broker SensorFleet runs — by the runner in the run directory, by the
operator into a Secret it owns. Nothing here shells out to openssl.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

# Where each file comes from, named in every error: the spec field and the command-line flag.
FIELDS = {
    "ca_file": ("spec.broker.tls.caFile", "--tls-ca"),
    "cert_file": ("spec.broker.tls.certFile", "--tls-cert"),
    "key_file": ("spec.broker.tls.keyFile", "--tls-key"),
}
# Keys of the broker TLS Secret (user's or generated): the names cert-manager and kubectl use.
SECRET_KEYS = ("ca.crt", "tls.crt", "tls.key", "client.crt", "client.key")


class TlsConfigError(ValueError):
    """A TLS file is missing, unreadable or not what it should be; the message names the field."""


def _field(name: str) -> str:
    spec_field, flag = FIELDS[name]
    return f"{spec_field} ({flag})"


def client_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """The SSLContext of an MQTT client: verifies the broker against `ca_file` (else the system
    CAs) and its host name, and presents the client certificate when given."""
    for name, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if path is None:
            continue
        try:
            Path(path).read_bytes()
        except OSError as exc:
            raise TlsConfigError(f"{_field(name)}: cannot read {path}: {exc.strerror}") from None
    if bool(cert_file) != bool(key_file):
        raise TlsConfigError(f"{_field('cert_file')} and {_field('key_file')} go together; got only one")
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"{_field('ca_file')}: {ca_file} holds no PEM CA certificate ({exc.reason or exc})") from None
    if cert_file and key_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"{_field('cert_file')} / {_field('key_file')}: {cert_file} and {key_file} are not a PEM certificate and its key ({exc.reason or exc})") from None
    return context


def describe_tls_failure(exc: BaseException, url: str) -> str | None:
    """A user's sentence for a failed TLS handshake with the broker, naming what to fix; None when
    `exc` is not a TLS failure (a plain network error is retried without comment)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or str(exc)
        if "hostname" in why.lower() or "ip address mismatch" in why.lower():
            return f"TLS handshake with broker {url} failed: {why}: the broker's certificate is not for this host name; use the name its certificate holds in the URL"
        return f"TLS handshake with broker {url} failed: {why}: the broker's certificate is not signed by a CA we trust; set {_field('ca_file')} to the CA that signed it"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).upper()
        if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason and "ALERT" in reason:
            return f"TLS: broker {url} requires a client certificate ({exc.reason}); set {_field('cert_file')} and {_field('key_file')}"
        if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" in reason:
            return f"TLS: broker {url} refused our client certificate ({exc.reason}): it is not signed by the CA the broker trusts; check {_field('cert_file')}"
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason or "PACKET_LENGTH" in reason:
            return f"TLS handshake with broker {url} failed ({exc.reason}): the port does not speak TLS; use mqtt:// or the broker's TLS port"
        return f"TLS with broker {url} failed: {exc.reason or exc}"
    return None


# ------------------------------------------------------------------------------------------------
# generated certificates
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedTls:
    """PEM bytes of a CA, a server certificate (with its key) and a client certificate (with its key)."""

    ca_cert: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes

    def secret_data(self) -> dict[str, bytes]:
        return dict(zip(SECRET_KEYS, (self.ca_cert, self.server_cert, self.server_key, self.client_cert, self.client_key)))


def generate_tls(fleet: str, server_names: list[str], days: int = 825) -> GeneratedTls:
    """A fresh CA `<fleet> SensorFleet CA`, a server certificate for `server_names` (DNS names
    or IP addresses) and a client certificate `<fleet>-client`, all signed by the CA (EC P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # a clock a little behind still accepts it
    until = now + dt.timedelta(days=days)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SensorFleet"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"{fleet} SensorFleet CA")
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, usage: x509.ObjectIdentifier, sans: list[str]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(common_name)).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)

    server_cert, server_key = leaf(server_names[0], ExtendedKeyUsageOID.SERVER_AUTH, server_names)
    client_cert, client_key = leaf(f"{fleet}-client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return GeneratedTls(ca.public_bytes(serialization.Encoding.PEM), server_cert, server_key, client_cert, client_key)


def _san(value: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def write_generated(directory: Path, generated: GeneratedTls) -> dict[str, Path]:
    """The generated files in `directory` (keys readable by the owner only); returns key -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, data in generated.secret_data().items():
        path = directory / key
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_bytes(data)
        paths[key] = path
    return paths
