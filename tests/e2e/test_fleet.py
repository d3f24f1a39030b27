"""A fleet behaves like one authz: two replicas, each with its own OPA (the Kubernetes
sidecar layout), one Redis, behind one Envoy (tests/helpers/fleet.py). Overrides granted
or deleted on one replica reach the other within one second, cached decisions do not
outlive them, a replica started later enforces them from its first request, and a Redis
outage follows the configured failure mode for overrides and rate limits."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.helpers.e2e import Env
from tests.helpers.fleet import Fleet, Replica, running_fleet
from tests.helpers.postgres_server import PostgresServer
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


# -- the whole fleet: Redis and PostgreSQL together (issue #16) ---------------------------


def _audit_rows(url: str, kind: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT replica, count(*) FROM audit WHERE kind = %s GROUP BY replica", (kind,)
        ).fetchall()
    return {str(replica): int(count) for replica, count in rows}


def _through_envoy(fleet: Fleet, api_key: str, n: int, path: str = "/api/v1/status") -> list[int]:
    assert fleet.gateway is not None
    return [fleet.gateway.get(path, headers={"x-api-key": api_key}).status_code for _ in range(n)]


def test_a_fleet_on_redis_and_postgresql_behind_one_envoy_acts_as_one_authz(
    e2e: Env,
    tmp_path: Path,
    redis_server: RedisServer,
    own_postgres: PostgresServer,
    envoy_bin: str,
    opa_bin: str,
) -> None:
    """Two replicas (each with its own OPA), one Redis, one PostgreSQL, one Envoy: overrides
    cross replicas within a second (allow, deny over a cached allow, delete), both audit
    chains verify in PostgreSQL, a PostgreSQL outage fails no request and leaves a gap
    entry per chain, and a Redis outage keeps the last known overrides while refusing
    changes (AUTHZ_REDIS_FAILURE_MODE=fallback)."""
    url = own_postgres.database()
    env = {
        "AUTHZ_REDIS_URL": redis_server.url,
        "AUTHZ_RATE_LIMIT_BACKEND": "redis",
        "AUTHZ_REDIS_TIMEOUT_MS": "500",
        "AUTHZ_AUDIT_URL": url,
        # Generous: this checks the fleet, not OPA's latency on a loaded CI machine.
        "AUTHZ_DECISION_TIMEOUT_MS": "5000",
    }
    replica_env = [{"AUTHZ_REPLICA_ID": "replica-a"}, {"AUTHZ_REPLICA_ID": "replica-b"}]
    admin, user, viewer = e2e.keys["admin"], e2e.keys["user"], e2e.keys["viewer"]
    with running_fleet(
        e2e, tmp_path, envoy_bin, opa_bin, env=env, replica_env=replica_env
    ) as fleet:
        a, b = fleet.replicas
        # An allow granted on A lets a request through B within a second.
        assert b.check(user, ADMIN_REPORTS) == [403]
        allow = a.add_override(
            "allow", {"key_id": "key-user", "path": ADMIN_REPORTS}, reason="INC-9 on-call"
        )
        assert allow.status_code == 201, allow.text
        _within(lambda: b.check(user, ADMIN_REPORTS) == [200])
        # A deny granted on B blocks what A had cached; a delete on A restores B.
        assert a.check(viewer, n=2) == [200, 200]  # now in A's decision cache
        deny = b.add_override("deny", {"key_id": "key-viewer"}, reason="key leaked")
        assert deny.status_code == 201, deny.text
        _within(lambda: a.check(viewer) == [403])
        assert a.admin.delete(f"/v1/overrides/{deny.json()['id']}").status_code == 200
        _within(lambda: b.check(viewer) == [200])
        assert set(_through_envoy(fleet, admin, 10)) == {200}

        # PostgreSQL stops: no request fails; each chain gets a gap entry once it is back.
        _within(lambda: set(_audit_rows(url, "decision")) == {"replica-a", "replica-b"}, 30.0)
        own_postgres.stop()
        during = _through_envoy(fleet, admin, 20)
        _within(lambda: a.metric("authz_audit_degraded") == 1, 30.0)
        _within(lambda: b.metric("authz_audit_degraded") == 1, 30.0)
        during += _through_envoy(fleet, admin, 20)
        assert during == [200] * 40
        own_postgres.start()
        _within(lambda: _audit_rows(url, "gap") == {"replica-a": 1, "replica-b": 1}, 30.0)

        # Redis stops: the last known overrides hold, changes are refused, requests served.
        held = a.add_override("deny", {"key_id": "key-viewer"}, reason="again")
        assert held.status_code == 201, held.text
        _within(lambda: b.check(viewer) == [403])
        redis_server.stop()
        for replica in (a, b):
            _within(functools.partial(_sees_redis_down, replica), 5.0)
            assert replica.check(viewer) == [403]
            refused = replica.add_override("deny", {"key_id": "key-user"}, reason="outage")
            assert refused.status_code == 503
            assert refused.json()["error"] == "overrides_unavailable"
        assert set(_through_envoy(fleet, admin, 10)) == {200}
        redis_server.start()

    verified = subprocess.run(
        [sys.executable, "-m", "authz", "audit", "verify"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "AUTHZ_AUDIT_URL": url},
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    lines = verified.stdout.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("ok: ") for line in lines), lines
    assert {"replica replica-a", "replica replica-b"} == {
        line.split(":")[1].strip() for line in lines
    }
