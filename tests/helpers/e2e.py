"""End-to-end builders: real OPA + authz + Envoy (gateway and egress) + upstream + the
HTTPS egress stand-in, as processes on free ports (the ``e2e`` fixture in
``tests/e2e/conftest.py`` starts one for the session with :func:`running_env`).

Keys, sandbox tokens and egress secrets are generated at test time (never committed): a
bundle is built with the key and sandbox digests by ``scripts/build-policy-bundle --data
<tmp overlay>`` into a temporary bundle directory that the stack's bundle server serves
to OPA; the secrets file is written with ``authz.runtime.secrets.write_secrets_file``.

Envoy -> authz is mTLS, as in every deployment (the stack's ``mtls/`` CA): a test that
talks to the stack's authz directly uses :func:`authz_channel` with Envoy's client
certificate.

``AUTHZ_E2E_CONTAINERS=1`` runs OPA and both Envoys from their images (testcontainers,
``authz.stack.containers``) instead of local binaries; it needs a Docker engine on this
machine and fails the session without one. Unset (the default), no Docker is needed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.runtime.secrets import write_secrets_file
from authz.stack import containers
from authz.stack.envoy import BodyRoute
from authz.stack.supervisor import Ports, Process, Stack, free_port, http_ok
from authz.tools.egress_envoy import TUNNEL_MAX_DURATION_S
from authz.tools.keys import SANDBOX_TOKEN_PREFIX, digest, generate_key
from tests.helpers.fakes import check_request

# name -> (key id, role, tier, enabled, expires_at)
# Keys used by many tests sit on generous tiers; "limited" and "limited-2" exist for the
# rate-limit tests.
KEY_SPECS = {
    "admin": ("key-admin", "admin", "premium", True, None),
    "user": ("key-user", "user", "unlimited", True, None),
    "viewer": ("key-viewer", "viewer", "unlimited", True, None),
    "disabled": ("key-disabled", "user", "default", False, None),
    "expired": ("key-expired", "user", "default", True, "2024-01-01T00:00:00Z"),
    "revocable": ("key-revocable", "user", "premium", True, None),
    "limited": ("key-limited", "viewer", "default", True, None),
    "limited-2": ("key-limited-2", "viewer", "default", True, None),
}
# The stack runs with a full minute of burst, so a tier of L per minute admits exactly L
# requests at once (the default, 10 s worth, is smoother but harder to count).
BURST_S = "60"
# sandbox id -> (tier, enabled)
SANDBOX_SPECS = {
    "sb-default": ("default", True),
    "sb-restricted": ("restricted", True),
    "sb-standard": ("standard", True),
    "sb-premium": ("premium", True),
    "sb-admin": ("admin", True),
    "sb-disabled": ("admin", False),
    "sb-limited": ("standard", True),
}
SERVICES = ("httpbin", "openai", "anthropic", "github", "slack")


class OverridesAdmin:
    """``add_override`` for a helper holding ``admin``, a client of an authz admin API
    (the e2e stack's, a fleet replica's)."""

    admin: httpx.Client

    def add_override(
        self,
        effect: str,
        match: Mapping[str, object],
        *,
        reason: str,
        ttl_seconds: int = 600,
        decision_path: str = "authz/gateway/decision",
    ) -> httpx.Response:
        """``POST /v1/overrides`` on the admin API (:func:`post_override`)."""
        return post_override(
            self.admin,
            effect,
            match,
            reason=reason,
            ttl_seconds=ttl_seconds,
            decision_path=decision_path,
        )


@dataclass
class Env(OverridesAdmin):
    """A running stack with its keys, sandbox tokens, egress secrets and clients."""

    stack: Stack
    keys: dict[str, str]
    tokens: dict[str, str]
    secrets: dict[str, str]
    secrets_file: Path
    overlay: Path
    bundle_dir: Path
    gateway: httpx.Client
    egress: httpx.Client
    admin_token: str
    admin: httpx.Client
    # Every response (status line, headers, body) the gateway and egress clients received,
    # for the final check that no secret ever came back (test_zz_no_secrets.py).
    seen: list[str] = field(default_factory=list)
    # egress (issue 18): the port of the local HTTPS server that plays TUNNEL_TEST_HOST
    # (0: none; AUTHZ_EGRESS_TUNNEL_TEST_TARGETS points the tunnel there).
    tunnel_test_port: int = 0

    def record(self, response: httpx.Response) -> None:
        """httpx response hook: keep what came back."""
        response.read()
        self.seen.append(f"{response.status_code} {response.headers!r} {response.text}")

    def write_secrets(self, secrets: dict[str, str] | None = None) -> None:
        """(Re)write the egress secrets file; bumps mtime so authz sees the change."""
        write_secrets_file(self.secrets_file, self.secrets if secrets is None else secrets)

    def sandbox_headers(self, sandbox: str, service: str) -> dict[str, str]:
        """Headers a sandbox sends to call ``service`` through the egress proxy."""
        return {"host": service, "x-sandbox-id": sandbox, "x-sandbox-token": self.tokens[sandbox]}

    def write_keys(self, disabled: frozenset[str] = frozenset()) -> None:
        """Write the API-key data overlay (names in ``disabled`` get enabled=false)."""
        entries = {}
        for name, (key_id, role, tier, enabled, expires_at) in KEY_SPECS.items():
            entry = {
                "id": key_id,
                "enabled": enabled and name not in disabled,
                "role": role,
                "rate_limit_tier": tier,
            }
            if expires_at:
                entry["expires_at"] = expires_at
            entries[digest(self.keys[name])] = entry
        target = self.overlay / "gateway/api_keys/data.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(entries), encoding="utf-8")
        sandboxes = {
            sandbox: {
                "tier": tier,
                "enabled": enabled,
                "token_sha256": digest(self.tokens[sandbox]),
            }
            for sandbox, (tier, enabled) in {**SANDBOX_SPECS, **CROWD_SPECS}.items()
        }
        target = self.overlay / "egress/sandboxes/data.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(sandboxes), encoding="utf-8")

    def write_tunnel_hosts(self) -> None:
        """The deployment overlay of tunnel hosts (``data.egress.tunnel_hosts``): tier
        ``standard`` may also reach :data:`TUNNEL_TEST_HOST` and this machine's host name
        (which resolves to a non-public address: authz must refuse it)."""
        target = self.overlay / "egress/tunnel_hosts/data.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        hosts = [TUNNEL_TEST_HOST, socket.gethostname().lower()]
        target.write_text(json.dumps({"standard": hosts}), encoding="utf-8")

    def build_bundle(self, root: Path) -> str:
        """Run scripts/build-policy-bundle with the overlay; returns the revision."""
        result = subprocess.run(
            [
                str(root / "scripts/build-policy-bundle"),
                "--data",
                str(self.overlay),
                "--out",
                str(self.bundle_dir),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]


@contextmanager
def running_env(
    root: Path,
    base: Path,
    *,
    authz_env: Mapping[str, str] | None = None,
    gateway_body_routes: Sequence[BodyRoute] = (),
    tunnel_test_port: int = 0,
    tunnel_max_duration_s: int | None = None,
) -> Iterator[Env]:
    """The whole stack on free ports, everything it writes under ``base``: fresh keys
    (:data:`KEY_SPECS`), sandbox tokens (:data:`SANDBOX_SPECS`), egress secrets
    (:data:`SERVICES`) and admin token, a bundle built with their digests; authz runs
    with :data:`BURST_S` and the admin token, plus ``authz_env``;
    ``gateway_body_routes`` go to :class:`Stack`. ``tunnel_test_port``: a local server
    plays :data:`TUNNEL_TEST_HOST` there (tier standard may tunnel to it);
    ``tunnel_max_duration_s``: the egress tunnels' longest life (None: the generator's).
    OPA and both Envoys are containers with ``AUTHZ_E2E_CONTAINERS=1`` (the test fails
    without a Docker engine). Yields once every process is ready; stops the stack and
    closes the clients on exit."""
    ports = Ports.free()
    secrets_file = base / "secrets/egress.json"
    admin_token = generate_key("adm_")
    try:
        runtime = containers.from_env(os.environ, root=root, run_dir=base / "run")
    except containers.ContainersUnavailable as exc:
        pytest.fail(str(exc))
    stack = Stack(
        root,
        base / "run",
        base / "bundles",
        ports,
        secrets_file=secrets_file,
        authz_env={
            "AUTHZ_RATE_LIMIT_BURST_S": BURST_S,
            "AUTHZ_ADMIN_TOKEN": admin_token,
            **tunnel_test_env(tunnel_test_port),
            **(authz_env or {}),
        },
        wrap=None if runtime is None else runtime.wrap,
        gateway_body_routes=gateway_body_routes,
        tunnel_max_duration_s=(
            TUNNEL_MAX_DURATION_S if tunnel_max_duration_s is None else tunnel_max_duration_s
        ),
    )
    env = Env(
        stack,
        keys={name: generate_key() for name in KEY_SPECS},
        tokens={
            sandbox: generate_key(SANDBOX_TOKEN_PREFIX)
            for sandbox in {**SANDBOX_SPECS, **CROWD_SPECS}
        },
        secrets={service: f"{service}-{generate_key('secret_')}" for service in SERVICES},
        secrets_file=secrets_file,
        overlay=base / "overlay",
        bundle_dir=base / "bundles",
        gateway=httpx.Client(base_url=f"http://127.0.0.1:{ports.gateway}", timeout=5.0),
        egress=httpx.Client(base_url=f"http://127.0.0.1:{ports.egress}", timeout=5.0),
        admin_token=admin_token,
        admin=httpx.Client(
            base_url=f"http://127.0.0.1:{ports.authz_admin}",
            headers={"authorization": f"Bearer {admin_token}", "x-authz-actor": "e2e"},
            timeout=5.0,
        ),
    )
    env.tunnel_test_port = tunnel_test_port
    try:
        env.write_keys()
        if tunnel_test_port:
            env.write_tunnel_hosts()
        env.write_secrets()
        env.build_bundle(root)
        with stack:
            yield env
    finally:
        env.gateway.close()
        env.egress.close()
        env.admin.close()


@contextmanager
def authz_processes(
    e2e: Env, tmp: Path, count: int, env: dict[str, str], *, wait_ready: bool = True
) -> Iterator[list[tuple[int, int]]]:
    """``count`` authz processes on the session's OPA (unless ``env`` names another);
    yields (grpc port, admin port) once each is ready (only alive when not
    ``wait_ready``)."""
    started: list[Process] = []
    ports = []
    try:
        for i in range(count):
            grpc_port, admin_port = free_port(), free_port()
            process = Process(
                f"authz-{i}",
                [sys.executable, "-m", "authz", "serve"],
                tmp / f"authz-{i}.log",
                functools.partial(
                    http_ok,
                    f"http://127.0.0.1:{admin_port}/{'readyz' if wait_ready else 'healthz'}",
                ),
                env={
                    **os.environ,
                    "AUTHZ_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
                    "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
                    "AUTHZ_OPA_URL": env.get(
                        "AUTHZ_OPA_URL", f"http://127.0.0.1:{e2e.stack.ports.opa}"
                    ),
                    "AUTHZ_RATE_LIMIT_BURST_S": BURST_S,
                    "AUTHZ_DECISION_LOG": "false",
                    "AUTHZ_AUDIT_DB": str(tmp / f"audit-{i}.db"),
                    "AUTHZ_OVERRIDES_FILE": str(tmp / f"overrides-{i}.json"),
                    **env,
                },
            )
            started.append(process)
            process.start()
            process.wait_ready(30)
            ports.append((grpc_port, admin_port))
        yield ports
    finally:
        for process in started:
            process.stop()


def authz_channel(e2e: Env, *, client: Path | None = None, tls: bool = True) -> grpc.Channel:
    """A blocking channel to the stack's authz gRPC port: TLS trusting the stack's CA and
    expecting authz's SAN ("authz", as Envoy does), presenting the client certificate in
    the ``client`` directory (``tls.crt``, ``tls.key``; default Envoy's; a directory
    without them: no client certificate); ``tls=False``: plaintext."""
    target = f"127.0.0.1:{e2e.stack.ports.authz_grpc}"
    if not tls:
        return grpc.insecure_channel(target)
    directory = client if client is not None else e2e.stack.mtls["envoy-client"].directory
    cert, key = directory / "tls.crt", directory / "tls.key"
    credentials = grpc.ssl_channel_credentials(
        e2e.stack.mtls["authz"].ca.read_bytes(),
        private_key=key.read_bytes() if key.exists() else None,
        certificate_chain=cert.read_bytes() if cert.exists() else None,
    )
    return grpc.secure_channel(
        target, credentials, options=(("grpc.ssl_target_name_override", "authz"),)
    )


def check_all(
    grpc_ports: list[int],
    api_key: str,
    n: int,
    decision_path: str = "authz/gateway/decision",
    path: str = "/api/v1/status",
) -> list[int]:
    """Send ``n`` concurrent Checks spread over the ports; returns the HTTP statuses."""

    async def run() -> list[int]:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in grpc_ports]
        stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]
        request = check_request(
            path=path,
            headers={"x-api-key": api_key},
            context_extensions={"decision_path": decision_path},
        )
        try:
            replies = await asyncio.gather(
                *(stubs[i % len(stubs)].Check(request, timeout=5) for i in range(n))
            )
        finally:
            for channel in channels:
                await channel.close(grace=None)
        return [
            200 if r.HasField("ok_response") else int(r.denied_response.status.code)
            for r in replies
        ]

    return asyncio.run(run())


def poll_status(
    call: Callable[[], httpx.Response], status: int, timeout_s: float = 10.0
) -> httpx.Response:
    """Repeat ``call`` every 0.1 s until it answers ``status`` and return that response;
    after ``timeout_s`` seconds, fail the test with the last response's body."""
    deadline = time.monotonic() + timeout_s
    while True:
        resp = call()
        if resp.status_code == status or time.monotonic() > deadline:
            assert resp.status_code == status, resp.text
            return resp
        time.sleep(0.1)


