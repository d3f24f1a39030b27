"""Throwaway local CAs: the local stack's TLS stand-in, and the mTLS between Envoy and authz.

The egress Envoy validates upstream certificates (SNI + DNS SAN) exactly as in production;
the local stack points it at a stand-in API that presents a certificate for the real
service hosts (``api.openai.com``, ...), signed by a CA that only this run's Envoy trusts.

:func:`ensure_certificates` writes into one directory::

    ca.pem           the CA certificate (Envoy's ``trusted_ca``)
    server.pem       the server certificate (the stand-in's), SANs: the given DNS names,
                     ``localhost`` and ``127.0.0.1``
    server-key.pem   its private key, mode 0600

:func:`ensure_pki` issues a set of named leaf certificates (servers and clients) from a
second, separate CA, in the layout of a cert-manager / ``kubernetes.io/tls`` Secret, one
directory per leaf (the Envoy <-> authz mTLS, the Envoy listeners, OPA)::

    ca.crt                the CA certificate
    <leaf>/tls.crt        the leaf certificate
    <leaf>/tls.key        its private key, mode 0600 (owned by ``owners[leaf]`` if given)
    <leaf>/ca.crt         the CA certificate again (what the leaf's holder trusts)

``python -m authz.stack.tls --out DIR`` writes :data:`DEPLOYMENT_LEAVES` so (Docker
Compose runs it as a one-shot service, ``infra/compose``).

The CA's private key is never written: it signs once and is dropped, so nothing can mint
further certificates this CA vouches for. New SANs therefore mean a new CA as well.
Keys are ECDSA P-256, signatures SHA-256 (RFC 5480, RFC 5758); certificates follow RFC 5280
(CA: basicConstraints CA:TRUE pathlen 0, keyCertSign; server: serverAuth EKU, SAN; client:
clientAuth EKU, SAN).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEPLOYMENT_LEAVES",
    "INTERCEPT_DIR",
    "LOCAL_IPS",
    "LOCAL_NAMES",
    "Leaf",
    "LeafFiles",
    "TlsFiles",
    "ensure_certificates",
    "ensure_pki",
    "main",
]

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


@dataclass(frozen=True, slots=True)
class Leaf:
    """A certificate :func:`ensure_pki` issues: ``usage`` "server" (serverAuth EKU; SANs
    ``dns_names`` + ``localhost`` + ``127.0.0.1``, so the local stack can dial it) or
    "client" (clientAuth EKU; SANs ``dns_names`` only)."""

    usage: Literal["server", "client"]
    dns_names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LeafFiles:
    """The files of one leaf of :func:`ensure_pki` (the keys of a ``kubernetes.io/tls``
    Secret as cert-manager writes it)."""

    directory: Path

    @property
    def cert(self) -> Path:
        """The leaf certificate (PEM)."""
        return self.directory / "tls.crt"

    @property
    def key(self) -> Path:
        """Its private key (PEM, PKCS#8, unencrypted, mode 0600)."""
        return self.directory / "tls.key"

    @property
    def ca(self) -> Path:
        """The issuing CA's certificate (PEM): what this leaf's holder trusts."""
        return self.directory / "ca.crt"


# What a deployment needs (Compose's one-shot generator writes these): authz's gRPC server
# certificate (Envoy checks the SAN "authz", the Compose/Kubernetes service name), the
# client certificate both Envoys present to authz, the two proxies' listener certificates
# and OPA's (Compose reaches OPA over TLS as "opa").
DEPLOYMENT_LEAVES: Final[Mapping[str, Leaf]] = {
    "authz": Leaf("server", ("authz",)),
    "envoy-client": Leaf("client", ("envoy",)),
    "envoy-gateway": Leaf("server", ("envoy-gateway",)),
    "envoy-egress": Leaf("server", ("envoy-egress",)),
    "opa": Leaf("server", ("opa",)),
}


def ensure_pki(
    directory: Path,
    leaves: Mapping[str, Leaf],
    *,
    owners: Mapping[str, tuple[int, int]] | None = None,
    now: dt.datetime | None = None,
) -> dict[str, LeafFiles]:
    """Make sure ``directory`` holds one CA (``ca.crt``) and, per name in ``leaves``, a
    certificate, key and CA copy in ``directory/<name>/`` (layout in the module docstring).

    Idempotent: the files are reused when every leaf's certificate has exactly its SANs
    and usage, is signed by ``ca.crt``, matches its key and both stay valid for another
    day at ``now`` (UTC, default the current time); otherwise everything is reissued from
    a new CA (90 days). ``owners``: leaf name -> (uid, gid) that owns that leaf's files
    (for a deployment where each service runs as its own user; needs CAP_CHOWN, and to
    reuse them on the next run, reading others' keys: CAP_DAC_READ_SEARCH).
    ``directory`` is created mode 0755 (it holds public certificates; keys are 0600).
    Raises ValueError for a bad leaf name or DNS name, OSError when a file cannot be
    written or chowned."""
    now = now or dt.datetime.now(dt.UTC)
    wanted = {name: (leaf.usage, _leaf_names(name, leaf)) for name, leaf in leaves.items()}
    files = {name: LeafFiles(directory / name) for name in leaves}
    if not _pki_reusable(directory / "ca.crt", files, wanted, now):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, now)
        pem = serialization.Encoding.PEM
        ca_pem = ca_cert.public_bytes(pem)
        for name, (usage, names) in wanted.items():
            leaf = files[name]
            leaf.directory.mkdir(mode=0o755, exist_ok=True)
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _leaf_certificate(key, ca_key, ca_cert, names, usage, now)
            key_pem = key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            _write(leaf.key, key_pem, 0o600)
            _write(leaf.cert, cert.public_bytes(pem), 0o644)
            _write(leaf.ca, ca_pem, 0o644)
        _write(directory / "ca.crt", ca_pem, 0o644)
    for name, (uid, gid) in (owners or {}).items():
        leaf = files[name]
        for path in (leaf.key, leaf.cert, leaf.ca):
            os.chown(path, uid, gid)
    return files


