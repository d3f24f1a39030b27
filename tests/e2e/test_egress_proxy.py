"""The egress as a standard forward proxy (issue 18), end to end through the real egress
Envoy, authz and OPA: clients configured only with HTTPS_PROXY/HTTP_PROXY and the egress
CA reach the configured services intercepted (checked per request, credential injected),
allowed hosts through policy-checked tunnels, and nothing else."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier
from typing import Any

import pytest

from authz.core.tunnel import is_public
from tests.helpers.e2e import CROWD_SPECS, TUNNEL_TEST_HOST, Env
from tests.helpers.egress import basic, http11, proxy_connect, tls_client, tls_echo_server

pytestmark = pytest.mark.e2e

REALM = 'Basic realm="authz-egress"'


def _proxy_url(e2e: Env, sandbox: str, token: str | None = None) -> str:
    token = e2e.tokens[sandbox] if token is None else token
    return f"http://{sandbox}:{token}@127.0.0.1:{e2e.stack.ports.egress}"


def agent_env(e2e: Env, sandbox: str, token: str | None = None) -> dict[str, str]:
    """What README "Use it from an agent" tells a sandbox to set, and nothing else of
    authz's (no X-Sandbox-* headers, no base URL)."""
    url = _proxy_url(e2e, sandbox, token)
    ca = str(e2e.stack.egress_ca)
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    return {
        **keep,
        # Both spellings: curl reads only the lowercase http_proxy (httpoxy), others
        # the uppercase one.
        "HTTPS_PROXY": url,
        "HTTP_PROXY": url,
        "https_proxy": url,
        "http_proxy": url,
        "SSL_CERT_FILE": ca,
        "REQUESTS_CA_BUNDLE": ca,
        "NODE_EXTRA_CA_CERTS": ca,
        "GIT_SSL_CAINFO": ca,
    }


