"""The fleet audit store end to end: two authz processes (two replicas) write their own
hash chains into one PostgreSQL; ``authz audit verify`` verifies both; PostgreSQL stopped
mid-traffic fails no request, and each chain has a gap entry once it is back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.helpers.e2e import Env, authz_processes, check_all
from tests.helpers.postgres_server import PostgresServer

pytestmark = pytest.mark.e2e

REPLICAS = ("replica-a", "replica-b")


def wait_for(
    predicate: Callable[[], bool],
    what: str,
    timeout_s: float = 30.0,
    state: Callable[[], object] = lambda: None,
) -> None:
    """Poll ``predicate`` until true; after ``timeout_s`` fail naming ``what`` and ``state()``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}: {state()}")
        time.sleep(0.2)


def rows_by_replica(url: str, kind: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT replica, count(*) FROM audit WHERE kind = %s GROUP BY replica", (kind,)
        ).fetchall()
    return {str(replica): int(count) for replica, count in rows}


def accounted(url: str) -> dict[str, int]:
    """Per replica: decisions stored plus decisions counted lost in gap entries."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT replica, sum(CASE WHEN kind = 'decision' THEN 1 "
            "WHEN kind = 'gap' THEN (body::jsonb ->> 'lost')::int ELSE 0 END) "
            "FROM audit GROUP BY replica"
        ).fetchall()
    return {str(replica): int(count) for replica, count in rows}


def audit_degraded(admin_port: int) -> bool:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).text
    return "authz_audit_degraded 1.0" in text


def authz_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTHZ_AUDIT_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "authz", "audit", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_two_replicas_chains_verify_and_a_postgres_outage_fails_no_request(
    e2e: Env, tmp_path: Path, own_postgres: PostgresServer
) -> None:
    url = own_postgres.database()
    key = e2e.keys["admin"]  # premium: no rate limit in the way
    dirs = [tmp_path / name for name in REPLICAS]
    for directory in dirs:
        directory.mkdir()
    # A generous decision budget: this measures the audit store, not OPA under a loaded CI.
    env = [
        {"AUTHZ_AUDIT_URL": url, "AUTHZ_REPLICA_ID": name, "AUTHZ_DECISION_TIMEOUT_MS": "5000"}
        for name in REPLICAS
    ]
    with (
        authz_processes(e2e, dirs[0], 1, env[0]) as [(grpc_a, admin_a)],
        authz_processes(e2e, dirs[1], 1, env[1]) as [(grpc_b, admin_b)],
    ):
        grpc_ports = [grpc_a, grpc_b]
        assert check_all(grpc_ports, key, 20) == [200] * 20
        wait_for(
            lambda: rows_by_replica(url, "decision") == dict.fromkeys(REPLICAS, 10),
            "both replicas' decisions in PostgreSQL",
        )

        own_postgres.stop()
        during = check_all(grpc_ports, key, 20)
        wait_for(lambda: audit_degraded(admin_a) and audit_degraded(admin_b), "degraded")
        during += check_all(grpc_ports, key, 20)
        assert during == [200] * 40  # no request failed while the audit store was down

        own_postgres.start()
        wait_for(
            lambda: rows_by_replica(url, "gap") == dict.fromkeys(REPLICAS, 1),
            "a gap entry in each chain",
        )
        assert check_all(grpc_ports, key, 10) == [200] * 10
        wait_for(lambda: not audit_degraded(admin_a) and not audit_degraded(admin_b), "recovered")
        # 35 decisions per replica (10 before, 20 during, 5 after): each one is stored or
        # counted in the gap entry. Entries still queued when PostgreSQL came back are
        # written, not lost: the queue bridges a short outage.
        wait_for(
            lambda: accounted(url) == dict.fromkeys(REPLICAS, 35),
            "every decision stored or counted lost",
            state=lambda: (rows_by_replica(url, "decision"), accounted(url)),
        )

    verified = authz_cli(url, "verify")
    assert verified.returncode == 0, verified
    lines = verified.stdout.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [f"replica {n}" for n in REPLICAS]
    assert all(line.startswith("ok: ") for line in lines)
    gaps = authz_cli(url, "tail", "--kind", "gap")
    assert gaps.returncode == 0, gaps
    entries = [json.loads(line) for line in gaps.stdout.splitlines()]
    assert sorted(e["replica"] for e in entries) == list(REPLICAS)
    # At least the first decisions made while PostgreSQL was down were lost (a write
    # failed: that is what degraded each replica), and the gap says when.
    assert all(e["lost"] >= 1 and e["since"] <= e["until"] for e in entries), entries
