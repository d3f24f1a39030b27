"""authz.runtime.audit.postgres: the fleet audit store on a real PostgreSQL (a throwaway
cluster from the machine's packages). Each replica's chain verifies, interleaved with
others; a tampered row is named with its replica and row; retention and the byte bound
prune with recorded anchor moves; a database outage degrades to log-only and leaves a
gap entry after it returns; hostile values stay bounded; the password never shows."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from authz.core.errors import ConfigError, StartupError
from authz.core.secret import MASK, Secret
from authz.runtime import config
from authz.runtime.audit import AuditTrail, VerifyReport, entry_hash, verify
from authz.runtime.audit import store as audit_store
from authz.runtime.audit.postgres import (
    INDEXED_MAX_CHARS,
    ROW_OVERHEAD_BYTES,
    PostgresChain,
    PostgresStorage,
    mask_url,
    open_reader,
    read_entries,
    read_last_seen,
    replicas,
)
from authz.runtime.server import build_runtime
from authz.tools.launch import free_port
from tests.helpers import key_health
from tests.helpers.fakes import ManualClock
from tests.helpers.postgres_server import PostgresServer
from tests.unit.runtime.test_audit import T0, decision, wait_until

TrailFactory = Callable[..., AuditTrail]
DAY_S = 86400.0


@pytest.fixture(autouse=True)
def quick_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer batches for 0.2 s in production; tests need not wait that long."""
    monkeypatch.setattr(audit_store, "_FLUSH_S", 0.02)


@pytest.fixture
def trails(postgres_url: str) -> Iterator[TrailFactory]:
    """Opens AuditTrails on replicas of one new database; closes every one at the end."""
    opened: list[AuditTrail] = []

    def factory(replica: str = "rep-a", url: str = postgres_url, **kwargs: Any) -> AuditTrail:
        max_bytes = kwargs.pop("max_bytes", None)
        kwargs.setdefault("retention_days", None)
        storage = PostgresStorage(Secret(url), replica, max_bytes=max_bytes)
        trail = AuditTrail(storage, **kwargs)
        opened.append(trail)
        return trail

    yield factory
    for trail in opened:
        trail.close()


def chain_reports(url: str) -> dict[str, VerifyReport]:
    with open_reader(Secret(url)) as conn:
        return {name: verify(PostgresChain(conn, name)) for name in replicas(conn)}


def fill(trail: AuditTrail, numbers: range) -> None:
    before = trail.written
    for n in numbers:
        trail.record(decision(n))
    wait_until(lambda: trail.written >= before + len(numbers), f"{len(numbers)} written")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authz", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


# --- chains ----------------------------------------------------------------------------


def test_two_replicas_interleaved_each_chain_verifies(
    trails: TrailFactory, postgres_url: str
) -> None:
    a, b = trails("rep-a"), trails("rep-b")
    for n in range(1, 41):
        (a if n % 3 else b).record(decision(n))
        if n % 7 == 0:
            a.admin("set_mode", {"mode": "dry-run"}, f"adm-{n}")
    wait_until(lambda: a.written + b.written >= 45, "every entry written")
    reports = chain_reports(postgres_url)
    assert sorted(reports) == ["rep-a", "rep-b"]
    assert all(r.ok for r in reports.values()), reports
    assert (reports["rep-a"].entries, reports["rep-b"].entries) == (32, 13)
    assert {r.replica for r in reports.values()} == {"rep-a", "rep-b"}
    with open_reader(Secret(postgres_url)) as conn:
        entries = list(read_entries(conn))
        last = list(read_entries(conn, last=3, kind="decision"))
    # One timeline across chains (by time), each entry naming its chain.
    assert [e.time for e in entries] == sorted(e.time for e in entries)
    assert {e.replica for e in entries} == {"rep-a", "rep-b"}
    assert [e.decision_id for e in last] == ["d-38", "d-39", "d-40"]
    # The documented formula: the replica first, then the SQLite chain's fields.
    row = entries[0]
    body = orjson.dumps(dict(row.body), option=orjson.OPT_SORT_KEYS).decode()
    assert row.hash == entry_hash(
        row.seq, row.prev_hash, row.kind, row.time, row.decision_id, body, replica=row.replica
    )


