"""authz.stack.tls: a local CA and a server certificate (ensure_certificates), and the
deployment's certificates from one throwaway CA (ensure_pki), reused while they fit."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from authz.stack.tls import (
    INTERCEPT_DIR,
    Leaf,
    LeafFiles,
    TlsFiles,
    ensure_certificates,
    ensure_pki,
    main,
)

HOSTS = ["api.openai.com", "slack.com"]


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(files: TlsFiles) -> tuple[set[str], set[object]]:
    ext = load(files.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)), set(ext.get_values_for_type(x509.IPAddress))


def fingerprints(files: TlsFiles) -> tuple[bytes, bytes, bytes]:
    return files.ca.read_bytes(), files.cert.read_bytes(), files.key.read_bytes()


@pytest.fixture
def files(tmp_path: Path) -> TlsFiles:
    return ensure_certificates(tmp_path / "tls", HOSTS)


def test_files_and_modes(files: TlsFiles, tmp_path: Path) -> None:
    assert files.directory == tmp_path / "tls"
    assert [files.ca.name, files.cert.name, files.key.name] == [
        "ca.pem",
        "server.pem",
        "server-key.pem",
    ]
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in files.key.read_bytes()
    # The CA's private key is never written.
    assert sorted(p.name for p in files.directory.iterdir()) == [
        "ca.pem",
        "server-key.pem",
        "server.pem",
    ]


def test_sans_are_the_hosts_plus_localhost(files: TlsFiles) -> None:
    dns, ips = sans(files)
    assert dns == {"api.openai.com", "slack.com", "localhost"}
    assert ips == {ipaddress.IPv4Address("127.0.0.1")}


def test_certificate_chain(files: TlsFiles) -> None:
    ca, cert = load(files.ca), load(files.cert)
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc


@pytest.mark.parametrize("server_name", ["api.openai.com", "slack.com", "localhost"])
def test_python_tls_client_accepts_it(files: TlsFiles, server_name: str) -> None:
    """The files work as a TLS server/client pair with hostname checking (in memory)."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(files.cert, files.key)
    client = ssl.create_default_context(cafile=files.ca)
    assert handshake(server, client, server_name) is None