def curl(e2e: Env, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """curl with ``env`` only; what it printed is kept for the no-secrets sweep."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    e2e.seen.append(result.stdout + result.stderr)
    return result


def _decision_log(e2e: Env, field: str, wanted: set[str], timeout_s: float) -> dict[str, Any]:
    """authz's decision-log lines (authz.log) whose ``field`` is in ``wanted``, by that
    value, waiting up to ``timeout_s`` for all of them."""
    path = e2e.stack.run_dir / "logs/authz.log"
    deadline = time.monotonic() + timeout_s
    found: dict[str, dict[str, Any]] = {}
    while True:
        for line in path.read_text(errors="replace").splitlines():
            if '"type": "decision"' not in line and '"type":"decision"' not in line:
                continue
            record = json.loads(line[line.index("{") :])
            if record.get(field) in wanted:
                found[record[field]] = record
        if set(found) == wanted or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def decisions(e2e: Env, ids: set[str], timeout_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """The decision-log lines of the decision ids ``ids``."""
    return _decision_log(e2e, "decision_id", ids, timeout_s)


def decided_paths(e2e: Env, paths: set[str], timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
    """The decision-log lines of requests to ``paths`` (each path used once)."""
    return _decision_log(e2e, "path", paths, timeout_s)


# -- identity from the standard proxy settings -------------------------------------------


def test_curl_with_only_the_proxy_env_reaches_github_with_the_real_credential(e2e: Env) -> None:
    result = curl(e2e, agent_env(e2e, "sb-standard"), "https://api.github.com/user")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["service"] == "github"
    assert answer["credential_ok"] is True
    # What reached the stand-in: the injected credential (masked in the echo), nothing of
    # the sandbox's identity or proxy credentials.
    headers = {k.lower() for k in answer["headers"]}
    assert "authorization" in headers
    assert not headers & {"proxy-authorization", "x-sandbox-id", "x-sandbox-token"}
    assert e2e.secrets["github"] not in result.stdout


def test_intercepted_tunnel_end_is_audited_under_its_connect_decision(e2e: Env) -> None:
    # Earlier tests' tunnels end (and are audited: Envoy flushes its gRPC access log every
    # second, authz's writer batches) while this one starts: wait until they have settled.
    before = _settled_tunnel_ends(e2e)
    result = curl(e2e, agent_env(e2e, "sb-standard"), "https://api.github.com/user")
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 10
    new: dict[str, dict[str, Any]] = {}
    while not new and time.monotonic() < deadline:
        new = {
            i: body
            for i, body in _tunnel_ends(e2e)
            if body["host"] == "api.github.com" and i not in before
        }
        time.sleep(0.1)
    [(decision_id, body)] = new.items()
    assert (body["port"], body["sandbox_id"]) == (443, "sb-standard")
    # The TLS handshake and one request/response went through the tunnel.
    assert body["bytes_received"] > 0
    assert body["bytes_sent"] > 0
    [(_, connect)] = _audit_rows(e2e, decision_id, "decision")
    assert connect["sandbox_id"] == "sb-standard"


def _settled_tunnel_ends(e2e: Env, quiet_s: float = 2.5, timeout_s: float = 20.0) -> set[str]:
    """The decision ids of the ``tunnel`` entries once none has been added for
    ``quiet_s`` seconds (more than Envoy's one-second flush plus the writer's batching)."""
    deadline = time.monotonic() + timeout_s
    seen = {i for i, _ in _tunnel_ends(e2e)}
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s:
        assert time.monotonic() < deadline, "tunnel entries kept coming"
        time.sleep(0.2)
        now = {i for i, _ in _tunnel_ends(e2e)}
        if now != seen:
            seen, quiet_since = now, time.monotonic()
    return seen


def _tunnel_ends(e2e: Env) -> list[tuple[str, dict[str, Any]]]:
    """Every ``tunnel`` audit entry so far: (decision id, body)."""
    conn = sqlite3.connect(f"file:{e2e.stack.run_dir / 'audit.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT decision_id, body FROM audit WHERE kind = 'tunnel'").fetchall()
    finally:
        conn.close()
    return [(str(i), json.loads(b)) for i, b in rows]


def test_absolute_form_request_through_http_proxy_gets_the_credential(e2e: Env) -> None:
    result = curl(e2e, agent_env(e2e, "sb-standard"), "http://api.openai.com/v1/models")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["credential_ok"] is True
    headers = {k.lower() for k in answer["headers"]}
    assert not headers & {"proxy-authorization", "x-sandbox-id", "x-sandbox-token"}


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "missing_sandbox_id"),
        ("wrong", "invalid_sandbox_token"),
        ("Basic !!notbase64", "invalid_proxy_authorization"),
        ("unknown", "unknown_sandbox"),
    ],
    ids=["none", "wrong-token", "malformed", "unknown-sandbox"],
)
def test_connect_without_valid_proxy_credentials_is_407(
    e2e: Env, authorization: str | None, reason: str
) -> None:
    if authorization == "wrong":
        authorization = basic("sb-standard", "sbt_wrong")
    elif authorization == "unknown":
        authorization = basic("sb-nope", e2e.tokens["sb-standard"])
    answer = proxy_connect(e2e.stack.ports.egress, "api.openai.com:443", authorization)
    answer.sock.close()
    e2e.seen.append(f"{answer.status} {answer.headers} {answer.body!r}")
    assert answer.status == 407
    assert answer.headers["proxy-authenticate"] == REALM
    assert answer.error() == reason


def test_curl_with_a_wrong_token_sees_407(e2e: Env) -> None:
    env = agent_env(e2e, "sb-standard", token="sbt_wrong")
    result = curl(
        e2e, env, "-o", "/dev/null", "-w", "%{http_connect}", "https://api.openai.com/v1/models"
    )
    assert result.returncode != 0
    assert result.stdout == "407"


# -- interception: a tier without the service, identity inside the tunnel ----------------


def test_clients_of_a_tier_without_the_service_are_refused_at_the_connect(e2e: Env) -> None:
    # sb-restricted: httpbin only.
    env = agent_env(e2e, "sb-restricted")
    result = curl(
        e2e, env, "-o", "/dev/null", "-w", "%{http_connect}", "https://api.github.com/user"
    )
    assert result.returncode != 0
    assert result.stdout == "403"
    answer = proxy_connect(
        e2e.stack.ports.egress,
        "api.github.com:443",
        basic("sb-restricted", e2e.tokens["sb-restricted"]),
    )
    answer.sock.close()
    assert answer.status == 403
    assert answer.error() == "service_not_allowed"


def _inner_request(
    e2e: Env, sandbox: str, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """One request inside a tunnel ``sandbox`` opened to api.openai.com."""
    answer = proxy_connect(
        e2e.stack.ports.egress, "api.openai.com:443", basic(sandbox, e2e.tokens[sandbox])
    )
    assert answer.status == 200, answer.body
    with tls_client(answer.sock, "api.openai.com", e2e.stack.egress_ca) as tls:
        status, _, body = http11(tls, "GET", "api.openai.com", path, headers)
    e2e.seen.append(body.decode(errors="replace"))
    return status, json.loads(body)


def test_identity_inside_the_tunnel_is_the_connects_whatever_the_client_sends(
    e2e: Env,
) -> None:
    # sb-standard presents sb-admin's id with its own token, and sb-admin's proxy
    # credentials with its own token: still sb-standard.
    forged = {
        "x-sandbox-id": "sb-admin",
        "x-sandbox-token": e2e.tokens["sb-standard"],
        "proxy-authorization": basic("sb-admin", e2e.tokens["sb-standard"]),
    }
    path = f"/v1/models/forged-{secrets.token_hex(8)}"
    status, body = _inner_request(e2e, "sb-standard", path, forged)
    assert status == 200, body
    assert body["credential_ok"] is True
    headers = {k.lower(): v for k, v in body["headers"].items()}
    assert not {"x-sandbox-id", "x-sandbox-token", "proxy-authorization"} & set(headers)
    [record] = decided_paths(e2e, {path}).values()
    assert record["sandbox_id"] == "sb-standard"
    assert record["result"] == "allow"
    # Each inner request is checked on its own: a path the service does not allow.
    status, body = _inner_request(e2e, "sb-standard", "/v1/files", {})
    assert status == 403
    assert body["error"] == "path_not_allowed"


def test_many_sandboxes_with_tunnels_held_open_never_get_each_others_identity(
    e2e: Env,
) -> None:
    """>= 50 sandboxes open their tunnels, all held open at once, then each sends three
    requests: every one is decided for the tunnel's own sandbox (the trap a shared
    connection pool sets, envoy.string filter state, would mix them)."""
    crowd = sorted(CROWD_SPECS)
    assert len(crowd) >= 50
    opened = Barrier(len(crowd), timeout=60)

    def run(sandbox: str) -> list[tuple[int, str]]:
        answer = proxy_connect(
            e2e.stack.ports.egress,
            "api.openai.com:443",
            basic(sandbox, e2e.tokens[sandbox]),
            timeout_s=30,
        )
        assert answer.status == 200, (sandbox, answer.body)
        with tls_client(answer.sock, "api.openai.com", e2e.stack.egress_ca) as tls:
            opened.wait()  # every tunnel open before any request
            seen = []
            for i in range(3):
                # A path per request: the decision log names the sandbox decided for.
                path = f"/v1/models/{sandbox}-{run_id}-{i}"
                status, _, body = http11(tls, "GET", "api.openai.com", path, {})
                e2e.seen.append(body.decode(errors="replace"))
                seen.append((status, path))
            return seen

    run_id = secrets.token_hex(4)
    with ThreadPoolExecutor(len(crowd)) as pool:
        results = dict(zip(crowd, pool.map(run, crowd), strict=True))
    served = {path for seen in results.values() for status, path in seen if status == 200}
    records = decided_paths(e2e, served)
    assert set(records) == served
    for sandbox, seen in results.items():
        for status, path in seen:
            if status == 200:
                assert records[path]["sandbox_id"] == sandbox, (sandbox, records[path])
                assert records[path]["result"] == "allow"
    # Each request served, or refused for load (authz's budget on a shared machine). With
    # the identities mixed, the requests count against a few sandboxes' rate limits: 429s.
    assert len(served) >= len(crowd) * 3 * 0.9, results


# -- policy-checked tunnels ----------------------------------------------------------------


@pytest.fixture(scope="module")
def allowed_host(e2e: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The local HTTPS echo server playing TUNNEL_TEST_HOST (its own CA: yielded)."""
    directory = tmp_path_factory.mktemp("allowed-host")
    with tls_echo_server(e2e.tunnel_test_port, directory, TUNNEL_TEST_HOST) as ca:
        yield ca