def _leaf_names(name: str, leaf: Leaf) -> frozenset[str]:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"TLS leaf name must be a plain directory name, got {name!r}")
    dns = frozenset(_normalized(leaf.dns_names, base=()))
    return dns | set(LOCAL_NAMES) if leaf.usage == "server" else dns


def _pki_reusable(
    ca_path: Path,
    files: Mapping[str, LeafFiles],
    wanted: Mapping[str, tuple[str, frozenset[str]]],
    now: dt.datetime,
) -> bool:
    try:
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        for name, (usage, names) in wanted.items():
            leaf = files[name]
            cert = x509.load_pem_x509_certificate(leaf.cert.read_bytes())
            key = serialization.load_pem_private_key(leaf.key.read_bytes(), password=None)
            if leaf.ca.read_bytes() != ca_path.read_bytes():
                return False
            cert.verify_directly_issued_by(ca)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            dns = frozenset(n.lower() for n in san.get_values_for_type(x509.DNSName))
            ips = frozenset(san.get_values_for_type(x509.IPAddress))
            if (
                dns != names
                or ips != (frozenset(LOCAL_IPS) if usage == "server" else frozenset())
                or list(eku) != [_EKU[usage]]
                or key.public_key() != cert.public_key()
                or not ca.not_valid_before_utc <= now < ca.not_valid_after_utc - RENEW_BEFORE
                or not cert.not_valid_before_utc <= now < cert.not_valid_after_utc - RENEW_BEFORE
            ):
                return False
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    return True


def _normalized(dns_names: Iterable[str], base: Iterable[str] = LOCAL_NAMES) -> frozenset[str]:
    names = set(base)
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
    return _leaf_certificate(key, ca_key, ca_cert, names, "server", now)


_EKU: Final = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}


def _leaf_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: frozenset[str],
    usage: str,
    now: dt.datetime,
) -> x509.Certificate:
    common_name = min(names - set(LOCAL_NAMES), default="localhost")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in sorted(names)]
    if usage == "server":
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
        .add_extension(x509.ExtendedKeyUsage([_EKU[usage]]), critical=False)
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


def _owner(text: str) -> tuple[str, tuple[int, int]]:
    name, sep, ids = text.partition("=")
    uid, _, gid = ids.partition(":")
    if not sep or not uid.isdigit() or not (gid or uid).isdigit():
        raise argparse.ArgumentTypeError(f"expected LEAF=UID[:GID], got {text!r}")
    return name, (int(uid), int(gid or uid))


def _extra_san(text: str) -> tuple[str, str]:
    name, sep, dns = text.partition("=")
    if not sep or not dns:
        raise argparse.ArgumentTypeError(f"expected LEAF=DNS-NAME, got {text!r}")
    return name, dns


# Where --intercept writes the egress interception's PKI (under --out): the egress Envoy
# reads /etc/envoy-tls/egress-intercept/<host>/ (authz.tools.egress_envoy.INTERCEPT_TLS_DIR).
INTERCEPT_DIR: Final = "egress-intercept"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m authz.stack.tls --out DIR [--san LEAF=NAME]... [--owner LEAF=UID[:GID]]...
    [--intercept HOST]...``: :func:`ensure_pki` of :data:`DEPLOYMENT_LEAVES` (plus the
    extra SANs, e.g. the public host name of the gateway) into DIR, and with
    ``--intercept`` a separate egress CA and one server certificate per HOST in
    ``DIR/egress-intercept`` (``ca.crt`` is what sandboxes trust). Exit 0 done, 2 bad
    arguments or unwritable DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m authz.stack.tls",
        description="issue the deployment's TLS certificates from a throwaway CA",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument(
        "--san", type=_extra_san, action="append", default=[], help="LEAF=DNS-NAME (repeat)"
    )
    parser.add_argument(
        "--owner", type=_owner, action="append", default=[], help="LEAF=UID[:GID] (repeat)"
    )
    parser.add_argument(
        "--intercept",
        action="append",
        default=[],
        metavar="HOST",
        help=f"egress interception: a certificate for HOST from the egress CA, in "
        f"DIR/{INTERCEPT_DIR}/HOST (owned like envoy-egress; repeat)",
    )
    args = parser.parse_args(argv)
    leaves = dict(DEPLOYMENT_LEAVES)
    owners = dict(args.owner)
    for name, _ in [*args.san, *args.owner]:
        if name not in leaves:
            parser.error(f"unknown leaf {name!r} (one of {', '.join(leaves)})")
    for name, dns in args.san:
        leaves[name] = Leaf(leaves[name].usage, (*leaves[name].dns_names, dns))
    try:
        files = ensure_pki(args.out, leaves, owners=owners)
        if args.intercept:
            # A separate CA (the egress CA sandboxes trust): it vouches for nothing else.
            hosts = {host.lower(): Leaf("server", (host.lower(),)) for host in args.intercept}
            owner = owners.get("envoy-egress")
            intercept = ensure_pki(
                args.out / INTERCEPT_DIR,
                hosts,
                owners=None if owner is None else dict.fromkeys(hosts, owner),
            )
            files.update({f"{INTERCEPT_DIR}/{host}": leaf for host, leaf in intercept.items()})
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, leaf in files.items():
        print(f"{name}: {leaf.directory}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
