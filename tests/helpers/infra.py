"""Builders for the deployment-file tests (tests/infra): signing keys, the deployment's
TLS files, HTTP probes, the Compose bundle server in nginx, policy bundles from the demo
overlay."""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from authz.stack import envoy
from authz.stack.supervisor import Process, free_port, http_ok
from authz.stack.tls import DEPLOYMENT_LEAVES, ensure_pki
from tests.helpers import ROOT
from tests.helpers.egress import intercept_certificates, real_services

__all__ = [
    "DEMO_DATA",
    "ROOT",
    "DeployEnvoy",
    "KeyPair",
    "build_bundle",
    "compose_command",
    "deployment_tls",
    "http_get",
    "nginx_binary",
    "nginx_bundle_server",
    "nginx_config",
    "render_deploy_envoy",
    "wait_for",
    "write_key_pair",
]

DEMO_DATA = ROOT / "infra/demo/bundle-data"


@dataclass(frozen=True)
class KeyPair:
    """An RSA key pair written as PEM files (private key mode 0600)."""

    private: Path
    public: Path


def write_key_pair(directory: Path, name: str) -> KeyPair:
    """A fresh RSA-2048 key pair under ``directory`` (generated now, never committed)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / f"{name}.key"
    public = directory / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return KeyPair(private, public)


def deployment_tls(directory: Path) -> Path:
    """The deployment's certificates (``python -m authz.stack.tls``'s layout, what
    Compose generates and the Kubernetes Secrets hold) issued into ``directory``, for
    running or validating the shipped Envoy configs with their TLS files relocated there
    (:func:`authz.stack.envoy.relocate_tls`); with the egress interception's egress CA
    and a certificate per intercepted service host in ``egress-intercept/`` (what
    ``--intercept`` issues)."""
    ensure_pki(directory, DEPLOYMENT_LEAVES)
    # egress (issue 18): the interception's certificates.
    intercept_certificates(directory, real_services())
    return directory


def http_get(
    url: str,
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    body: bytes | None = None,
    ca_file: Path | None = None,
) -> tuple[int, bytes]:
    """(status, body) of one request (GET unless ``method``); HTTP errors are returned,
    not raised. An https ``url`` is verified against ``ca_file``."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    context = ssl.create_default_context(cafile=ca_file) if ca_file is not None else None
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 15.0, what: str = "it") -> None:
    """Poll ``predicate()`` every 100 ms until true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass(frozen=True)
class DeployEnvoy:
    """A deployment Envoy config running on free ports (listener, read-only admin); the
    listener speaks TLS with a certificate from ``ca`` (SAN ``localhost``)."""

    name: str
    listener: int
    admin: int
    ca: Path


def render_deploy_envoy(name: str, base: Path, tls_dir: Path) -> tuple[Path, DeployEnvoy, int]:
    """infra/compose/envoy/envoy-<name>.yaml (``name``: gateway or egress) rendered into
    ``base`` for a test: its listener, read-only admin listener and internal admin API on
    free 127.0.0.1 ports, its TLS files from ``tls_dir`` (:func:`deployment_tls`). Returns
    (config path, the proxy's ports, the internal admin port)."""
    listener, admin, internal = free_port(), free_port(), free_port()
    config = base / f"envoy-{name}.yaml"
    rendered = yaml.safe_load(
        envoy.render(
            ROOT / f"infra/compose/envoy/envoy-{name}.yaml",
            admin_port=internal,
            listeners={name: listener, "admin_read_only": admin},
            clusters={"admin": ("127.0.0.1", internal)},
            tls_dir=tls_dir,
        )
    )
    for item in rendered["static_resources"]["listeners"]:  # loopback only in tests
        if "address" in item:  # (not the egress interception's internal listener)
            item["address"]["socket_address"]["address"] = "127.0.0.1"
    config.write_text(yaml.safe_dump(rendered, sort_keys=False), encoding="utf-8")
    return config, DeployEnvoy(name, listener, admin, tls_dir / "ca.crt"), internal


def nginx_binary() -> str:
    """nginx from the machine's packages (scripts/install-deps installs nginx-light)."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("nginx not found: run ./scripts/install-deps (apt nginx-light)")


def nginx_config(directory: Path, port: int, bundles: Path, site: str | None = None) -> Path:
    """A main nginx.conf under ``directory`` that includes the Compose bundle server's site
    config (infra/compose/nginx/bundles.conf, or ``site`` text) with only its listen
    address and bundle directory changed: loopback ``port`` and ``bundles``."""
    text = site if site is not None else (ROOT / "infra/compose/nginx/bundles.conf").read_text()
    assert "listen 8080;" in text
    assert "/usr/share/nginx/bundles/" in text
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    text = text.replace("/usr/share/nginx/bundles/", f"{bundles}/")
    (directory / "site.conf").write_text(text)
    temp = "\n".join(
        f"  {kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.getuid() == 0 else ""  # workers must read the test's files
    main = directory / "nginx.conf"
    main.write_text(
        f"{user}pid {directory}/nginx.pid;\nerror_log {directory}/error.log warn;\n"
        f"worker_processes 1;\nevents {{}}\nhttp {{\n  access_log off;\n{temp}\n"
        f"  include {directory}/site.conf;\n}}\n"
    )
    return main


@contextlib.contextmanager
def nginx_bundle_server(base: Path, bundles: Path) -> Iterator[int]:
    """The Compose bundle server's config running in a real nginx on a free loopback
    port, serving ``bundles``; yields the port."""
    port = free_port()
    base.mkdir(parents=True, exist_ok=True)
    config = nginx_config(base, port, bundles)
    process = Process(
        "nginx",
        [nginx_binary(), "-p", str(base), "-c", str(config), "-g", "daemon off;"],
        base / "nginx.log",
        lambda: http_ok(f"http://127.0.0.1:{port}/healthz"),
    )
    process.start()
    try:
        process.wait_ready(15)
        yield port
    finally:
        process.stop()


def build_bundle(out: Path, revision: str, *args: str) -> subprocess.CompletedProcess[str]:
    """scripts/build-policy-bundle with the demo overlay, a fixed revision and ``args``."""
    return subprocess.run(
        [
            str(ROOT / "scripts/build-policy-bundle"),
            "--data",
            str(DEMO_DATA),
            "--out",
            str(out),
            "--revision",
            revision,
            "--skip-tests",
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def compose_command(service: str) -> list[str]:
    """``service``'s command in docker-compose.yaml."""
    compose = yaml.safe_load((ROOT / "infra/compose/docker-compose.yaml").read_text())
    command: list[str] = compose["services"][service]["command"]
    return command