def test_tunnel_to_an_allowed_host_passes_bytes_untouched_and_is_logged(
    e2e: Env, allowed_host: Path
) -> None:
    answer = proxy_connect(
        e2e.stack.ports.egress,
        f"{TUNNEL_TEST_HOST}:443",
        basic("sb-standard", e2e.tokens["sb-standard"]),
    )
    assert answer.status == 200, answer.body
    payload = secrets.token_bytes(64 * 1024)
    # The host's own certificate, verified against its own CA only: not intercepted.
    with tls_client(answer.sock, TUNNEL_TEST_HOST, allowed_host) as tls:
        tls.sendall(payload)
        echoed = b""
        while len(echoed) < len(payload):
            chunk = tls.recv(65536)
            assert chunk
            echoed += chunk
    assert echoed == payload
    # The tunnel's end: Envoy's access log line with host, port, sandbox, bytes, duration.
    log = e2e.stack.run_dir / "logs/envoy-egress.log"
    # Envoy writes access logs in batches (file_flush_interval, 10 s by default).
    deadline = time.monotonic() + 15
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not lines:
        lines = [
            json.loads(line)
            for line in log.read_text(errors="replace").splitlines()
            if line.startswith("{")
            and f'"{TUNNEL_TEST_HOST}:443"' in line
            and '"sb-standard"' in line
        ]
        time.sleep(0.1)
    assert lines, "no access-log line for the tunnel"
    line = lines[-1]
    assert line["destination"] == f"{TUNNEL_TEST_HOST}:443"
    assert int(line["bytes_received"]) >= len(payload)
    assert int(line["bytes_sent"]) >= len(payload)
    assert int(line["duration_ms"]) >= 0
    # The same tunnel's end in authz's audit trail (Envoy's access log service), under
    # the id of the CONNECT's decision, chained with it.
    decision_id = line["decision_id"]
    [(_, body)] = _audit_rows(e2e, decision_id, "tunnel")
    assert body["sandbox_id"] == "sb-standard"
    assert (body["host"], body["port"]) == (TUNNEL_TEST_HOST, 443)
    assert body["bytes_received"] >= len(payload)
    assert body["bytes_sent"] >= len(payload)
    assert body["duration_ms"] >= 0
    assert body["status"] == 200
    [(_, connect)] = _audit_rows(e2e, decision_id, "decision")
    assert connect["sandbox_id"] == "sb-standard"


