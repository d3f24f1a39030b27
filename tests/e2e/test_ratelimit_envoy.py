"""Rate limits through Envoy: 429 with Retry-After after the quota, per key and per
sandbox x service; allowed responses carry the remaining quota."""

from __future__ import annotations

import pytest

from tests.helpers.e2e import Env

pytestmark = pytest.mark.e2e

DEFAULT_TIER_RPM = 60  # policy/gateway/data.json; the e2e stack's burst is a full minute
STANDARD_EGRESS_RPM = 60  # policy/egress/data.json


def test_key_on_default_tier_gets_429_after_its_quota(e2e: Env) -> None:
    headers = {"x-api-key": e2e.keys["limited"]}
    statuses = [e2e.gateway.get("/api/v1/status", headers=headers) for _ in range(DEFAULT_TIER_RPM)]
    assert [r.status_code for r in statuses] == [200] * DEFAULT_TIER_RPM
    assert statuses[0].headers["ratelimit-limit"] == str(DEFAULT_TIER_RPM)
    assert statuses[0].headers["ratelimit-remaining"] == str(DEFAULT_TIER_RPM - 1)
    assert statuses[-1].headers["ratelimit-remaining"] == "0"
    assert statuses[0].headers["ratelimit-policy"] == f"{DEFAULT_TIER_RPM};w=60;burst=60"
    limited = e2e.gateway.get("/api/v1/status", headers=headers)
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 2
    assert limited.headers["ratelimit-remaining"] == "0"
    # Another key on the same tier is unaffected.
    other = e2e.gateway.get("/api/v1/status", headers={"x-api-key": e2e.keys["limited-2"]})
    assert other.status_code == 200


def test_unlimited_tier_has_no_rate_limit_headers(e2e: Env) -> None:
    resp = e2e.gateway.get("/api/v1/status", headers={"x-api-key": e2e.keys["viewer"]})
    assert resp.status_code == 200
    assert "ratelimit-limit" not in resp.headers


def test_sandbox_limit_is_per_service(e2e: Env) -> None:
    openai = e2e.sandbox_headers("sb-limited", "openai")
    results = [e2e.egress.get("/v1/models", headers=openai) for _ in range(STANDARD_EGRESS_RPM)]
    assert {r.status_code for r in results} == {200}
    limited = e2e.egress.get("/v1/models", headers=openai)
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate_limited"
    assert "retry-after" in limited.headers
    # Same sandbox, another service: its own bucket.
    github = e2e.egress.get("/user", headers=e2e.sandbox_headers("sb-limited", "github"))
    assert github.status_code == 200
    assert github.headers["ratelimit-remaining"] == str(STANDARD_EGRESS_RPM - 1)
