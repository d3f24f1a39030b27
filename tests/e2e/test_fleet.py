"""A fleet behaves like one authz: two replicas, each with its own OPA (the Kubernetes
sidecar layout), one Redis, behind one Envoy (tests/helpers/fleet.py). Overrides granted
or deleted on one replica reach the other within one second, cached decisions do not
outlive them, a replica started later enforces them from its first request, and a Redis
outage follows the configured failure mode for overrides and rate limits."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.e2e import Env
from tests.helpers.fleet import Fleet, Replica, running_fleet
from tests.helpers.redis_server import RedisServer

pytestmark = pytest.mark.e2e

# The fleet's promise (README, "Fleets"): a change on one replica holds on every other
# within this. A functional bound of the design (pub/sub, POLL_S fallback), not a benchmark.
FLEET_DEADLINE_S = 1.0
ADMIN_REPORTS = "/api/v1/admin/reports"


def _within(condition: Callable[[], bool], timeout_s: float = FLEET_DEADLINE_S) -> float:
    """Seconds until ``condition()`` holds (polled every 20 ms); fails after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - start
        assert elapsed < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - start


def _sees_redis_down(replica: Replica) -> bool:
    detail: str = replica.ready().json()["checks"]["overrides"]["detail"]
    return detail.startswith("redis unreachable")


@pytest.fixture
def fleet(
    e2e: Env, tmp_path: Path, redis_server: RedisServer, envoy_bin: str, opa_bin: str
) -> Iterator[Fleet]:
    env = {
        "AUTHZ_REDIS_URL": redis_server.url,
        "AUTHZ_RATE_LIMIT_BACKEND": "redis",
        "AUTHZ_REDIS_TIMEOUT_MS": "500",
    }
    with running_fleet(e2e, tmp_path, envoy_bin, opa_bin, env=env) as running:
        yield running


def test_an_allow_granted_on_a_lets_a_request_through_b_within_one_second(
    e2e: Env, fleet: Fleet
) -> None:
    a, b = fleet.replicas
    user = e2e.keys["user"]
    assert a.check(user, ADMIN_REPORTS) == [403]
    assert b.check(user, ADMIN_REPORTS) == [403]
    created = a.add_override(
        "allow",
        {"key_id": "key-user", "path": ADMIN_REPORTS, "methods": ["GET"]},
        reason="INC-77 on-call",
    )
    assert created.status_code == 201, created.text
    _within(lambda: b.check(user, ADMIN_REPORTS) == [200])
    # Through Envoy, whichever replica answers: the fleet agrees.
    assert fleet.gateway is not None
    statuses = {
        fleet.gateway.get(ADMIN_REPORTS, headers={"x-api-key": user}).status_code for _ in range(6)
    }
    assert statuses == {200}
    listed = b.admin.get("/v1/overrides").json()["overrides"]
    assert [o["id"] for o in listed] == [created.json()["id"]]


def test_a_deny_granted_on_b_blocks_what_a_had_cached_and_a_delete_on_a_restores_b(
    e2e: Env, fleet: Fleet
) -> None:
    a, b = fleet.replicas
    viewer = e2e.keys["viewer"]
    hits = a.metric("authz_decision_cache_lookups_total", {"result": "hit"})
    assert a.check(viewer) == [200]
    assert a.check(viewer) == [200]
    assert a.metric("authz_decision_cache_lookups_total", {"result": "hit"}) > hits  # cached
    created = b.add_override("deny", {"key_id": "key-viewer"}, reason="key leaked")
    assert created.status_code == 201, created.text
    _within(lambda: a.check(viewer) == [403])
    assert b.check(viewer) == [403]
    deleted = a.admin.delete(f"/v1/overrides/{created.json()['id']}")
    assert deleted.status_code == 200, deleted.text
    _within(lambda: b.check(viewer) == [200])
    assert a.check(viewer) == [200]


def test_a_replica_started_after_a_grant_enforces_it_from_its_first_request(
    e2e: Env, fleet: Fleet
) -> None:
    a, _ = fleet.replicas
    created = a.add_override("deny", {"key_id": "key-admin"}, reason="offboarding")
    assert created.status_code == 201, created.text
    late = fleet.add_replica()
    assert late.check(e2e.keys["admin"]) == [403]  # its very first Check
    assert late.ready().json()["checks"]["overrides"]["ok"] is True