def test_refused_connect_leaves_no_tunnel_entry(e2e: Env, allowed_host: Path) -> None:
    """Only a CONNECT Envoy answered 200 is a tunnel: a refused one has its decision in
    the audit trail and no tunnel end."""
    proxy_auth = basic("sb-standard", e2e.tokens["sb-standard"])
    before = {i for i, _ in _tunnel_ends(e2e)}
    refused = proxy_connect(e2e.stack.ports.egress, "example.com:443", proxy_auth)
    refused.sock.close()
    assert refused.status == 403
    refused_id = refused.headers["x-authz-decision-id"]
    allowed = proxy_connect(e2e.stack.ports.egress, f"{TUNNEL_TEST_HOST}:443", proxy_auth)
    allowed.sock.close()
    assert allowed.status == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not {i for i, _ in _tunnel_ends(e2e)} - before:
        time.sleep(0.1)
    assert {i for i, _ in _tunnel_ends(e2e)} - before, "the allowed tunnel's end never came"
    time.sleep(1.5)  # past another flush of every Envoy worker's gRPC log buffer
    assert _audit_rows(e2e, refused_id, "decision", timeout_s=0)
    assert _audit_rows(e2e, refused_id, "tunnel", timeout_s=0) == []


def _audit_rows(
    e2e: Env, decision_id: str, kind: str, timeout_s: float = 10.0
) -> list[tuple[str, dict[str, Any]]]:
    """The audit entries of ``kind`` under ``decision_id`` (read-only; waiting up to
    ``timeout_s`` for the first: Envoy flushes its gRPC access log every second, authz's
    writer batches)."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn = sqlite3.connect(f"file:{e2e.stack.run_dir / 'audit.db'}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT kind, body FROM audit WHERE decision_id = ? AND kind = ?",
                (decision_id, kind),
            ).fetchall()
        finally:
            conn.close()
        if rows or time.monotonic() > deadline:
            return [(str(k), json.loads(b)) for k, b in rows]
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("authority", "status", "reason"),
    [
        ("example.com:443", 403, "tunnel_not_allowed"),
        ("127.0.0.1:443", 403, "ip_literal_not_allowed"),
        ("localhost:443", 403, "address_not_allowed"),
        ("169.254.169.254:80", 403, "ip_literal_not_allowed"),
        ("hostname", 403, "address_not_allowed"),
        ("api.openai.com:8443", 403, "service_host_not_tunnelable"),
        (f"{TUNNEL_TEST_HOST}:8443", 403, "tunnel_not_allowed"),
    ],
    ids=[
        "unlisted",
        "ip-literal",
        "localhost",
        "cloud-metadata",
        "name-resolving-to-loopback",
        "service-host-plain",
        "allowed-host-other-port",
    ],
)
def test_tunnels_that_policy_or_address_refuse_are_denied_and_audited(
    e2e: Env, authority: str, status: int, reason: str
) -> None:
    if authority == "hostname":
        # This machine's name: permitted by the tier, resolves to a non-public address.
        name = socket.gethostname().lower()
        answers = {ipaddress.ip_address(a[4][0]) for a in socket.getaddrinfo(name, 443)}
        assert not any(is_public(address) for address in answers), answers
        authority = f"{name}:443"
    answer = proxy_connect(
        e2e.stack.ports.egress, authority, basic("sb-standard", e2e.tokens["sb-standard"])
    )
    answer.sock.close()
    e2e.seen.append(f"{answer.status} {answer.headers} {answer.body!r}")
    assert answer.status == status
    assert answer.error() == reason
    decision_id = answer.headers["x-authz-decision-id"]
    [record] = decisions(e2e, {decision_id}).values()
    assert record["reason"] == reason
    assert record["sandbox_id"] == "sb-standard"


# -- the official SDKs, configured only through the environment ------------------------------

OPENAI_SCRIPT = """
import json
from openai import OpenAI