def test_two_writers_with_one_replica_id_keep_one_chain(
    trails: TrailFactory, postgres_url: str
) -> None:
    first, second = trails("same"), trails("same")
    for i in range(6):
        trail = first if i % 2 == 0 else second
        trail.admin("noop", {"i": i}, entry_id=f"a{i}")
        wait_until(lambda: trail.written >= i // 2 + 1, "written")  # noqa: B023
    report = chain_reports(postgres_url)["same"]
    assert (report.ok, report.entries) == (True, 6), report


def test_replicas_starting_together_migrate_the_schema_once(postgres_url: str) -> None:
    errors: list[BaseException] = []
    storages: list[PostgresStorage] = []
    lock = threading.Lock()

    def start(i: int) -> None:
        try:
            storage = PostgresStorage(Secret(postgres_url), f"r{i}")
            with lock:
                storages.append(storage)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for storage in storages:
        storage.close()
    assert errors == []
    with psycopg.connect(postgres_url) as conn:
        versions = conn.execute("SELECT version FROM audit_schema").fetchall()
        indexes = {
            r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename='audit'")
        }
    assert versions == [(1,)]
    assert {
        "audit_time",
        "audit_replica_time",
        "audit_key_id",
        "audit_sandbox_id",
        "audit_decision_id",
    } <= indexes


# --- tampering -------------------------------------------------------------------------

TAMPERING = {
    "edited-body": (
        "UPDATE audit SET body = replace(body, 'deny', 'allow') "
        "WHERE replica = 'rep-b' AND seq = 3",
        3,
        "edited",
    ),
    "edited-time": (
        "UPDATE audit SET time = time + 1 WHERE replica = 'rep-b' AND seq = 3",
        3,
        "edited",
    ),
    "edited-key-id-column": (
        "UPDATE audit SET key_id = 'key-admin' WHERE replica = 'rep-b' AND seq = 3",
        3,
        "indexed columns",
    ),
    "deleted-row": ("DELETE FROM audit WHERE replica = 'rep-b' AND seq = 3", 4, "missing"),
    "row-moved-to-another-replica": (
        "UPDATE audit SET replica = 'rep-b', seq = 100 WHERE replica = 'rep-a' AND seq = 2",
        100,
        "",
    ),
    "deleted-tail": (
        "DELETE FROM audit WHERE replica = 'rep-b' AND seq = 5",
        5,
        "removed from the end",
    ),
}


@pytest.mark.parametrize(("sql", "seq", "problem"), TAMPERING.values(), ids=TAMPERING.keys())
def test_tampered_row_is_named_with_its_replica_and_row(
    trails: TrailFactory, postgres_url: str, sql: str, seq: int, problem: str
) -> None:
    a, b = trails("rep-a"), trails("rep-b")
    fill(a, range(1, 6))
    fill(b, range(11, 16))
    assert all(r.ok for r in chain_reports(postgres_url).values())
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert conn.execute(sql).rowcount == 1
    reports = chain_reports(postgres_url)
    assert not reports["rep-b"].ok
    assert reports["rep-b"].broken_seq == seq, reports["rep-b"]
    assert problem in (reports["rep-b"].problem or "")
    # The command line names the replica and the row; exit 1.
    result = cli("audit", "verify", "--url", postgres_url)
    assert result.returncode == 1, result
    assert f"BROKEN in replica rep-b at entry {seq}" in result.stderr


def test_a_chain_relabelled_as_another_replica_breaks_at_its_first_row(
    trails: TrailFactory, postgres_url: str
) -> None:
    fill(trails("rep-a"), range(1, 4))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE audit SET replica = 'rep-z' WHERE replica = 'rep-a'")
        conn.execute("UPDATE audit_meta SET replica = 'rep-z' WHERE replica = 'rep-a'")
    report = chain_reports(postgres_url)["rep-z"]
    assert (report.ok, report.broken_seq) == (False, 1), report


def test_cli_verifies_every_chain_and_tails_across_them(
    trails: TrailFactory, postgres_url: str, tmp_path: Path
) -> None:
    a, b = trails("rep-a"), trails("rep-b")
    fill(a, range(1, 4))
    fill(b, range(4, 6))
    url_file = tmp_path / "audit-url"
    url_file.write_text(postgres_url + "\n")
    env = {**os.environ, "AUTHZ_AUDIT_URL_FILE": str(url_file)}
    env.pop("AUTHZ_AUDIT_URL", None)
    verified = cli("audit", "verify", env=env)
    assert verified.returncode == 0, verified
    assert verified.stdout.splitlines() == [
        "ok: replica rep-a: 3 entries, chain intact (entries 1..3)",
        "ok: replica rep-b: 2 entries, chain intact (entries 1..2)",
    ]
    tail = cli("audit", "tail", "--limit", "2", env=env)
    assert tail.returncode == 0, tail
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [(x["replica"], x["seq"], x["decision_id"]) for x in lines] == [
        ("rep-b", 1, "d-4"),
        ("rep-b", 2, "d-5"),
    ]
    head = f"{a._seq}:{a._hash}"
    assert cli("audit", "verify", "--head", head, env=env).returncode == 2  # which chain?
    by_head = cli("audit", "verify", "--replica", "rep-a", "--head", head, env=env)
    assert by_head.returncode == 0, by_head
    wrong = cli("audit", "verify", "--replica", "rep-b", "--head", head, env=env)
    assert wrong.returncode == 1, wrong


# --- retention -------------------------------------------------------------------------


def test_max_records_prunes_each_chain_and_it_still_verifies(
    trails: TrailFactory, postgres_url: str
) -> None:
    clock = ManualClock(T0)
    a = trails("rep-a", max_records=5, clock=clock)
    b = trails("rep-b", max_records=5, clock=clock)
    fill(a, range(1, 13))
    fill(b, range(1, 4))
    before = a.prunes
    clock.now += 61
    wait_until(lambda: a.prunes > before, "a pruning pass")
    with open_reader(Secret(postgres_url)) as conn:
        # In chain order: a pruning pass may run before the clock moves (the anchor entry
        # then has the oldest time).
        entries = sorted(read_entries(conn), key=lambda e: e.seq)
    kept_a = [e for e in entries if e.replica == "rep-a"]
    kept_b = [e for e in entries if e.replica == "rep-b"]
    assert len(kept_a) == 5
    assert kept_a[-1].kind == "anchor"
    assert len(kept_b) == 3  # another replica's chain is not this one's to prune
    reports = chain_reports(postgres_url)
    assert all(r.ok for r in reports.values()), reports


def test_retention_days_prunes_old_entries(trails: TrailFactory, postgres_url: str) -> None:
    clock = ManualClock(T0 + 10 * 86400)
    trail = trails("rep-a", retention_days=1.0, clock=clock)
    fill(trail, range(1, 6))  # recorded at T0 + n: ten days old
    before = trail.prunes
    clock.now += 61
    wait_until(lambda: trail.prunes > before, "a pruning pass")
    with open_reader(Secret(postgres_url)) as conn:
        kinds = [e.kind for e in read_entries(conn)]
    assert kinds == ["anchor"]
    assert chain_reports(postgres_url)["rep-a"].ok


def test_byte_bound_prunes_the_replicas_rows(trails: TrailFactory, postgres_url: str) -> None:
    limit = 1024 * 1024
    trail = trails("rep-a", max_bytes=limit)
    reason = "a" * 3000  # cut to AUTHZ_AUDIT_VALUE_MAX_BYTES: rows of about 2 KB
    for round_ in range(4):  # 800 rows: more than the bound holds
        for n in range(200):
            trail.record(decision(round_ * 200 + n, reason=reason))
        target = (round_ + 1) * 200
        wait_until(lambda: trail.written >= target, "a round written")  # noqa: B023
    with psycopg.connect(postgres_url) as conn:
        [(counted,)] = conn.execute(
            "SELECT value::bigint FROM audit_meta WHERE replica = 'rep-a' AND key = 'bytes'"
        ).fetchall()
        [(stored, rows)] = conn.execute(
            "SELECT sum(octet_length(body) + octet_length(decision_id)), count(*) FROM audit"
        ).fetchall()
    assert counted <= limit
    # The running count matches the rows (ROW_OVERHEAD_BYTES each beyond body and id).
    assert counted == stored + rows * ROW_OVERHEAD_BYTES
    assert rows < 800
    assert chain_reports(postgres_url)["rep-a"].ok


# --- outage ----------------------------------------------------------------------------


def test_database_down_degrades_to_log_only_then_a_gap_entry(
    own_postgres: PostgresServer, trails: TrailFactory, caplog: pytest.LogCaptureFixture
) -> None:
    url = own_postgres.database()
    states: list[tuple[bool, int, int]] = []
    trail = trails("rep-a", url=url, on_state=lambda *s: states.append(s))
    fill(trail, range(1, 3))
    own_postgres.stop()
    for n in range(3, 8):
        started = time.monotonic()
        trail.record(decision(n))  # never raises, never waits for the database
        assert time.monotonic() - started < 1.0
    wait_until(lambda: trail.degraded and trail.failed == 5, "degraded", timeout_s=20)
    own_postgres.start()
    wait_until(lambda: not trail.degraded, "recovered", timeout_s=20)
    fill(trail, range(8, 9))
    with open_reader(Secret(url)) as conn:
        # In chain order (read_entries orders by time: the gap is stamped now, the
        # decisions at their fixed times).
        entries = sorted(read_entries(conn), key=lambda e: e.seq)
    assert [(e.kind, e.decision_id) for e in entries] == [
        ("decision", "d-1"),
        ("decision", "d-2"),
        ("gap", ""),
        ("decision", "d-8"),
    ]
    assert entries[2].body["lost"] == 5
    assert chain_reports(url)["rep-a"].ok
    assert (True, 2, 5) in states
    assert own_postgres.password not in caplog.text


def test_unreachable_database_at_start_is_a_config_error_with_the_password_masked(
    postgres_cluster: PostgresServer,
) -> None:
    url = postgres_cluster.url_for("postgres").replace(
        f":{postgres_cluster.port}/", ":1/"
    )  # nothing listens on port 1
    with pytest.raises(ConfigError) as caught:
        PostgresStorage(Secret(url), "rep-a")
    assert postgres_cluster.password not in str(caught.value)
    assert MASK in str(caught.value)


# --- hostile values and secrets ----------------------------------------------------------


def test_hostile_values_are_stored_bounded_and_the_chain_verifies(
    trails: TrailFactory, postgres_url: str
) -> None:
    trail = trails("rep-a")
    hostile = [
        decision(1, identity={"key_id": "k\x00nul", "sandbox_id": "s" * 10_000}),
        decision(2, decision_id="d-\x00-nul", reason="\x00" * 100),
        decision(3, identity={"key_id": "k" * INDEXED_MAX_CHARS, "sandbox_id": "sb-1"}),
        decision(4, identity={"key_id": ["not", "a", "string"]}),
        decision(5, path="/" + "\U0001f600" * 5000),
    ]
    for record in hostile:
        trail.record(record)
    trail.admin("add_override", {"id": "ovr\x00", "actor": "x" * 100_000}, "ovr\x00")
    wait_until(lambda: trail.written >= 6, "every entry written")
    assert (trail.degraded, trail.failed) == (False, 0)
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute(
            "SELECT seq, decision_id, key_id, sandbox_id, octet_length(body) FROM audit "
            "ORDER BY seq"
        ).fetchall()
    assert [(r[0], r[1], r[2], r[3]) for r in rows[:4]] == [
        (1, "d-1", None, None),  # a NUL, an over-long id: not indexed, still hashed in the body
        (2, "d-\ufffd-nul", "key-viewer", None),
        (3, "d-3", "k" * INDEXED_MAX_CHARS, "sb-1"),
        (4, "d-4", None, None),
    ]
    assert max(r[4] for r in rows[:5]) <= config.DEFAULT_AUDIT_ROW_MAX_BYTES
    assert chain_reports(postgres_url)["rep-a"].ok


def test_the_password_never_shows(
    postgres_cluster: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = postgres_cluster.password
    caplog.set_level(logging.DEBUG)
    url_file = tmp_path / "url"
    url_file.write_text(postgres_url)
    settings = config.load({"AUTHZ_AUDIT_URL_FILE": str(url_file), "AUTHZ_REPLICA_ID": "r1"})
    assert settings.audit_url is not None
    assert settings.audit_url.reveal() == postgres_url
    storage = PostgresStorage(settings.audit_url, settings.replica_id)
    trail = AuditTrail(storage, retention_days=None)
    fill(trail, range(1, 3))
    trail.close()  # logs the head, naming the store
    shown = [repr(settings), str(settings), repr(storage), storage.label, trail.label]
    assert all(password not in text for text in shown)
    assert mask_url(postgres_url) == trail.label
    assert f"authz:{MASK}@127.0.0.1:{postgres_cluster.port}/" in trail.label
    assert "audit head" in caplog.text
    assert password not in caplog.text
    check = cli("config", "check", env={**os.environ, "AUTHZ_AUDIT_URL_FILE": str(url_file)})
    assert check.returncode == 0, check
    assert password not in check.stdout + check.stderr


# --- key hygiene over the fleet -----------------------------------------------------------


def test_keys_health_reads_every_replicas_last_use_from_postgres(
    trails: TrailFactory, postgres_url: str, tmp_path: Path
) -> None:
    a, b = trails("rep-a"), trails("rep-b")
    a.record(key_health.decision("key-a", key_health.NOW - 40 * DAY_S))
    b.record(key_health.decision("key-a", key_health.NOW - 2 * DAY_S))  # the newest wins
    b.record(key_health.decision("key-b", key_health.NOW - 40 * DAY_S))
    a.admin("override_added", {"key_id": "key-c"}, "o-1")  # not a decision by key-c
    wait_until(lambda: a.written + b.written >= 4, "every entry written")
    with open_reader(Secret(postgres_url)) as conn:
        assert read_last_seen(conn) == {
            "key-a": key_health.NOW - 2 * DAY_S,
            "key-b": key_health.NOW - 40 * DAY_S,
        }
    bundle = key_health.write_bundle(
        tmp_path / "authz.tar.gz",
        {
            "/gateway/api_keys/data.json": {
                key_health.digest(k): key_health.entry(k) for k in ("key-a", "key-b", "key-c")
            }
        },
    )
    env = {**os.environ, "AUTHZ_AUDIT_URL": postgres_url}
    args = ("keys", "health", "--bundle", str(bundle), "--now", key_health.iso(key_health.NOW))
    result = cli(*args, "--audit-url", "env", "--json", env=env)
    assert result.returncode == 1, result  # two keys unused: action needed
    statuses = {k["id"]: k["status"] for k in json.loads(result.stdout)["keys"]}
    assert statuses == {"key-a": "ok", "key-b": "unused", "key-c": "unused"}
    assert postgres_url not in result.stdout + result.stderr


# --- wiring ------------------------------------------------------------------------------


async def test_authz_does_not_start_when_its_audit_database_is_unreachable(
    postgres_cluster: PostgresServer, tmp_path: Path
) -> None:
    # Port 1: nothing listens. An authz that cannot audit does not start; the error names
    # the database with its password masked.
    url = postgres_cluster.url_for("postgres").replace(f":{postgres_cluster.port}/", ":1/")
    settings = config.load(
        {
            "AUTHZ_AUDIT_URL": url,
            "AUTHZ_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
            "AUTHZ_OVERRIDES_FILE": str(tmp_path / "overrides.json"),
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        with pytest.raises(StartupError) as caught:
            await build_runtime(settings, stack)
    assert "audit database 'postgresql://authz:**********@127.0.0.1:1/postgres'" in str(
        caught.value
    )
    assert postgres_cluster.password not in str(caught.value)


def test_nightly_audit_checks_a_postgresql_store_from_the_environment(
    trails: TrailFactory, postgres_url: str, tmp_path: Path, repo_root: Path
) -> None:
    """scripts/nightly-audit with AUTHZ_AUDIT_URL set (no --audit): both checks read the
    PostgreSQL store (every replica's chain, every replica's last use), and the URL, which
    holds a password, is on no command line and in no output."""
    a, b = trails("rep-a"), trails("rep-b")
    a.record(key_health.decision("key-a", time.time() - DAY_S))
    b.record(key_health.decision("key-b", time.time() - DAY_S))
    wait_until(lambda: a.written + b.written >= 2, "every entry written")
    bundle = key_health.write_bundle(
        tmp_path / "authz.tar.gz",
        {
            "/gateway/api_keys/data.json": {
                key_health.digest(k): key_health.entry(k) for k in ("key-a", "key-b")
            }
        },
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")}
    if "AUTHZ_VENV" in os.environ:
        environ["AUTHZ_VENV"] = os.environ["AUTHZ_VENV"]
    environ["AUTHZ_AUDIT_URL"] = postgres_url
    result = subprocess.run(
        [str(repo_root / "scripts/nightly-audit"), "--bundle", str(bundle)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    assert "== audit trail PostgreSQL (AUTHZ_AUDIT_URL): exit 0" in result.stdout
    assert "replica rep-a" in result.stdout
    assert "replica rep-b" in result.stdout
    assert result.stdout.rstrip().endswith("no action needed")
    assert postgres_url not in result.stdout