def test_an_admin_reload_on_one_replica_empties_every_replicas_cache(
    e2e: Env, fleet: Fleet
) -> None:
    a, b = fleet.replicas
    viewer = e2e.keys["viewer"]
    assert b.check(viewer, n=1) == [200]
    assert b.metric("authz_decision_cache_entries") >= 1
    assert a.admin.post("/v1/reload").status_code == 200
    _within(lambda: b.metric("authz_decision_cache_entries") == 0)
    assert b.metric("authz_fleet_cache_invalidations_total", {"direction": "received"}) >= 1


def test_redis_stopped_keeps_overrides_refuses_grants_and_falls_back_for_limits(
    e2e: Env, fleet: Fleet, redis_server: RedisServer
) -> None:
    a, b = fleet.replicas
    viewer, limited = e2e.keys["viewer"], e2e.keys["limited"]
    created = a.add_override("deny", {"key_id": "key-viewer"}, reason="key leaked")
    assert created.status_code == 201, created.text
    _within(lambda: b.check(viewer) == [403])
    redis_server.stop()
    # Overrides: the last known ones stay enforced on every replica; changes are refused.
    for replica in (a, b):
        _within(functools.partial(_sees_redis_down, replica), 5.0)
        assert replica.check(viewer) == [403]
        refused = replica.add_override(
            "allow", {"key_id": "key-viewer", "service": "x"}, reason="during the outage"
        )
        assert refused.status_code == 503
        assert refused.json()["error"] == "overrides_unavailable"
        assert replica.admin.delete(f"/v1/overrides/{created.json()['id']}").status_code == 503
        # AUTHZ_REDIS_FAILURE_MODE=fallback: ready, limits per replica, rate-limited keys pass.
        ready = replica.ready()
        assert ready.status_code == 200, ready.text
        assert replica.check(limited) == [200]
        assert replica.metric("authz_fleet_redis_available") == 0
    assert a.metric("authz_fleet_sync_failures_total") > 0
    assert a.metric("authz_fleet_sync_lag_seconds") > 0
    redis_server.start()  # an empty Redis (the test server keeps nothing)
    _within(lambda: a.metric("authz_fleet_redis_available") == 1, 5.0)
    # The fleet follows Redis: it holds no override now, so none is enforced.
    _within(lambda: a.check(viewer) == [200] and b.check(viewer) == [200], 5.0)
    again = b.add_override("deny", {"key_id": "key-viewer"}, reason="again")
    assert again.status_code == 201, again.text
    _within(lambda: a.check(viewer) == [403])


def test_redis_stopped_in_strict_mode_keeps_overrides_and_denies_limited_requests(
    e2e: Env, tmp_path: Path, redis_server: RedisServer, envoy_bin: str, opa_bin: str
) -> None:
    env = {
        "AUTHZ_REDIS_URL": redis_server.url,
        "AUTHZ_RATE_LIMIT_BACKEND": "redis",
        "AUTHZ_REDIS_FAILURE_MODE": "deny",
    }
    with running_fleet(e2e, tmp_path, envoy_bin, opa_bin, env=env, replicas=1) as fleet:
        [a] = fleet.replicas
        created = a.add_override("deny", {"key_id": "key-viewer"}, reason="key leaked")
        assert created.status_code == 201, created.text
        assert a.check(e2e.keys["viewer"]) == [403]
        redis_server.stop()
        _within(functools.partial(_sees_redis_down, a), 5.0)
        assert a.check(e2e.keys["viewer"]) == [403]  # the override, still enforced
        assert a.check(e2e.keys["limited"]) == [503]  # rate_limit_unavailable
        ready = a.ready()
        assert ready.status_code == 503
        assert ready.json()["checks"]["overrides"]["ok"] is False
        assert a.add_override("deny", {"key_id": "key-user"}, reason="x").status_code == 503
        redis_server.start()
        # The limiter learns that Redis is back from a limited Check; the overrides from
        # the fleet's own loop.
        _within(lambda: a.check(e2e.keys["limited"]) == [200] and a.ready().status_code == 200, 5.0)
        assert a.ready().json()["checks"]["overrides"]["ok"] is True