def test_python_tls_client_rejects_other_names(files: TlsFiles) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(files.cert, files.key)
    client = ssl.create_default_context(cafile=files.ca)
    error = handshake(server, client, "api.anthropic.com")
    assert isinstance(error, ssl.SSLCertVerificationError)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> Exception | None:
    """Drive a TLS handshake between two in-memory SSLObjects; the client's error, if any."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, obj in (("c", c), ("s", s)):
            if done[key]:
                continue
            try:
                obj.do_handshake()
                done[key] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                if key == "c":
                    return exc
                raise
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return None
    raise AssertionError("handshake did not finish")


def test_reused_when_the_sans_match(files: TlsFiles) -> None:
    before = fingerprints(files)
    # Order, case and duplicates do not matter.
    again = ensure_certificates(files.directory, ["SLACK.com", "api.openai.com", "slack.com"])
    assert again == files
    assert fingerprints(again) == before


@pytest.mark.parametrize(
    "hosts",
    [["api.openai.com"], [*HOSTS, "api.github.com"], []],
    ids=["fewer", "more", "none"],
)
def test_regenerated_when_the_sans_differ(files: TlsFiles, hosts: list[str]) -> None:
    before = fingerprints(files)
    ensure_certificates(files.directory, hosts)
    after = fingerprints(files)
    assert all(a != b for a, b in zip(before, after, strict=True)), "CA, cert and key all new"
    assert sans(files)[0] == {*hosts, "localhost"}


@pytest.mark.parametrize(
    "damage",
    ["delete-ca", "delete-key", "garbage-cert", "other-key", "other-ca"],
)
def test_regenerated_when_files_are_missing_or_do_not_fit(
    files: TlsFiles, tmp_path: Path, damage: str
) -> None:
    other = ensure_certificates(tmp_path / "other", HOSTS)
    if damage == "delete-ca":
        files.ca.unlink()
    elif damage == "delete-key":
        files.key.unlink()
    elif damage == "garbage-cert":
        files.cert.write_bytes(b"not a certificate")
    elif damage == "other-key":
        files.key.write_bytes(other.key.read_bytes())
    elif damage == "other-ca":
        files.ca.write_bytes(other.ca.read_bytes())
    ensure_certificates(files.directory, HOSTS)
    load(files.cert).verify_directly_issued_by(load(files.ca))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(files.cert, files.key)  # raises if the key does not match
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600


def test_regenerated_before_expiry(files: TlsFiles) -> None:
    before = fingerprints(files)
    assert ensure_certificates(files.directory, HOSTS, now=dt.datetime.now(dt.UTC)) == files
    assert fingerprints(files) == before
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=89, hours=12)
    ensure_certificates(files.directory, HOSTS, now=later)
    assert fingerprints(files) != before


@pytest.mark.parametrize("bad", ["", "  ", "bücher.example"], ids=["empty", "blank", "non-ascii"])
def test_bad_dns_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="DNS name must be non-empty ASCII"):
        ensure_certificates(tmp_path / "tls", [bad])
    assert not (tmp_path / "tls").exists()


# ----------------------------------------------------------------------------------------
# ensure_pki: the deployment's certificates (authz's server certificate, Envoy's client
# certificate, listener certificates) from one throwaway CA, reused while they fit. The
# command (``python -m authz.stack.tls``): tests/integration/test_stack_tls.py.


LEAVES = {"authz": Leaf("server", ("authz",)), "envoy-client": Leaf("client", ("envoy",))}


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _snapshot(files: dict[str, LeafFiles]) -> list[bytes]:
    return [p.read_bytes() for leaf in files.values() for p in (leaf.cert, leaf.key, leaf.ca)]


@pytest.mark.parametrize(
    ("name", "eku", "dns", "ips"),
    [
        ("authz", ExtendedKeyUsageOID.SERVER_AUTH, {"authz", "localhost"}, {"127.0.0.1"}),
        ("envoy-client", ExtendedKeyUsageOID.CLIENT_AUTH, {"envoy"}, set()),
    ],
    ids=["server", "client"],
)
def test_leaves_have_their_usage_and_sans_and_chain_to_the_ca(
    tmp_path: Path, name: str, eku: x509.ObjectIdentifier, dns: set[str], ips: set[str]
) -> None:
    files = ensure_pki(tmp_path / "pki", LEAVES)
    leaf = files[name]
    cert = _cert(leaf.cert)
    cert.verify_directly_issued_by(_cert(tmp_path / "pki/ca.crt"))
    assert leaf.ca.read_bytes() == (tmp_path / "pki/ca.crt").read_bytes()
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == dns
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == ips
    assert stat.S_IMODE(leaf.key.stat().st_mode) == 0o600
    assert [p.name for p in sorted(leaf.directory.iterdir())] == ["ca.crt", "tls.crt", "tls.key"]
    # The CA's key is never written: only certificates and leaf keys exist.
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == [
        "authz",
        "ca.crt",
        "envoy-client",
    ]


def test_reused_while_they_fit_and_reissued_when_not(tmp_path: Path) -> None:
    files = ensure_pki(tmp_path / "pki", LEAVES)
    first = _snapshot(files)
    assert _snapshot(ensure_pki(tmp_path / "pki", LEAVES)) == first
    # Another SAN, another usage, an expiring CA or a damaged file: everything reissued.
    changes = [
        ({**LEAVES, "authz": Leaf("server", ("authz", "authz.example"))}, None),
        ({**LEAVES, "envoy-client": Leaf("server", ("envoy",))}, None),
        (LEAVES, dt.datetime.now(dt.UTC) + dt.timedelta(days=89, hours=12)),
    ]
    for leaves, now in changes:
        again = _snapshot(ensure_pki(tmp_path / "pki", leaves, now=now))
        assert again != first
        first = again
    ca = (tmp_path / "pki/ca.crt").read_bytes()
    files["authz"].key.write_text("broken")
    ensure_pki(tmp_path / "pki", LEAVES)
    assert (tmp_path / "pki/ca.crt").read_bytes() != ca
    assert b"PRIVATE KEY" in files["authz"].key.read_bytes()


@pytest.mark.parametrize("name", ["", "../x", ".hidden", "a/b"], ids=repr)
def test_leaf_names_are_plain_directory_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="leaf name"):
        ensure_pki(tmp_path / "pki", {name: Leaf("server", ("x",))})


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owners_get_their_leaf_files_and_reuse_still_works(tmp_path: Path) -> None:
    """Compose's tls-init gives each key to the uid that reads it; the next run reuses
    the files (a reissue would strand running proxies on the old CA)."""
    files = ensure_pki(tmp_path / "pki", LEAVES, owners={"authz": (12345, 23456)})
    for path in (files["authz"].key, files["authz"].cert, files["authz"].ca):
        assert (path.stat().st_uid, path.stat().st_gid) == (12345, 23456)
    assert files["envoy-client"].key.stat().st_uid == os.geteuid()
    before = _snapshot(files)
    assert (
        _snapshot(ensure_pki(tmp_path / "pki", LEAVES, owners={"authz": (12345, 23456)})) == before
    )


# -- egress interception (issue 18): --intercept ------------------------------------------


def test_intercept_issues_an_egress_ca_and_a_certificate_per_host(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    assert (
        main(["--out", str(out), "--intercept", "API.openai.com", "--intercept", "slack.com"]) == 0
    )
    directory = out / INTERCEPT_DIR
    egress_ca = load(directory / "ca.crt")
    # A CA of its own: not the deployment's (which vouches for authz and the proxies).
    assert egress_ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != load(out / "ca.crt").public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for host in ("api.openai.com", "slack.com"):
        leaf = load(directory / host / "tls.crt")
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in names.get_values_for_type(x509.DNSName)
        leaf.verify_directly_issued_by(egress_ca)
