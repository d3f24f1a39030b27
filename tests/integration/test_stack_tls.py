"""``python -m authz.stack.tls``: the command writes the deployment's certificates with
extra SANs, and refuses bad arguments with exit 2 before writing anything."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from authz.stack.tls import DEPLOYMENT_LEAVES


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


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
