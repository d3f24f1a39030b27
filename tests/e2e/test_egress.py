"""The egress path end to end: sandbox -> Envoy egress -> authz -> OPA -> stand-in (TLS)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from authz.core.headers import CREDENTIAL_HEADERS, FORWARDING_HEADERS
from tests.helpers.e2e import SANDBOX_SPECS, SERVICES, Env, poll_status

pytestmark = pytest.mark.e2e

# One allowed call per service.
PROBE = {
    "httpbin": ("GET", "/get"),
    "openai": ("POST", "/v1/chat/completions"),
    "anthropic": ("POST", "/v1/messages"),
    "github": ("GET", "/repos/acme/widgets"),
    "slack": ("POST", "/api/chat.postMessage"),
}
# Written by hand, not read from the bundle data.
ACCESS = {
    "default": set(),
    "restricted": {"httpbin"},
    "standard": {"openai", "anthropic", "github"},
    "premium": set(SERVICES),
    "admin": set(SERVICES),
}


def _error(resp: httpx.Response) -> str:
    assert resp.headers["content-type"] == "application/json", resp.text
    return str(resp.json()["error"])


def _all_logs(e2e: Env) -> str:
    return "".join(p.read_text() for p in (e2e.stack.run_dir / "logs").glob("*.log"))


@pytest.mark.parametrize(
    ("sandbox", "service"),
    [
        (sb, svc)
        for sb, (_, on) in SANDBOX_SPECS.items()
        if on and sb != "sb-limited"
        for svc in SERVICES
    ],
)
def test_tier_by_service(e2e: Env, sandbox: str, service: str) -> None:
    method, path = PROBE[service]
    resp = e2e.egress.request(
        method, path, headers=e2e.sandbox_headers(sandbox, service), json={"q": 1}
    )
    tier = SANDBOX_SPECS[sandbox][0]
    if service in ACCESS[tier]:
        assert resp.status_code == 200, resp.text
        assert resp.json()["service"] == service
        assert resp.json()["credential_ok"] is True
    else:
        assert resp.status_code == 403
        assert _error(resp) == "service_not_allowed"


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        ({"host": "openai"}, 401, "missing_sandbox_id"),
        (
            {"host": "openai", "x-sandbox-id": "sb-nope", "x-sandbox-token": "x"},
            401,
            "unknown_sandbox",
        ),
        ({"host": "openai", "x-sandbox-id": "sb-standard"}, 401, "missing_sandbox_token"),
        (
            {"host": "openai", "x-sandbox-id": "sb-standard", "x-sandbox-token": "guess"},
            401,
            "invalid_sandbox_token",
        ),
        ({"host": "nosuchapi"}, 401, "missing_sandbox_id"),
    ],
    ids=["no-id", "unknown", "no-token", "bad-token", "unknown-host-no-id"],
)
def test_identity_denials(e2e: Env, headers: dict[str, str], status: int, reason: str) -> None:
    resp = e2e.egress.get("/v1/models", headers=headers)
    assert resp.status_code == status
    assert _error(resp) == reason
    assert resp.headers["www-authenticate"].startswith('Bearer realm="authz"')


def test_token_of_another_sandbox_is_refused(e2e: Env) -> None:
    headers = {**e2e.sandbox_headers("sb-restricted", "openai"), "x-sandbox-id": "sb-admin"}
    resp = e2e.egress.get("/v1/models", headers=headers)
    assert resp.status_code == 401
    assert _error(resp) == "invalid_sandbox_token"


def test_disabled_sandbox(e2e: Env) -> None:
    resp = e2e.egress.get("/v1/models", headers=e2e.sandbox_headers("sb-disabled", "openai"))
    assert resp.status_code == 401
    assert _error(resp) == "sandbox_disabled"


@pytest.mark.parametrize(
    ("service", "method", "path", "status", "reason"),
    [
        ("nosuchapi", "GET", "/", 403, "unknown_service"),
        ("openai", "DELETE", "/v1/models/x", 403, "method_not_allowed"),
        ("openai", "GET", "/v1/files", 403, "path_not_allowed"),
        ("openai", "GET", "/v1/models/a/b", 403, "path_not_allowed"),
        ("github", "GET", "/orgs/acme/members", 403, "path_not_allowed"),
        ("github", "GET", "/repos/../user/keys", 403, "path_not_allowed"),
        ("openai", "GET", "/v1/models", 200, None),
        ("openai", "GET", "/v1/models/gpt-x", 200, None),
        ("github", "POST", "/repos/acme/widgets/issues", 200, None),
        ("github", "PATCH", "/repos/acme/widgets", 403, "path_denied"),
        ("github", "POST", "/repos/acme/widgets/hooks", 403, "path_denied"),
        ("github", "POST", "/repos/acme/widgets/keys", 403, "path_denied"),
        ("github", "POST", "/repos/acme/widgets/forks", 403, "path_not_allowed"),
    ],
    ids=[
        "unknown-service",
        "method",
        "path",
        "too-deep",
        "github-members",
        "github-dotdot",
        "models",
        "model",
        "github-open-issue",
        "github-settings",
        "github-hook",
        "github-deploy-key",
        "github-fork",
    ],
)
def test_method_and_path_rules(
    e2e: Env, service: str, method: str, path: str, status: int, reason: str | None
) -> None:
    resp = e2e.egress.request(method, path, headers=e2e.sandbox_headers("sb-admin", service))
    assert resp.status_code == status, resp.text
    if reason is not None:
        assert _error(resp) == reason


def test_credential_injected_and_sandbox_headers_stripped(e2e: Env) -> None:
    headers = {
        **e2e.sandbox_headers("sb-standard", "anthropic"),
        "x-api-key": "sandbox-forged-key",
        "authorization": "Bearer sandbox-forged",
        "cookie": "session=1",
        "x-sandbox-extra": "1",
        "x-authz-role": "admin",
        "anthropic-version": "2023-06-01",
    }
    resp = e2e.egress.post("/v1/messages", headers=headers, json={"model": "m"})
    assert resp.status_code == 200, resp.text
    seen = resp.json()
    assert seen["credential_ok"] is True  # the stand-in got exactly the real credential
    upstream = seen["headers"]
    assert seen["host"].startswith("api.anthropic.com")
    for gone in (
        "x-sandbox-id",
        "x-sandbox-token",
        "authorization",
        "cookie",
        "x-sandbox-extra",
        "x-authz-role",
        "x-authz-decision-id",
        "x-forwarded-for",
    ):
        assert gone not in upstream, gone
    assert upstream["anthropic-version"] == "2023-06-01"
    # The sandbox never sees the credential, nor does any log line.
    assert e2e.secrets["anthropic"] not in resp.text
    assert e2e.secrets["anthropic"] not in _all_logs(e2e)
    assert e2e.tokens["sb-standard"] not in _all_logs(e2e)


def test_no_credential_or_forwarding_header_reaches_a_third_party(e2e: Env) -> None:
    # README: no header of the one credential list, and no client-sent X-Forwarded-For,
    # X-Real-IP, Forwarded, X-Forwarded-Host or method override, reaches a third party.
    sent = {name: "203.0.113.9" for name in FORWARDING_HEADERS}
    sent.update({name: f"sandbox-{name}" for name in CREDENTIAL_HEADERS})
    sent.update(e2e.sandbox_headers("sb-standard", "openai"))
    resp = e2e.egress.post("/v1/chat/completions", headers=sent, json={"m": 1})
    assert resp.status_code == 200, resp.text
    seen = resp.json()
    assert seen["method"] == "POST"
    assert seen["credential_ok"] is True  # the injected authorization, nothing else
    upstream = seen["headers"]
    assert [name for name in FORWARDING_HEADERS if name in upstream] == []
    assert [n for n in CREDENTIAL_HEADERS if n in upstream and n != "authorization"] == []
    assert "203.0.113.9" not in resp.text
    assert "sandbox-" not in resp.text


def test_secrets_file_reloads_without_restart(e2e: Env) -> None:
    headers = e2e.sandbox_headers("sb-admin", "openai")
    assert e2e.egress.get("/v1/models", headers=headers).json()["credential_ok"] is True
    try:
        # Missing reference -> 503 for that service only.
        e2e.write_secrets({k: v for k, v in e2e.secrets.items() if k != "openai"})
        resp = poll_status(lambda: e2e.egress.get("/v1/models", headers=headers), 503)
        assert _error(resp) == "credential_unavailable"
        ok = e2e.egress.post(
            "/v1/messages", headers=e2e.sandbox_headers("sb-standard", "anthropic")
        )
        assert ok.status_code == 200
        # Rotated value -> injected at once: the stand-in (which knows the old one) refuses.
        e2e.write_secrets({**e2e.secrets, "openai": "rotated-openai-value"})
        resp = poll_status(lambda: e2e.egress.get("/v1/models", headers=headers), 401)
        assert resp.json()["error"]["code"] == "invalid_api_key"  # OpenAI's own 401
        # Malformed file -> every credential unavailable, never a request without one.
        e2e.secrets_file.write_text("{broken")
        os.utime(e2e.secrets_file)
        resp = poll_status(lambda: e2e.egress.get("/v1/models", headers=headers), 503)
        assert _error(resp) == "credential_unavailable"
        ready = httpx.get(f"http://127.0.0.1:{e2e.stack.ports.authz_admin}/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["secrets"]["ok"] is False
    finally:
        e2e.write_secrets()
    resp = poll_status(lambda: e2e.egress.get("/v1/models", headers=headers), 200)
    assert resp.json()["credential_ok"] is True


def test_decision_log_names_sandbox_and_service(e2e: Env) -> None:
    resp = e2e.egress.get("/v1/models", headers=e2e.sandbox_headers("sb-premium", "openai"))
    assert resp.status_code == 200
    log_path: Path = e2e.stack.run_dir / "logs/authz.log"
    deadline = time.monotonic() + 5
    records: list[dict[str, object]] = []
    while time.monotonic() < deadline and not records:
        records = [
            json.loads(line)
            for line in log_path.read_text().splitlines()
            if '"sandbox_id":"sb-premium"' in line
        ]
        time.sleep(0.05)
    assert records
    record = records[-1]
    assert record["decision_path"] == "authz/egress/decision"
    assert record["service"] == "openai"
    assert record["result"] == "allow"


def test_the_sandboxs_own_authorization_is_replaced(e2e: Env) -> None:
    headers = {
        **e2e.sandbox_headers("sb-standard", "openai"),
        "authorization": "Bearer sk-sandbox-own-guess",
    }
    resp = e2e.egress.post("/v1/chat/completions", headers=headers, json={"m": 1})
    assert resp.status_code == 200, resp.text
    # The stand-in accepts only the real credential from the secrets file: the sandbox's
    # value was overwritten, not appended next to it.
    assert resp.json()["credential_ok"] is True
    assert "sk-sandbox-own-guess" not in resp.text


def test_secrets_file_removed_means_deny_not_a_bare_forward(e2e: Env) -> None:
    headers = e2e.sandbox_headers("sb-admin", "github")
    assert e2e.egress.get("/user", headers=headers).status_code == 200
    e2e.secrets_file.unlink()
    try:
        resp = poll_status(lambda: e2e.egress.get("/user", headers=headers), 503)
        assert _error(resp) == "credential_unavailable"
    finally:
        e2e.write_secrets()
    poll_status(lambda: e2e.egress.get("/user", headers=headers), 200)