client = OpenAI()  # the default base URL: https://api.openai.com/v1
models = client.models.list()
chat = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hi"}]
)
print(json.dumps({
    "models": [m.id for m in models.data],
    "chat": chat.choices[0].message.content,
    "credential_ok": (chat.model_extra or {}).get("credential_ok"),
}))
"""

ANTHROPIC_SCRIPT = """
import json
from anthropic import Anthropic

client = Anthropic()  # the default base URL: https://api.anthropic.com
message = client.messages.create(
    model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Say hi"}]
)
print(json.dumps({
    "text": message.content[0].text,
    "credential_ok": (message.model_extra or {}).get("credential_ok"),
}))
"""


def run_sdk(e2e: Env, sandbox: str, script: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter whose only configuration is the agent
    environment and a placeholder API key (the SDKs require one; the egress replaces
    it with the real credential)."""
    env = {
        **agent_env(e2e, sandbox),
        "OPENAI_API_KEY": "sk-placeholder-the-sandbox-holds-no-key",
        "ANTHROPIC_API_KEY": "sk-ant-placeholder-the-sandbox-holds-no-key",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    e2e.seen.append(result.stdout + result.stderr)
    return result


def test_openai_sdk_lists_models_and_completes_a_chat_through_the_egress(e2e: Env) -> None:
    result = run_sdk(e2e, "sb-standard", OPENAI_SCRIPT)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["models"]
    assert answer["chat"]
    assert answer["credential_ok"] is True


def test_anthropic_sdk_creates_a_message_through_the_egress(e2e: Env) -> None:
    result = run_sdk(e2e, "sb-standard", ANTHROPIC_SCRIPT)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["text"]
    assert answer["credential_ok"] is True


@pytest.mark.parametrize(
    ("script", "error"),
    [
        (OPENAI_SCRIPT, "openai.APIConnectionError"),
        (ANTHROPIC_SCRIPT, "anthropic.APIConnectionError"),
    ],
    ids=["openai", "anthropic"],
)
def test_sdks_of_a_tier_without_the_service_are_refused_403(
    e2e: Env, script: str, error: str
) -> None:
    # sb-restricted: httpbin only. The CONNECT is refused (403 service_not_allowed), which
    # the SDKs report as a connection error naming the proxy's 403.
    result = run_sdk(e2e, "sb-restricted", script)
    assert result.returncode != 0
    assert error in result.stderr
    assert "403" in result.stderr


def test_a_revocation_cuts_an_open_intercepted_tunnel_at_its_next_request(e2e: Env) -> None:
    """Every request inside an intercepted tunnel is decided on its own: a deny override
    granted while the tunnel is open refuses the very next request in it."""
    sandbox = "sb-premium"
    answer = proxy_connect(
        e2e.stack.ports.egress, "api.openai.com:443", basic(sandbox, e2e.tokens[sandbox])
    )
    assert answer.status == 200, answer.body
    with tls_client(answer.sock, "api.openai.com", e2e.stack.egress_ca) as tls:
        status, _, body = http11(tls, "GET", "api.openai.com", "/v1/models", {})
        assert status == 200, body
        created = e2e.add_override(
            "deny",
            {"sandbox_id": sandbox, "service": "openai"},
            reason="revoked while its tunnel is open",
            decision_path="authz/egress/decision",
        ).json()
        try:
            status, _, body = http11(tls, "GET", "api.openai.com", "/v1/models", {})
            assert status == 403, body
            assert json.loads(body)["error"] == "blocked_by_override"
        finally:
            assert e2e.admin.delete(f"/v1/overrides/{created['id']}").status_code == 200
