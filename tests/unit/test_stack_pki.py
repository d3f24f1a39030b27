"""stack.tls.ensure_pki and ``python -m authz.stack.tls``: the deployment's certificates
(authz's server certificate, Envoy's client certificate, listener certificates) from
one throwaway CA, reused while they fit."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from authz.stack.tls import DEPLOYMENT_LEAVES, Leaf, LeafFiles, ensure_pki

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


def test_command_writes_the_deployment_leaves_with_extra_sans(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "authz.stack.tls",
            "--out",
            str(tmp_path / "tls"),
            "--san",
            "envoy-gateway=api.example.com",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "tls").iterdir() if p.is_dir()) == sorted(
        DEPLOYMENT_LEAVES
    )
    san = (
        _cert(tmp_path / "tls/envoy-gateway/tls.crt")
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "envoy-gateway",
        "api.example.com",
        "localhost",
    }
    assert ipaddress.IPv4Address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)


@pytest.mark.parametrize(
    "args",
    [["--san", "nobody=x.example"], ["--owner", "authz=root"], ["--owner", "nobody=1"]],
    ids=["unknown-leaf-san", "bad-owner", "unknown-leaf-owner"],
)
def test_command_rejects_bad_arguments(tmp_path: Path, args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "authz.stack.tls", "--out", str(tmp_path / "tls"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert not (tmp_path / "tls").exists()


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
