"""A throwaway local CA and one server certificate for the local stack's TLS stand-in.

The egress Envoy validates upstream certificates (SNI + DNS SAN) exactly as in production;
the local stack points it at a stand-in API that presents a certificate for the real
service hosts (``api.openai.com``, ...), signed by a CA that only this run's Envoy trusts.

:func:`ensure_certificates` writes into one directory::

    ca.pem           the CA certificate (Envoy's ``trusted_ca``)
    server.pem       the server certificate (the stand-in's), SANs: the given DNS names,
                     ``localhost`` and ``127.0.0.1``
    server-key.pem   its private key, mode 0600

The CA's private key is never written: it signs once and is dropped, so nothing can mint
further certificates this CA vouches for. New SANs therefore mean a new CA as well.
Keys are ECDSA P-256, signatures SHA-256 (RFC 5480, RFC 5758); certificates follow RFC 5280
(CA: basicConstraints CA:TRUE pathlen 0, keyCertSign; server: serverAuth EKU, SAN).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["LOCAL_IPS", "LOCAL_NAMES", "TlsFiles", "ensure_certificates"]

LOCAL_NAMES: Final = ("localhost",)
LOCAL_IPS: Final = (ipaddress.IPv4Address("127.0.0.1"),)
VALIDITY: Final = dt.timedelta(days=90)
# Reuse a certificate only while it has at least this long to live.
RENEW_BEFORE: Final = dt.timedelta(days=1)
# Backdate notBefore a little: tolerate clock skew between processes/containers.
BACKDATE: Final = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of the files :func:`ensure_certificates` maintains in ``directory``."""

    directory: Path

    @property
    def ca(self) -> Path:
        """The CA certificate (PEM)."""
        return self.directory / "ca.pem"

    @property
    def cert(self) -> Path:
        """The server certificate (PEM)."""
        return self.directory / "server.pem"

    @property
    def key(self) -> Path:
        """The server's private key (PEM, PKCS#8, unencrypted, mode 0600)."""
        return self.directory / "server-key.pem"


def ensure_certificates(
    directory: Path, dns_names: Iterable[str], *, now: dt.datetime | None = None
) -> TlsFiles:
    """Make sure ``directory`` holds a CA and a server certificate whose SANs are exactly
    ``dns_names`` (case-insensitive, duplicates ignored) + ``localhost`` + ``127.0.0.1``.

    Idempotent: existing files are reused when the server certificate has those SANs, is
    signed by ``ca.pem``, matches ``server-key.pem`` and is valid for at least another day
    at ``now`` (UTC, default: the current time); otherwise all three are regenerated
    (90-day validity). The directory is created mode 0700 if missing. Files are written
    atomically (temporary file, then rename). Raises ValueError for an empty or non-ASCII
    DNS name, OSError when the directory cannot be written.
    """
    files = TlsFiles(directory)
    now = now or dt.datetime.now(dt.UTC)
    names = _normalized(dns_names)
    if _reusable(files, names, now):
        return files
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, now)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, names, now)
    pem = serialization.Encoding.PEM
    key_pem = server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Key first, so a crash never leaves a certificate next to a key it does not match
    # unnoticed (the reuse check compares them anyway).
    _write(files.key, key_pem, 0o600)
    _write(files.cert, server_cert.public_bytes(pem), 0o644)
    _write(files.ca, ca_cert.public_bytes(pem), 0o644)
    return files


def _normalized(dns_names: Iterable[str]) -> frozenset[str]:
    names = set(LOCAL_NAMES)
    for name in dns_names:
        cleaned = name.strip().lower()
        if not cleaned or not cleaned.isascii():
            raise ValueError(f"TLS SAN: DNS name must be non-empty ASCII, got {name!r}")
        names.add(cleaned)
    return frozenset(names)


def _reusable(files: TlsFiles, names: frozenset[str], now: dt.datetime) -> bool:
    try:
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    dns = frozenset(name.lower() for name in san.get_values_for_type(x509.DNSName))
    ips = frozenset(san.get_values_for_type(x509.IPAddress))
    return (
        dns == names
        and ips == frozenset(LOCAL_IPS)
        and key.public_key() == cert.public_key()
        and all(
            c.not_valid_before_utc <= now < c.not_valid_after_utc - RENEW_BEFORE for c in (ca, cert)
        )
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authz local stack CA")])
    public = key.public_key()
    return (
        _builder(name, name, public, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: frozenset[str],
    now: dt.datetime,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authz local stack server")])
    public = key.public_key()
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in sorted(names)]
    sans += [x509.IPAddress(ip) for ip in LOCAL_IPS]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(subject, ca_cert.subject, public, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    now: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    # Created with its final mode: a key is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)  # the umask may have narrowed the mode on creation
    tmp.replace(path)
