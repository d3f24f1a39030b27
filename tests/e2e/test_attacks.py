"""Attacks on the real stack (Envoy + authz + OPA + upstream): each is refused or harmless."""

from __future__ import annotations

import pytest

from tests.helpers.e2e import Env

pytestmark = pytest.mark.e2e


def test_dry_run_never_forwards_forged_identity_headers(e2e: Env) -> None:
    # In dry-run a suppressed deny is forwarded with only the credential headers removed:
    # an anonymous client's X-Authz-Role: admin reaches the upstream, which the README
    # tells to trust x-authz-* ("client-sent values ... are overwritten or removed").
    forged = {"x-authz-key-id": "key-admin", "x-authz-role": "admin", "x-authz-tier": "unlimited"}
    switched = e2e.admin.post("/v1/mode", json={"mode": "dry-run", "reason": "review"})
    assert switched.status_code == 200
    try:
        resp = e2e.gateway.get("/api/v1/admin/users", headers=forged)  # no API key at all
        assert resp.status_code == 200
        assert resp.headers["x-authz-dry-run"].startswith("would-deny; reason=missing_api_key")
        upstream = resp.json()["headers"]
    finally:
        e2e.admin.post("/v1/mode", json={"mode": "enforce", "reason": "review done"})
    leaked = {k: upstream[k] for k in forged if k in upstream}
    assert leaked == {}, f"upstream received forged identity headers: {leaked}"


def test_path_parameters_cannot_slip_past_a_path_rule(e2e: Env) -> None:
    # /api/v1/admin/** is admin-only. With a ';' path parameter the segment is
    # "admin;x", so the policy's glob falls through to /api/v1/** (user allowed), and
    # Envoy forwards /api/v1/admin;x/users unchanged. Servlet containers (Tomcat,
    # Jetty, Spring) strip ';...' path parameters and route it to /api/v1/admin/users.
    user = {"x-api-key": e2e.keys["user"]}
    assert e2e.gateway.get("/api/v1/admin/users", headers=user).status_code == 403
    resp = e2e.gateway.get("/api/v1/admin;x/users", headers=user)
    assert resp.status_code != 200, f"reached the upstream as {resp.json()['path']!r}"


def test_deeply_nested_json_body_is_never_a_server_error(e2e: Env) -> None:
    # A 600-byte JSON body nested 300 deep: orjson refuses to serialize the input
    # (255 levels); never a 500 internal_error. The shipped gateway route sends authz no
    # body at all, so the policy decides on the headers (user may POST); a route that
    # asks for the body answers 400 invalid_request (tests/unit/core/test_input.py).
    body = "[" * 300 + "]" * 300
    resp = e2e.gateway.post(
        "/api/v1/items",
        content=body,
        headers={"x-api-key": e2e.keys["user"], "content-type": "application/json"},
    )
    assert resp.status_code == 200, resp.text


def test_allow_override_works_for_a_default_tier_sandbox(e2e: Env) -> None:
    # README: an allow override "lets it through the tier/method/path (egress) rules".
    # For a `default`-tier sandbox (no services) the policy allows it, but the decision
    # carries that tier's rate limit, 0 per minute, so authz answers 429 every time.
    headers = e2e.sandbox_headers("sb-default", "openai")
    assert e2e.egress.get("/v1/models", headers=headers).status_code == 403
    created = e2e.add_override(
        "allow",
        {"sandbox_id": "sb-default", "service": "openai"},
        reason="review: onboarding sandbox needs openai for an hour",
        decision_path="authz/egress/decision",
    )
    assert created.status_code == 201, created.text
    try:
        resp = e2e.egress.get("/v1/models", headers=headers)
    finally:
        e2e.admin.delete(f"/v1/overrides/{created.json()['id']}")
    assert resp.status_code == 200, resp.text