# -- egress (issue 18): tunnels and many concurrent sandboxes -----------------------------

# The "allowed host" of the tunnel tests (RFC 6761 .test: never a real name); a tunnel to
# TUNNEL_TEST_HOST:443 goes to the test's local HTTPS server (AUTHZ_EGRESS_TUNNEL_TEST_TARGETS).
TUNNEL_TEST_HOST = "allowed.test"
# Sandboxes for the concurrency test (>= 50 tunnels at once): tier standard (openai).
CROWD_SPECS = {f"sb-crowd-{i:02d}": ("standard", True) for i in range(50)}


def tunnel_test_env(port: int) -> dict[str, str]:
    """authz's test-only tunnel target setting for a local server on ``port`` (none: 0)."""
    if not port:
        return {}
    return {"AUTHZ_EGRESS_TUNNEL_TEST_TARGETS": f"{TUNNEL_TEST_HOST}:443=127.0.0.1:{port}"}


def post_override(
    admin: httpx.Client,
    effect: str,
    match: Mapping[str, object],
    *,
    reason: str,
    ttl_seconds: int = 600,
    decision_path: str = "authz/gateway/decision",
) -> httpx.Response:
    """``POST /v1/overrides`` through ``admin`` (a client of an admin API): ``effect``
    (allow, deny) for requests that ``match``, for ``ttl_seconds``; returns the response
    (201 and the override's JSON when it took)."""
    return admin.post(
        "/v1/overrides",
        json={
            "effect": effect,
            "decision_path": decision_path,
            "match": dict(match),
            "ttl_seconds": ttl_seconds,
            "reason": reason,
        },
    )
