"""authz.runtime.audit: the hash-chained SQLite audit trail (write, read back, verify, tamper,
retention, degradation and recovery); under hostile callers, an owner-only file, a
writer that drains a backlog without sleeping, bounded in bytes (queue, rows, store),
anchor moves recorded and checked; integrity of every column a reader trusts."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import sqlite3
import stat
import string
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import pytest

from authz.core.authorizer import Authorizer
from authz.core.errors import ConfigError
from authz.core.input import build_input
from authz.core.record import DecisionRecord
from authz.core.secret import MASK
from authz.runtime import audit, config
from authz.runtime.audit import GENESIS, AuditTrail, entry_hash, read_entries, verify
from authz.runtime.audit import projection as projection_module
from authz.runtime.audit import store as audit_store
from authz.tools.cli import main
from tests.helpers.fakes import FakeEngine, ManualClock, bytes_retained_per_check, check_request

T0 = 1_700_000_000.0
SECRET = "SECRET"
DIGEST = "d" * 64
DEADLINE_S = 5.0


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    """Poll ``predicate`` (the writer flushes every 0.2 s) until true or fail."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def reader(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain second connection, as the CLI tools and an attacker would open."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def count_rows(path: Path) -> int:
    with reader(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0])


def secret_document() -> dict[str, Any]:
    """An input document carrying SECRET in every place redaction must cover."""
    target = f"/x?api_key={SECRET}&page=2"
    return {
        "attributes": {
            "request": {
                "http": {
                    "method": "GET",
                    "path": target,
                    "headers": {
                        ":path": target,
                        "cookie": f"session={SECRET}",
                        "x-api-key": f"sha256:{DIGEST}",
                        "x-request-id": "req-1",
                    },
                }
            }
        },
        "parsed_path": ["x"],
        "parsed_query": {"api_key": [SECRET], "page": ["2"]},
        "credentials": {"x-api-key": DIGEST},
    }


def projected_secret_document() -> dict[str, Any]:
    """What a row keeps of :func:`secret_document` (README "Audit trail"): allow-listed
    headers only (the others counted), sensitive query values masked, digests kept."""
    sent = secret_document()["attributes"]["request"]["http"]["headers"]
    omitted = [name for name in sent if name != "x-request-id"]
    return {
        "attributes": {
            "request": {
                "http": {
                    "method": "GET",
                    "path": f"/x?api_key={MASK}&page=2",
                    "headers": {"x-request-id": "req-1"},
                }
            }
        },
        "parsed_path": ["x"],
        "parsed_query": {"api_key": [MASK], "page": ["2"]},
        "credentials": {"x-api-key": DIGEST},
        "headers_omitted": {
            "count": len(omitted),
            "bytes": sum(len(name) + len(sent[name]) for name in omitted),
        },
    }


def decision(n: int, **fields: Any) -> DecisionRecord:
    """Decision number ``n``: id ``d-<n>``, recorded at T0 + n."""
    values: dict[str, Any] = {
        "decision_id": f"d-{n}",
        "timestamp": T0 + n,
        "decision_path": "authz/gateway/decision",
        "allowed": False,
        "reason": "role_not_allowed",
        "http_status": 403,
        "policy_allowed": False,
        "policy_reason": "role_not_allowed",
        "revision": "rev-1",
        "identity": {"key_id": "key-viewer", "role": "viewer"},
        "method": "GET",
        "path": "/x",
        "duration_s": 0.002,
    }
    values.update(fields)
    return DecisionRecord(**values)


TrailFactory = Callable[..., AuditTrail]


@pytest.fixture(autouse=True)
def quick_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer batches for 0.2 s in production; tests need not wait that long."""
    monkeypatch.setattr(audit_store, "_FLUSH_S", 0.02)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def trail_factory(db: Path, clock: ManualClock) -> Iterator[TrailFactory]:
    """Opens AuditTrails on ``db`` with the fake clock; closes every one at the end."""
    opened: list[AuditTrail] = []

    def factory(**kwargs: Any) -> AuditTrail:
        kwargs.setdefault("clock", clock)
        trail = AuditTrail(kwargs.pop("path", db), **kwargs)
        opened.append(trail)
        return trail

    yield factory
    for trail in opened:
        trail.close()


def fill(trail: AuditTrail, db: Path, count: int, start: int = 1) -> None:
    """Record decisions ``start..start+count-1`` and wait until they are stored."""
    before = trail.written
    for n in range(start, start + count):
        trail.record(decision(n))
    wait_until(lambda: trail.written >= before + count, f"{count} entries written")


# --- writing and reading back ------------------------------------------------------------


def test_entries_are_chained_in_seq_order(
    trail_factory: TrailFactory, db: Path, clock: ManualClock
) -> None:
    states: list[tuple[bool, int, int]] = []
    trail = trail_factory(on_state=lambda *state: states.append(state))
    trail.record(decision(1))
    trail.admin("set_mode", {"mode": "dry-run", "reason": "rollout"}, "adm-1")
    trail.record(decision(2))
    trail.close()

    with reader(db) as conn:
        entries = list(read_entries(conn))
    assert [(e.seq, e.kind, e.decision_id) for e in entries] == [
        (1, "decision", "d-1"),
        (2, "admin", "adm-1"),
        (3, "decision", "d-2"),
    ]
    assert [e.time for e in entries] == [T0 + 1, clock.now, T0 + 2]
    assert GENESIS == "0" * 64
    prev = GENESIS
    for entry in entries:
        assert entry.prev_hash == prev
        body = orjson.dumps(dict(entry.body), option=orjson.OPT_SORT_KEYS).decode()
        # The documented formula, so an external verifier can recompute the chain.
        text = f"{entry.seq}\n{prev}\n{entry.kind}\n{entry.time!r}\n{entry.decision_id}\n{body}"
        expected = hashlib.sha256(text.encode()).hexdigest()
        assert entry.hash == expected
        assert expected == entry_hash(
            entry.seq, prev, entry.kind, entry.time, entry.decision_id, body
        )
        prev = entry.hash
    assert trail.written == 3
    assert (trail.degraded, trail.failed) == (False, 0)
    assert states
    assert states[-1] == (False, 3, 0)


def test_admin_entry_body(trail_factory: TrailFactory, db: Path, clock: ManualClock) -> None:
    clock.now = T0 + 42
    trail = trail_factory()
    trail.admin("add_override", {"id": "ovr-1", "actor": "alice", "pushed": True}, "ovr-1")
    trail.close()
    with reader(db) as conn:
        [entry] = read_entries(conn)
    assert (entry.kind, entry.time, entry.decision_id) == ("admin", T0 + 42, "ovr-1")
    assert entry.body == {"action": "add_override", "id": "ovr-1", "actor": "alice", "pushed": True}


@pytest.mark.parametrize(
    ("last", "kind", "seqs"),
    [
        (None, None, [1, 2, 3, 4, 5]),
        (2, None, [4, 5]),
        (1, None, [5]),
        (10, None, [1, 2, 3, 4, 5]),
        (None, "decision", [1, 3, 5]),
        (None, "admin", [2, 4]),
        (1, "admin", [4]),
        (2, "decision", [3, 5]),
        (None, "gap", []),
        (0, None, []),
    ],
    ids=[
        "all",
        "last-2",
        "last-1",
        "last-more-than-stored",
        "decisions",
        "admins",
        "last-admin",
        "last-2-decisions",
        "no-gaps",
        "last-0",
    ],
)
def test_read_entries_last_and_kind(
    trail_factory: TrailFactory, db: Path, last: int | None, kind: str | None, seqs: list[int]
) -> None:
    trail = trail_factory()
    for n in range(1, 6):
        if n % 2:
            trail.record(decision(n))
        else:
            trail.admin("set_mode", {"n": n}, f"adm-{n}")
    trail.close()
    with reader(db) as conn:
        entries = list(read_entries(conn, last=last, kind=kind))
    assert [e.seq for e in entries] == seqs
    assert all(e.kind == ("decision" if e.seq % 2 else "admin") for e in entries)


@pytest.mark.parametrize(
    ("record", "policy", "stores_input"),
    [
        (
            decision(1, document=secret_document()),
            {"allowed": False, "reason": "role_not_allowed"},
            True,
        ),
        (
            decision(
                2,
                allowed=True,
                reason="allowed",
                http_status=200,
                policy_allowed=True,
                policy_reason="allowed",
                tier="default",
                document=secret_document(),
            ),
            {"allowed": True, "reason": "allowed"},
            True,
        ),
        (
            decision(
                3,
                allowed=False,
                reason="opa_unavailable",
                http_status=503,
                policy_allowed=None,
                policy_reason=None,
                error="OPA unreachable",
                document=secret_document(),
            ),
            None,
            True,
        ),
        (
            decision(
                4,
                mode="bypass",
                allowed=True,
                reason="allowed",
                http_status=200,
                policy_allowed=None,
                policy_reason=None,
                document=None,
            ),
            None,
            False,
        ),
    ],
    ids=["policy-deny", "policy-allow", "no-policy-decision", "no-input"],
)
def test_decision_body_is_log_fields_policy_and_redacted_input(
    trail_factory: TrailFactory,
    db: Path,
    record: DecisionRecord,
    policy: dict[str, Any] | None,
    stores_input: bool,
) -> None:
    trail = trail_factory()
    trail.record(record)
    trail.close()
    with reader(db) as conn:
        [entry] = read_entries(conn)
    expected = {**record.log_fields(), "policy": policy}
    if stores_input:
        expected["input"] = projected_secret_document()
    assert entry.body == expected
    assert (entry.decision_id, entry.time) == (record.decision_id, record.timestamp)


def test_secrets_in_query_and_cookie_never_stored(trail_factory: TrailFactory, db: Path) -> None:
    document = secret_document()
    trail = trail_factory()
    trail.record(decision(1, document=document))
    trail.close()

    with reader(db) as conn:
        stored = conn.execute("SELECT * FROM audit").fetchall()
        [entry] = read_entries(conn)
    assert SECRET not in repr(stored)
    for file in db.parent.glob(f"{db.name}*"):  # the database and any WAL left behind
        assert SECRET.encode() not in file.read_bytes(), file.name
    http = entry.body["input"]["attributes"]["request"]["http"]
    assert http["path"] == f"/x?api_key={MASK}&page=2"
    # Not allow-listed: neither the :path copy of the query, nor any credential header.
    assert set(http["headers"]) == {"x-request-id"}
    assert entry.body["input"]["parsed_query"] == {"api_key": [MASK], "page": ["2"]}
    # Digests are kept: replay needs what the policy keyed on.
    assert entry.body["input"]["credentials"] == {"x-api-key": DIGEST}
    # The caller's document is left as it was.
    assert document == secret_document()


def header_map_document(raw: bool) -> dict[str, Any]:
    """Envoy's ``header_map`` form (``encode_raw_headers: true``), which authz.core.input
    supports: the cookie and the ``:path`` (with its query) are in the entries."""
    target = f"/x?api_key={SECRET}"
    pairs = [(":path", target), ("cookie", f"session={SECRET}")]
    entries = [
        {"key": k, "rawValue": base64.b64encode(v.encode()).decode()}
        if raw
        else {"key": k, "value": v}
        for k, v in pairs
    ]
    return {
        "attributes": {
            "request": {"http": {"method": "GET", "path": "/x", "headerMap": {"headers": entries}}}
        }
    }


@pytest.mark.parametrize("raw", [False, True], ids=["value", "raw-value"])
def test_secrets_in_header_map_never_stored(
    trail_factory: TrailFactory, db: Path, raw: bool
) -> None:
    trail = trail_factory()
    trail.record(decision(1, document=header_map_document(raw)))
    trail.close()
    with reader(db) as conn:
        [entry] = read_entries(conn)
    leaked = []
    for item in entry.body["input"]["attributes"]["request"]["http"]["headerMap"]["headers"]:
        value = item.get("value") or base64.b64decode(item.get("rawValue", "")).decode()
        if SECRET in value:
            leaked.append(item["key"])
    assert leaked == []


def test_close_flushes_queued_entries(trail_factory: TrailFactory, db: Path) -> None:
    trail = trail_factory()
    for n in range(1, 1201):  # more than one writer batch
        trail.record(decision(n))
    trail.close()
    assert count_rows(db) == 1200
    assert trail.written == 1200
    with reader(db) as conn:
        assert verify(conn).ok


def test_close_waits_for_a_slow_write(trail_factory: TrailFactory, db: Path) -> None:
    # The disk is busy (another connection holds the lock for less than the writer's busy
    # timeout) when close() is called: close() still returns only once the batch is stored.
    trail = trail_factory()
    locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        for n in range(1, 51):
            trail.record(decision(n))
        release = threading.Timer(0.15, locker.execute, ("ROLLBACK",))
        release.start()
        trail.close()
        release.join()
    finally:
        locker.close()
    assert (trail.degraded, trail.written) == (False, 50)
    assert count_rows(db) == 50


def test_reopened_trail_continues_the_chain(trail_factory: TrailFactory, db: Path) -> None:
    first = trail_factory()
    fill(first, db, 3)
    first.close()
    second = trail_factory()
    second.record(decision(4))
    second.close()
    with reader(db) as conn:
        assert [e.seq for e in read_entries(conn)] == [1, 2, 3, 4]
        report = verify(conn)
    assert (report.ok, report.entries, report.first_seq, report.last_seq) == (True, 4, 1, 4)


# --- verify and tampering ----------------------------------------------------------------


def test_verify_intact_chain(trail_factory: TrailFactory, db: Path) -> None:
    trail = trail_factory()
    fill(trail, db, 5)
    with reader(db) as conn:  # while the writer is still open
        report = verify(conn)
    assert report.ok
    assert (report.entries, report.first_seq, report.last_seq) == (5, 1, 5)
    assert (report.broken_seq, report.problem) == (None, None)


def test_verify_empty_store(trail_factory: TrailFactory, db: Path) -> None:
    trail_factory().close()
    with reader(db) as conn:
        report = verify(conn)
    assert (report.ok, report.entries, report.first_seq, report.last_seq) == (True, 0, None, None)


def forge_row(conn: sqlite3.Connection, seq: int, prev_hash: str, decision_id: str) -> None:
    """Insert a row whose own hash is correct: only the links around it can give it away."""
    body = orjson.dumps({"decision_id": decision_id, "forged": True}).decode()
    conn.execute(
        "INSERT INTO audit (seq, kind, time, decision_id, body, prev_hash, hash) "
        "VALUES (?, 'decision', ?, ?, ?, ?, ?)",
        (
            seq,
            T0,
            decision_id,
            body,
            prev_hash,
            entry_hash(seq, prev_hash, "decision", T0, decision_id, body),
        ),
    )


def hash_of(conn: sqlite3.Connection, seq: int) -> str:
    return str(conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()[0])


def edit_body(conn: sqlite3.Connection) -> None:
    conn.execute("""UPDATE audit SET body = replace(body, '"deny"', '"allow"') WHERE seq = 3""")


def edit_last_body(conn: sqlite3.Connection) -> None:
    conn.execute("""UPDATE audit SET body = replace(body, '"deny"', '"allow"') WHERE seq = 5""")


def delete_middle(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit WHERE seq = 3")


def delete_first(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit WHERE seq = 1")


def delete_last(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit WHERE seq = 5")


def delete_last_two(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit WHERE seq >= 4")


def delete_all(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit")


def swap_rows(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit SET seq = -1 WHERE seq = 2")
    conn.execute("UPDATE audit SET seq = 2 WHERE seq = 3")
    conn.execute("UPDATE audit SET seq = 3 WHERE seq = -1")


def replace_with_forged(conn: sqlite3.Connection) -> None:
    prev = hash_of(conn, 2)
    conn.execute("DELETE FROM audit WHERE seq = 3")
    forge_row(conn, 3, prev, "d-3")


def change_hash(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit SET hash = ? WHERE seq = 3", ("f" * 64,))


def change_prev_hash(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit SET prev_hash = ? WHERE seq = 4", ("f" * 64,))


def change_head(conn: sqlite3.Connection) -> None:
    conn.execute(
        "UPDATE audit_meta SET value = ? WHERE key = 'head'",
        (orjson.dumps({"seq": 5, "hash": "f" * 64}).decode(),),
    )


TAMPER_CASES: list[tuple[str, Callable[[sqlite3.Connection], None], int, str | None, str]] = [
    # (id, tampering, broken seq, broken decision id, fragment of the problem)
    ("edit-body", edit_body, 3, "d-3", "edited"),
    ("edit-last-body", edit_last_body, 5, "d-5", "edited"),
    ("delete-middle", delete_middle, 4, "d-4", "expected entry 3 here"),
    ("delete-first", delete_first, 2, "d-2", "expected entry 1 here"),
    ("delete-last", delete_last, 5, None, "head records entry 5 but the chain ends at 4"),
    ("delete-last-two", delete_last_two, 5, None, "head records entry 5 but the chain ends at 3"),
    ("delete-all", delete_all, 5, None, "head records entry 5"),
    ("reorder", swap_rows, 2, "d-3", "prev_hash does not match"),
    ("forged-row", replace_with_forged, 4, "d-4", "prev_hash does not match"),
    ("change-hash", change_hash, 3, "d-3", "hash does not match the entry's contents"),
    ("change-prev-hash", change_prev_hash, 4, "d-4", "prev_hash does not match"),
    ("change-head", change_head, 5, None, "head records entry 5"),
]


@pytest.mark.parametrize(
    ("tamper", "broken_seq", "broken_id", "problem"),
    [case[1:] for case in TAMPER_CASES],
    ids=[case[0] for case in TAMPER_CASES],
)
def test_verify_reports_tampering_at_the_right_entry(
    trail_factory: TrailFactory,
    db: Path,
    tamper: Callable[[sqlite3.Connection], None],
    broken_seq: int,
    broken_id: str | None,
    problem: str,
) -> None:
    trail = trail_factory()
    fill(trail, db, 5)
    trail.close()
    with reader(db) as conn:
        assert verify(conn).ok
        tamper(conn)
        report = verify(conn)
    assert not report.ok
    assert (report.broken_seq, report.broken_decision_id) == (broken_seq, broken_id)
    assert report.problem is not None
    assert problem in report.problem


def test_verify_names_a_forged_entry_appended_after_the_head(
    trail_factory: TrailFactory, db: Path
) -> None:
    # A row added after the last real one, with a correct link and hash: only the head
    # gives it away. The report must name the forged entry, not claim rows were removed.
    trail = trail_factory()
    fill(trail, db, 5)
    trail.close()
    with reader(db) as conn:
        forge_row(conn, 6, hash_of(conn, 5), "d-forged")
        report = verify(conn)
    assert not report.ok
    assert report.broken_seq == 6
    assert report.problem is not None
    assert "removed" not in report.problem


# --- retention ---------------------------------------------------------------------------


def test_max_records_prunes_the_oldest_and_chain_still_verifies(
    trail_factory: TrailFactory, db: Path, clock: ManualClock
) -> None:
    # The writer prunes once its clock is 60 s past the last pruning (initially 0): a
    # clock frozen at 30 s never prunes, 61 s later it must.
    clock.now = 30.0
    trail = trail_factory(max_records=3, retention_days=None)
    fill(trail, db, 10)
    time.sleep(0.3)  # more than one writer cycle
    assert count_rows(db) == 10

    clock.now += 61
    wait_until(lambda: count_rows(db) == 3, "pruning to 3 rows")
    with reader(db) as conn:
        # The 3 kept entries include the anchor move's own entry (11).
        assert [(e.seq, e.kind) for e in read_entries(conn)] == [
            (9, "decision"),
            (10, "decision"),
            (11, "anchor"),
        ]
        report = verify(conn)
    assert (report.ok, report.entries, report.first_seq, report.last_seq) == (True, 3, 9, 11)

    fill(trail, db, 2, start=11)  # the chain goes on from the anchor
    trail.close()
    with reader(db) as conn:
        report = verify(conn)
        assert report.ok
        assert (report.first_seq, report.last_seq) == (9, 13)
        # Removing the first kept row is still caught, relative to the anchor.
        conn.execute("DELETE FROM audit WHERE seq = 9")
        broken = verify(conn)
    assert (broken.ok, broken.broken_seq) == (False, 10)
    assert broken.problem is not None
    assert "expected entry 9 here" in broken.problem


def test_retention_days_prunes_old_entries(
    trail_factory: TrailFactory, db: Path, clock: ManualClock
) -> None:
    trail = trail_factory(retention_days=1, max_records=None)
    fill(trail, db, 4)  # recorded at T0+1 .. T0+4
    clock.now = T0 + 86400 + 2.5  # entries 1 and 2 are now older than a day
    wait_until(lambda: count_rows(db) == 3, "pruning to 2 rows and the anchor move")
    trail.close()
    with reader(db) as conn:
        assert [(e.seq, e.kind) for e in read_entries(conn)] == [
            (3, "decision"),
            (4, "decision"),
            (5, "anchor"),
        ]
        report = verify(conn)
    assert (report.ok, report.first_seq, report.last_seq) == (True, 3, 5)


def test_retention_pruning_every_entry_still_verifies(
    trail_factory: TrailFactory, db: Path, clock: ManualClock
) -> None:
    # An idle service: every stored entry is past retention and is pruned. That is not
    # tampering; the anchor records the last pruned entry, and the move's own entry is
    # all that is left.
    trail = trail_factory(retention_days=1, max_records=None)
    fill(trail, db, 3)
    clock.now = T0 + 2 * 86400
    wait_until(lambda: trail.prunes > 0 and count_rows(db) == 1, "pruning every row")
    trail.close()
    with reader(db) as conn:
        assert [(e.seq, e.kind) for e in read_entries(conn)] == [(4, "anchor")]
        report = verify(conn)
    assert report.ok, report.problem
    assert report.entries == 1


# --- degradation -------------------------------------------------------------------------


def test_locked_database_degrades_then_recovers_with_a_gap_entry(
    trail_factory: TrailFactory, db: Path, clock: ManualClock
) -> None:
    states: list[tuple[bool, int, int]] = []
    trail = trail_factory(on_state=lambda *state: states.append(state))
    fill(trail, db, 2)

    # Another process holds the write lock longer than the writer's busy timeout.
    with reader(db) as locker:
        locker.execute("BEGIN EXCLUSIVE")
        for n in (3, 4, 5):
            trail.record(decision(n))  # never raises, never blocks
        wait_until(lambda: trail.degraded, "degraded")
        wait_until(lambda: trail.failed == 3, "3 failed entries")
        # on_state runs after the counters move: wait for it rather than race it.
        wait_until(lambda: (True, 2, 3) in states, "degraded state reported")
        trail.record(decision(6))  # still accepted while degraded
        wait_until(lambda: trail.failed == 4, "4 failed entries")
        clock.now = T0 + 100
        locker.execute("ROLLBACK")

    wait_until(lambda: states[-1] == (False, 2, 4), "recovery reported")
    assert not trail.degraded
    fill(trail, db, 1, start=7)
    trail.close()

    with reader(db) as conn:
        entries = list(read_entries(conn))
        report = verify(conn)
    assert [(e.seq, e.kind, e.decision_id) for e in entries] == [
        (1, "decision", "d-1"),
        (2, "decision", "d-2"),
        (3, "gap", ""),
        (4, "decision", "d-7"),
    ]
    assert entries[2].body == {"lost": 4, "since": T0 + 3, "until": T0 + 100}
    assert report.ok, report.problem


def test_lost_entries_are_all_accounted_for(trail_factory: TrailFactory, db: Path) -> None:
    # A tiny queue while the writer is stuck on a lock: entries dropped at the queue and
    # entries lost in failed writes both end up in gap entries.
    trail = trail_factory(queue_size=2)
    with reader(db) as locker:
        locker.execute("BEGIN EXCLUSIVE")
        for n in range(1, 41):
            trail.record(decision(n))
            time.sleep(0.01)
        wait_until(lambda: trail.degraded, "degraded")
        locker.execute("ROLLBACK")
    wait_until(lambda: not trail.degraded, "recovery")
    trail.close()

    with reader(db) as conn:
        entries = list(read_entries(conn))
        assert verify(conn).ok
    lost = sum(e.body["lost"] for e in entries if e.kind == "gap")
    stored = sum(1 for e in entries if e.kind == "decision")
    assert lost > 0
    assert lost == trail.failed
    assert stored + lost == 40


def test_failing_state_callback_does_not_stop_the_writer(
    trail_factory: TrailFactory, db: Path
) -> None:
    def broken(degraded: bool, written: int, failed: int) -> None:
        raise RuntimeError("metrics down")

    trail = trail_factory(on_state=broken)
    fill(trail, db, 2)
    fill(trail, db, 2, start=3)
    trail.close()
    assert count_rows(db) == 4


def test_write_error_from_sqlite_degrades(
    trail_factory: TrailFactory, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any sqlite3.Error in the write (a full disk, an I/O error) degrades the same way.
    trail = trail_factory()
    fill(trail, db, 1)
    real = trail._conn
    failing = True

    class Flaky:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def __enter__(self) -> Any:
            return real.__enter__()

        def __exit__(self, *exc: Any) -> Any:
            return real.__exit__(*exc)

        def executemany(self, sql: str, rows: Any) -> Any:
            if failing:
                raise sqlite3.OperationalError("database or disk is full")
            return real.executemany(sql, rows)

    monkeypatch.setattr(trail, "_conn", Flaky())
    trail.record(decision(2))
    wait_until(lambda: trail.degraded and trail.failed == 1, "degraded")
    failing = False
    wait_until(lambda: not trail.degraded, "recovery")
    monkeypatch.setattr(trail, "_conn", real)
    trail.close()
    with reader(db) as conn:
        entries = list(read_entries(conn))
        assert verify(conn).ok
    assert [e.kind for e in entries] == ["decision", "gap"]
    assert entries[1].body["lost"] == 1


# --- bad paths ---------------------------------------------------------------------------


def not_a_database(tmp: Path) -> Path:
    path = tmp / "garbage.db"
    path.write_bytes(b"this is not an SQLite file\n" * 100)
    return path


@pytest.mark.parametrize(
    "make_path",
    [lambda tmp: tmp, lambda tmp: tmp / "missing-dir" / "audit.db", not_a_database],
    ids=["directory", "missing-directory", "not-a-database"],
)
def test_bad_path_raises_config_error_naming_it(
    tmp_path: Path, make_path: Callable[[Path], Path]
) -> None:
    path = make_path(tmp_path)
    with pytest.raises(ConfigError) as caught:
        AuditTrail(path)
    assert str(path) in str(caught.value)


def test_two_processes_sharing_one_file_keep_one_chain(tmp_path: Path) -> None:
    # Two trails on one file stand for two authz processes (e.g. compose --scale): each
    # chains onto whatever the other appended.
    path = tmp_path / "shared.db"
    first, second = AuditTrail(path), AuditTrail(path)
    try:
        for i in range(6):
            trail = first if i % 2 == 0 else second
            trail.admin("noop", {"i": i}, entry_id=f"a{i}")
            deadline = time.monotonic() + 5
            while trail.written < (i // 2) + 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
    finally:
        first.close()
        second.close()
    conn = sqlite3.connect(path)
    report = verify(conn)
    conn.close()
    assert report.ok, report
    assert report.entries == 6


# ----------------------------------------------------------------------------------------
# Under hostile callers: the database file is owner-only, the writer drains a backlog
# without sleeping and bounds its queue in bytes, rows are a size-capped projection of
# the request, the store is bounded in bytes, and an anchor moved by hand is caught by
# ``verify``.


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which a plain open() creates 0644 files."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the database file is 0600 ---------------------------------------------------------


def _old_world_readable_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    path.chmod(0o644)


@pytest.mark.parametrize(
    "existing", [False, True], ids=["created-by-the-trail", "existing-0644-file"]
)
@pytest.mark.usefixtures("umask_022")
def test_audit_database_and_its_wal_and_shm_are_owner_only(tmp_path: Path, existing: bool) -> None:
    db = tmp_path / "audit.db"
    if existing:
        _old_world_readable_db(db)
    trail = AuditTrail(db, retention_days=None, max_records=None)
    try:
        for n in range(1, 4):
            trail.record(decision(n))
        wait_until(lambda: trail.written >= 3, "3 entries written")
        # While the writer has the file open, the WAL and shared-memory files exist too.
        modes = {p.name: _mode(p) for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm"))}
    finally:
        trail.close()
    assert modes == {"audit.db": 0o600, "audit.db-wal": 0o600, "audit.db-shm": 0o600}


# --- the writer drains a backlog without sleeping; its queue is bounded in bytes ---------


def _held_writer() -> tuple[list[float], threading.Event, Callable[[float], None]]:
    """A sleep for the writer that records each call; the first call holds the writer
    until the event is set (so the test can build a backlog), later ones return at once."""
    sleeps: list[float] = []
    release = threading.Event()

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        release.wait(10)

    return sleeps, release, sleep


def test_writer_drains_a_backlog_without_sleeping(tmp_path: Path) -> None:
    sleeps, release, sleep = _held_writer()
    backlog = 4 * audit_store._BATCH
    trail = AuditTrail(
        tmp_path / "audit.db",
        retention_days=None,
        max_records=None,
        queue_size=2 * backlog,
        sleep=sleep,
    )
    try:
        trail.record(decision(1))
        wait_until(lambda: bool(sleeps), "the caught-up writer to wait for more entries")
        for n in range(2, backlog + 1):
            trail.record(decision(n))
        release.set()
        wait_until(lambda: trail.written >= backlog, f"{backlog} entries written")
    finally:
        trail.close()
    # One wait while the writer was idle (one entry queued); none for the 4-batch backlog.
    assert sleeps == [audit_store._FLUSH_S]
    assert trail.failed == 0


def test_writer_queue_is_bounded_in_bytes(tmp_path: Path) -> None:
    sleeps, release, sleep = _held_writer()
    limit = 64 * 1024
    trail = AuditTrail(
        tmp_path / "audit.db",
        retention_days=None,
        max_records=None,
        queue_size=100_000,
        queue_max_bytes=limit,
        sleep=sleep,
    )
    recorded = 1000
    peak = 0
    try:
        trail.record(decision(1))
        wait_until(lambda: bool(sleeps), "the writer to be held")
        for n in range(2, recorded + 1):
            trail.record(
                decision(
                    n,
                    document={
                        "attributes": {
                            "request": {
                                "http": {
                                    "method": "GET",
                                    "path": "/x",
                                    "headers": {"user-agent": "u" * 512},
                                }
                            }
                        }
                    },
                )
            )
            peak = max(peak, trail.queued_bytes)
        release.set()
        wait_until(lambda: trail.written + trail.failed >= recorded, "every entry accounted")
    finally:
        trail.close()
    assert 0 < peak <= limit
    assert trail.failed > 0, "the byte bound never dropped an entry"
    with reader(tmp_path / "audit.db") as conn:
        entries = list(read_entries(conn))
        assert verify(conn).ok
    lost = sum(e.body["lost"] for e in entries if e.kind == "gap")
    assert lost == trail.failed
    assert sum(1 for e in entries if e.kind == "decision") + lost == recorded


# --- anchor moves are recorded, logged and checked --------------------------------------


def _prune_now(trail: AuditTrail, clock: ManualClock) -> None:
    """Move the writer's clock past its pruning interval and wait for a pruning pass."""
    before = trail.prunes
    clock.now += 61
    wait_until(lambda: trail.prunes > before, "a pruning pass")


def _ten_decisions(db: Path, *, max_records: int, prune: bool) -> None:
    """Decisions 1..10 in a new trail at ``db`` keeping ``max_records``, with one pruning
    pass after them when ``prune``; the trail is closed."""
    clock = ManualClock(30.0)
    trail = AuditTrail(db, retention_days=None, max_records=max_records, clock=clock)
    try:
        for n in range(1, 11):
            trail.record(decision(n))
        wait_until(lambda: trail.written >= 10, "10 entries written")
        if prune:
            _prune_now(trail, clock)
    finally:
        trail.close()


def _move_anchor_by_hand(conn: sqlite3.Connection, to_seq: int) -> None:
    """What someone able to write the file does to erase the oldest entries unnoticed."""
    digest = conn.execute("SELECT hash FROM audit WHERE seq = ?", (to_seq,)).fetchone()[0]
    conn.execute("DELETE FROM audit WHERE seq <= ?", (to_seq,))
    conn.execute(
        "INSERT INTO audit_meta (key, value) VALUES ('anchor', ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (orjson.dumps({"seq": to_seq, "hash": digest}).decode(),),
    )


@pytest.mark.parametrize("pruned_before", [False, True], ids=["never-pruned", "after-a-prune"])
def test_anchor_moved_by_hand_fails_verify_naming_the_anchor(
    tmp_path: Path, pruned_before: bool
) -> None:
    db = tmp_path / "audit.db"
    _ten_decisions(db, max_records=8, prune=pruned_before)
    with reader(db) as conn:
        assert verify(conn).ok
        first = conn.execute("SELECT MIN(seq) FROM audit").fetchone()[0]
        _move_anchor_by_hand(conn, first + 2)
        report = verify(conn)
    assert not report.ok, "entries erased by moving the anchor verify as intact"
    assert report.problem is not None
    assert "anchor" in report.problem


def test_every_prune_records_and_logs_its_anchor_move(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "audit.db"
    clock = ManualClock(30.0)
    trail = AuditTrail(db, retention_days=None, max_records=4, clock=clock)
    caplog.set_level(logging.INFO, logger="authz.runtime.audit")
    try:
        for start in (1, 11):
            for n in range(start, start + 10):
                trail.record(decision(n))
            target = start + 9
            wait_until(lambda: trail.written >= target, "a round of entries written")  # noqa: B023
            _prune_now(trail, clock)
    finally:
        trail.close()
    moves = [r for r in caplog.records if r.getMessage() == "audit anchor moved"]
    with reader(db) as conn:
        entries = list(read_entries(conn))
        report = verify(conn)
        # The last move's log line names its own entry: usable as an external head.
        last = moves[-1]
        by_head = verify(conn, head=(last.__dict__["seq"], last.__dict__["hash"]))
    assert report.ok, report.problem
    assert by_head.ok, by_head.problem
    assert len(entries) <= 4
    assert [len(moves), sum(e.kind == "anchor" for e in entries)] == [2, 1]
    first, second = (m.__dict__ for m in moves)
    assert first["previous"] == {"seq": 0, "hash": audit.GENESIS}
    assert second["previous"] == first["anchor"]
    (recorded,) = [e for e in entries if e.kind == "anchor"]
    assert recorded.body["from"] == second["previous"]
    assert recorded.body["to"] == second["anchor"]
    assert (recorded.seq, recorded.hash) == (second["seq"], second["hash"])


def test_store_pruned_before_moves_were_recorded_is_adopted_once(tmp_path: Path) -> None:
    # A store from before anchor moves were recorded: an anchor, no anchor entry, no
    # "anchor_moves" marker. Opening it records the anchor once ("from": null), loudly.
    db = tmp_path / "audit.db"
    trail = AuditTrail(db, retention_days=None, max_records=None)
    for n in range(1, 7):
        trail.record(decision(n))
    wait_until(lambda: trail.written >= 6, "6 entries written")
    trail.close()
    with reader(db) as conn:
        _move_anchor_by_hand(conn, 2)
        conn.execute("DELETE FROM audit_meta WHERE key = 'anchor_moves'")
        assert not verify(conn).ok
    AuditTrail(db, retention_days=None, max_records=None).close()
    AuditTrail(db, retention_days=None, max_records=None).close()
    with reader(db) as conn:
        moves = [e.body for e in read_entries(conn, kind="anchor")]
        report = verify(conn)
    assert report.ok, report.problem
    assert moves == [{"from": None, "to": moves[0]["to"], "deleted": 0}]
    assert moves[0]["to"]["seq"] == 2


# --- an audit row is a size-capped projection of the request ----------------------------

# Credentials a hostile request carries: none may reach the store in any form but a digest.
CREDENTIALS = {
    "authorization": "Bearer tok-SECRET-bearer",
    "x-api-key": "ak-SECRET-key",
    "cookie": "session=SECRET-cookie",
    "api-key": "SECRET-api-key",  # in CREDENTIAL_HEADERS, not in the configured hashed list
    "x-goog-api-key": "SECRET-goog",
    "proxy-authorization": "Basic SECRET-proxy",
    "x-sandbox-token": "SECRET-sandbox",
}


def _hostile_record(rng: random.Random) -> tuple[DecisionRecord, int]:
    """A decision on a request with 55 KB of random headers, a 4 KB user-agent, every
    credential header and a 60 KB JSON body; and the body's size."""
    junk = {f"x-junk-{i}": "".join(rng.choices(string.ascii_letters, k=1000)) for i in range(55)}
    body = orjson.dumps({"data": "".join(rng.choices(string.ascii_letters, k=60 * 1024))})
    headers = {
        **junk,
        **CREDENTIALS,
        "user-agent": "u" * 4000,
        "content-type": "application/json",
        "x-request-id": "req-1",
        "x-envoy-attempt-count": "1",
        "x-sandbox-id": "sb-1",
    }
    request = check_request(
        method="POST", path="/api/v1/items", headers=headers, body=body.decode()
    )
    document = build_input(request, config.DEFAULT_CREDENTIAL_HEADERS)
    return decision(1, document=document), len(body)


def _stored_row(db: Path) -> tuple[int, dict[str, Any], str]:
    """``(row bytes, body, body text)`` of the one stored decision: every column counted."""
    with reader(db) as conn:
        row = conn.execute(
            "SELECT seq, kind, time, decision_id, body, prev_hash, hash FROM audit "
            "WHERE kind = 'decision'"
        ).fetchone()
    size = sum(len(str(column).encode()) for column in row)
    return size, orjson.loads(row[4]), row[4]


def _stored_one(db: Path, record: DecisionRecord) -> tuple[int, dict[str, Any], str]:
    """Append ``record`` to a new trail at ``db``, close it, and return
    :func:`_stored_row`."""
    trail = AuditTrail(db, retention_days=None, max_records=None)
    try:
        trail.record(record)
        wait_until(lambda: trail.written >= 1, "the entry written")
    finally:
        trail.close()
    return _stored_row(db)


def test_row_for_huge_headers_and_body_stays_under_the_row_cap(tmp_path: Path) -> None:
    record, body_size = _hostile_record(random.Random(13))  # noqa: S311 (test data)
    size, body, text = _stored_one(tmp_path / "audit.db", record)
    assert size <= config.DEFAULT_AUDIT_ROW_MAX_BYTES
    assert "x-junk" not in text
    assert "SECRET" not in text
    http = body["input"]["attributes"]["request"]["http"]
    assert not {"body", "rawBody"} & set(http)
    assert "parsed_body" not in body["input"]
    assert body["input"]["body_omitted"] == body_size
    assert body["input"]["headers_omitted"]["count"] >= 55 + len(CREDENTIALS)
    headers = http["headers"]
    assert {"x-request-id", "x-envoy-attempt-count", "x-sandbox-id", "content-type"} <= set(headers)
    assert not set(CREDENTIALS) & set(headers)
    # The 4 KB user-agent: cut to the value cap, the cut marked with the original size.
    agent = headers["user-agent"]
    assert len(agent.encode()) <= config.DEFAULT_AUDIT_VALUE_MAX_BYTES
    assert agent.startswith("u" * 100)
    assert agent.endswith(audit.truncation_marker(4000))
    # What the policy keyed on survives as digests (for replay), never as values.
    assert set(body["input"]["credentials"]) == set(config.DEFAULT_CREDENTIAL_HEADERS)


def test_ordinary_row_keeps_the_request_shape_replay_needs(tmp_path: Path) -> None:
    request = check_request(
        path="/api/v1/items?page=2",
        headers={"x-api-key": "ak-SECRET-key", "x-request-id": "r-1", "accept": "*/*"},
    )
    document = build_input(request, config.DEFAULT_CREDENTIAL_HEADERS)
    size, body, text = _stored_one(tmp_path / "audit.db", decision(1, document=document))
    assert size < 2048
    assert "SECRET" not in text
    stored = body["input"]
    assert stored["parsed_path"] == ["api", "v1", "items"]
    assert stored["parsed_query"] == {"page": ["2"]}
    assert stored["attributes"]["request"]["http"]["path"] == "/api/v1/items?page=2"
    assert stored["attributes"]["request"]["http"]["headers"] == {
        ":authority": "gateway",
        "x-request-id": "r-1",
    }
    sent = document["attributes"]["request"]["http"]["headers"]
    omitted = {k: v for k, v in sent.items() if k not in (":authority", "x-request-id")}
    assert sorted(omitted) == [":method", ":path", "accept", "x-api-key"]
    assert stored["headers_omitted"] == {
        "count": 4,
        "bytes": sum(len(k) + len(v) for k, v in omitted.items()),
    }
    assert stored["credentials"] == document["credentials"]


def _record_for(**parts: Any) -> DecisionRecord:
    """A decision whose document is built from ``check_request(**parts)``; ``identity``
    and ``metadata`` (metadataContext) are put on the record/document as given."""
    identity = parts.pop("identity", {"key_id": "key-1"})
    metadata = parts.pop("metadata", None)
    document = build_input(check_request(**parts), config.DEFAULT_CREDENTIAL_HEADERS)
    if metadata is not None:
        document["attributes"]["metadataContext"] = metadata
    return decision(1, document=document, identity=identity)


HUGE_QUERY = "/x?" + "&".join(f"k{i}={'v' * 100}" for i in range(500))


@pytest.mark.parametrize(
    ("parts", "shed"),
    [
        ({"path": HUGE_QUERY}, "parsed_query"),
        ({"headers": {f"x-envoy-{i}": "e" * 900 for i in range(60)}}, None),
        ({"identity": {f"claim_{i}": "c" * 900 for i in range(60)}}, "input"),
        ({"metadata": {"filter": {f"m{i}": "m" * 900 for i in range(60)}}}, "metadataContext"),
        ({"path": "/" + "p" * 60_000}, None),
    ],
    ids=["huge-query", "many-prefix-headers", "huge-identity", "huge-metadata", "huge-path"],
)
def test_every_hostile_shape_stays_under_the_row_cap(
    tmp_path: Path, parts: dict[str, Any], shed: str | None
) -> None:
    size, body, _ = _stored_one(tmp_path / "audit.db", _record_for(**parts))
    assert size <= config.DEFAULT_AUDIT_ROW_MAX_BYTES
    assert body["decision_id"] == "d-1"
    if shed == "input":
        assert body["input"] is None
        assert body["omitted"]["input"] > 0
    elif shed is not None:
        assert body["input"]["omitted"][shed] > config.DEFAULT_AUDIT_ROW_MAX_BYTES // 2
        assert body["input"]["attributes"]["request"]["http"]["method"] == "GET"


def test_replay_input_puts_back_the_masked_credentials_the_policy_saw(tmp_path: Path) -> None:
    document = build_input(
        check_request(headers={"authorization": "Bearer tok-SECRET"}),
        config.DEFAULT_CREDENTIAL_HEADERS,
    )
    _, body, text = _stored_one(tmp_path / "audit.db", decision(1, document=document))
    assert "authorization" not in body["input"]["attributes"]["request"]["http"]["headers"]
    replayed = audit.replay_input(body["input"])["attributes"]["request"]["http"]["headers"]
    seen = document["attributes"]["request"]["http"]["headers"]
    assert replayed["authorization"] == seen["authorization"]
    assert seen["authorization"].startswith("Bearer sha256:")
    assert "SECRET" not in text


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"AUTHZ_AUDIT_HEADERS": "user-agent,x-api-key"}, "x-api-key"),
        ({"AUTHZ_AUDIT_HEADERS": "cookie"}, "cookie"),
        ({"AUTHZ_AUDIT_HEADERS": "x-goog-*"}, "x-goog-api-key"),
        ({"AUTHZ_AUDIT_HEADERS": "*"}, "AUTHZ_AUDIT_HEADERS"),
        (
            {"AUTHZ_CREDENTIAL_HEADERS": "x-api-key,x-team-key", "AUTHZ_AUDIT_HEADERS": "x-team-*"},
            "x-team-key",
        ),
        ({"AUTHZ_AUDIT_HEADERS": "user agent"}, "user agent"),
        ({"AUTHZ_AUDIT_VALUE_MAX_BYTES": "4096"}, "AUTHZ_AUDIT_VALUE_MAX_BYTES"),
        ({"AUTHZ_AUDIT_ROW_MAX_BYTES": "1000"}, "AUTHZ_AUDIT_ROW_MAX_BYTES"),
        ({"AUTHZ_AUDIT_BODY_MAX_BYTES": "8192"}, "AUTHZ_AUDIT_BODY_MAX_BYTES"),
        ({"AUTHZ_AUDIT_MAX_BYTES": str(1024 * 1024)}, "AUTHZ_AUDIT_MAX_BYTES"),
    ],
    ids=[
        "credential-name",
        "cookie",
        "prefix-matching-a-credential",
        "everything",
        "configured-credential",
        "not-a-header-name",
        "value-cap-over-a-quarter-row",
        "row-cap-too-small",
        "body-cap-over-half-row",
        "store-bound-under-16-mib",
    ],
)
def test_audit_settings_refuse_credential_headers_and_bad_caps(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(environ)
    assert named in str(caught.value)


# --- the store is bounded in bytes, WAL included ----------------------------------------


def _store_bytes(db: Path) -> int:
    """The database's size as SQLite counts it (page_count * page_size) plus the WAL and
    shared-memory files on disk."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    extra = sum(p.stat().st_size for p in (Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())
    return int(pages * page_size) + extra


def test_store_stays_under_max_bytes_including_the_wal(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    limit = 2 * 1024 * 1024
    trail = AuditTrail(db, retention_days=None, max_records=None, max_bytes=limit)
    sizes = []
    agent = {"user-agent": "a" * 1000}
    try:
        for round_ in range(10):  # ~10 x 400 rows of ~1.5 KB: three times the bound
            for _ in range(400):
                trail.record(_record_for(headers=agent))
            target = (round_ + 1) * 400
            wait_until(lambda: trail.written >= target, f"{target} entries written")  # noqa: B023
            sizes.append(_store_bytes(db))
    finally:
        trail.close()
    assert max(sizes) <= limit, sizes
    with reader(db) as conn:
        report = verify(conn)
        moves = list(read_entries(conn, kind="anchor"))
    assert report.ok, report.problem
    assert moves, "the byte bound never pruned"
    assert report.entries < 4000
    assert _store_bytes(db) <= limit


def test_cli_verify_exits_1_naming_a_hand_moved_anchor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "audit.db"
    _ten_decisions(db, max_records=5, prune=True)
    assert main(["audit", "--db", str(db), "verify"]) == 0
    with reader(db) as conn:
        first = conn.execute("SELECT MIN(seq) FROM audit").fetchone()[0]
        _move_anchor_by_hand(conn, first + 1)
    capsys.readouterr()
    assert main(["audit", "--db", str(db), "verify"]) == 1
    err = capsys.readouterr().err
    assert f"BROKEN at entry {first + 1}" in err
    assert "anchor moved by hand" in err


def test_cli_tail_kind_anchor_lists_the_anchor_moves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "audit.db"
    _ten_decisions(db, max_records=5, prune=True)
    capsys.readouterr()
    assert main(["audit", "--db", str(db), "tail", "--kind", "anchor"]) == 0
    lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["kind"], line["from"]["seq"], line["to"]["seq"]) for line in lines] == [
        ("anchor", 0, 6)
    ]


# ----------------------------------------------------------------------------------------
# Integrity of every column a reader trusts, tail deletion, and the queue's memory.
#
# README: "hash-chained so that any edit, re-ordering or deletion is detectable".


def _filled(db: Path) -> None:
    trail = AuditTrail(db, retention_days=None, max_records=None)
    for n in range(1, 6):
        trail.record(decision(n))
    trail.admin("set_mode", {"mode": "dry-run", "actor": "alice"}, entry_id="set_mode")
    wait_until(lambda: trail.written >= 6, "6 entries")
    trail.close()


def test_columns_outside_the_hash_cannot_be_edited_undetected(tmp_path: Path) -> None:
    # kind, time and decision_id are stored beside the hashed body and trusted by
    # `audit tail` (kind), `audit replay` (kind = 'decision'), verify's report
    # (decision_id) and retention (time < cutoff): an edit to any of them fails verify,
    # or dating an entry 40 days back would let retention erase it without a trace.
    db = tmp_path / "audit.db"
    _filled(db)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        assert verify(conn).ok
        conn.execute(
            "UPDATE audit SET kind = 'decision', decision_id = 'd-x', time = 0 WHERE seq = 6"
        )
        entry = list(read_entries(conn))[-1]
        assert (entry.kind, entry.decision_id, entry.time) == ("decision", "d-x", 0)
        report = verify(conn)
    finally:
        conn.close()
    assert not report.ok, "edited kind/time/decision_id columns verify as intact"


def test_tail_deletion_is_detectable(tmp_path: Path) -> None:
    # The head is kept in the same file, next to the rows: deleting the last entries and
    # pointing the head at the new last row (one more UPDATE) verifies as intact on its
    # own. The writer logs the head ("audit head"); verified against that logged head,
    # the deletion shows.
    db = tmp_path / "audit.db"
    _filled(db)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        logged_head = conn.execute("SELECT seq, hash FROM audit WHERE seq = 6").fetchone()
        row = conn.execute("SELECT seq, hash FROM audit WHERE seq = 4").fetchone()
        conn.execute("DELETE FROM audit WHERE seq > 4")
        conn.execute(
            "UPDATE audit_meta SET value = ? WHERE key = 'head'",
            (orjson.dumps({"seq": row[0], "hash": row[1]}).decode(),),
        )
        assert verify(conn).ok  # undetectable from inside the file alone
        report = verify(conn, head=(logged_head[0], logged_head[1]))
    finally:
        conn.close()
    assert not report.ok, "entries 5..6 (incl. the admin mode switch) deleted undetected"
    assert report.problem is not None
    assert "removed from the end" in report.problem


async def test_audit_queue_memory_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A queued DecisionRecord that pinned its whole input document (request body plus
    # parsed body) would hold ~1.6 MB for an anonymous request with a 63 KB JSON body
    # (under the gateway's max_request_bytes): with the writer behind (a slow disk), a
    # flood of such requests would grow the queue until the process is killed.

    monkeypatch.setattr(audit_store, "_FLUSH_S", 3.0)  # a slow disk: the writer is behind
    trail = AuditTrail(tmp_path / "audit.db", retention_days=None, max_records=None)
    authorizer = Authorizer(
        FakeEngine(
            {"allowed": False, "http_status": 401, "reason": "missing_api_key"}, record=False
        ),
        default_decision_path="authz/gateway/decision",
        credential_headers=("x-api-key",),
        timeout_s=5.0,
        sinks=[trail],
    )
    try:
        per_entry = await bytes_retained_per_check(authorizer)
    finally:
        monkeypatch.setattr(audit_store, "_FLUSH_S", 0.02)
    projected_gb = per_entry * 100_000 / 1e9  # AuditTrail's default queue_size
    try:
        assert projected_gb < 2.0, f"a full audit queue would pin {projected_gb:.0f} GB"
    finally:
        trail.close(timeout_s=60)


class _LogFieldsFirst:
    """A sink that builds each record's log fields, as the decision log (ahead of the
    audit trail among the sinks) does."""

    def record(self, record: DecisionRecord) -> None:
        record.log_fields()


@pytest.mark.parametrize("logged", [False, True], ids=["audit-only", "after-the-decision-log"])
async def test_audit_queue_charges_at_least_what_a_queued_entry_retains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logged: bool
) -> None:
    # The queue is bounded in bytes by what each entry is charged: a charge below what
    # an entry really retains lets a full queue pin more than its configured bound.
    # Ordinary gateway allows (an API key, a user agent, a request id, distinct paths)
    # are queued while the writer is behind; tracemalloc counts what they retain.
    import tracemalloc

    monkeypatch.setattr(audit_store, "_FLUSH_S", 5.0)  # the writer is behind
    trail = AuditTrail(tmp_path / "audit.db", retention_days=None, max_records=None)
    allow = {
        "allowed": True,
        "headers": {"x-authz-key-id": "key-1", "x-authz-role": "user"},
        "authz": {"reason": "allowed", "identity": {"key_id": "key-1", "role": "user"}},
    }
    authorizer = Authorizer(
        FakeEngine(allow, record=False),
        default_decision_path="authz/gateway/decision",
        credential_headers=("x-api-key",),
        timeout_s=5.0,
        sinks=[*([_LogFieldsFirst()] if logged else []), trail],
    )
    n = 200
    requests = [
        check_request(
            path=f"/api/v1/items/{i}",
            headers={"x-api-key": f"ak_{i:08d}", "user-agent": "curl/8.5", "x-request-id": str(i)},
        )
        for i in range(n)
    ]
    try:
        await authorizer.check(requests[0])  # first-use allocations are not an entry's
        queued_before = trail.queued_bytes
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for request in requests[1:]:
                await authorizer.check(request)
            retained = (tracemalloc.get_traced_memory()[0] - before) / (n - 1)
        finally:
            tracemalloc.stop()
        charged = (trail.queued_bytes - queued_before) / (n - 1)
        assert trail.queued_bytes > queued_before  # the entries are still queued
        assert charged >= retained, f"charged {charged:.0f} B per entry, retains {retained:.0f} B"
    finally:
        monkeypatch.setattr(audit_store, "_FLUSH_S", 0.02)
        trail.close(timeout_s=60)


def test_a_file_that_is_not_a_database_leaves_no_connection_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python 3.13 warns (ResourceWarning) about a sqlite3 connection left to the garbage
    # collector: connect() must close the one it opened when the file is refused.
    from authz.runtime.audit import chain

    opened: list[sqlite3.Connection] = []
    closed: list[sqlite3.Connection] = []
    real_connect = sqlite3.connect

    class Tracked(sqlite3.Connection):
        def close(self) -> None:
            closed.append(self)
            super().close()

    def tracking_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, factory=Tracked, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", tracking_connect)
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not an SQLite file\n" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        chain.connect(path)
    assert len(opened) == 1
    assert closed == opened


# --- the event loop's part: slim documents, cheap copies ---------------------------------


def _read_only(value: Any) -> Any:
    """``value`` with every dict outside a list a read-only Mapping that is not a dict (a
    headerMap entry stays a dict: its omitted size is its JSON, which orjson writes for a
    dict only)."""
    if isinstance(value, dict):
        return MappingProxyType({k: _read_only(v) for k, v in value.items()})
    return value


def _http_document(http: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"attributes": {"request": {"http": http}}, "parsed_body": None} | top


SCHEMED = f"Bearer sha256:{DIGEST}"
SLIM_CASES: list[tuple[dict[str, Any], str]] = [
    (build_input(check_request(), config.DEFAULT_CREDENTIAL_HEADERS), "check-request"),
    (
        _http_document(
            {
                "path": "/a?b=c",
                "headers": {
                    "host": "h",
                    ":authority": "a",
                    "x-envoy-original-path": "/p",
                    "x-other": "o",
                    "x-api-key": "sha256:" + DIGEST,
                    "authorization": SCHEMED,
                    "accept": "*/*",
                },
            },
            credentials={"authorization": DIGEST, "x-api-key": DIGEST, "cookie": DIGEST},
        ),
        "headers-kept-dropped-schemes",
    ),
    (
        _http_document(
            {
                "headerMap": {
                    "headers": [
                        {"key": "host", "value": "h"},
                        {"key": "X-Envoy-Attempt", "rawValue": "MQ=="},
                        {"key": "accept", "value": "*/*"},
                        {"key": "authorization", "value": SCHEMED},
                        "not-an-entry",
                        {"value": "no key"},
                    ],
                    "other": 1,
                }
            }
        ),
        "header-map",
    ),
    (_http_document({"body": "x" * 10}, parsed_body={"a": 1}), "small-body"),
    (_http_document({"body": "x" * 100, "rawBody": "eA=="}, parsed_body={}), "big-body"),
    (_http_document({"body": ""}), "empty-body"),
    (_http_document({"headers": ["host", "h"], "headerMap": "junk"}), "not-mappings"),
    (_http_document({"headers": {}}, credentials="junk"), "credentials-not-a-mapping"),
    ({"version": {"ext_authz": "v3"}}, "no-attributes"),
]


@pytest.mark.parametrize(
    "projection",
    [audit.Projection(), audit.Projection(headers=("host", "x-*"), body_max_bytes=64)],
    ids=["default", "prefix-and-body"],
)
@pytest.mark.parametrize(
    "document", [case for case, _ in SLIM_CASES], ids=[i for _, i in SLIM_CASES]
)
def test_slim_document_is_the_same_from_dicts_and_other_mappings(
    document: dict[str, Any], projection: audit.Projection
) -> None:
    # The event loop's projection takes plain dicts the quick way; any other Mapping (a
    # caller's read-only view) must project to the same document, and so be charged alike.
    projector = projection_module._Projector(projection)
    slim, charge = projector.slim_charged(document)
    assert (slim, charge) == projector.slim_charged(_read_only(document))
    assert slim == projector.slim(document)


# The event loop's part before slim_charged, kept here as the reference it must equal:
# slim, then _charge on the queued record holding the slim document.
_PREVIOUS_SCHEME_RE = projection_module._SCHEME_RE


def _previous_slim(projector: Any, document: Any) -> dict[str, Any]:
    from collections.abc import Mapping

    attributes = document.get("attributes", {})
    request = attributes.get("request", {})
    http = request.get("http", {})
    omitted_count = omitted_bytes = 0
    slim_http = {k: v for k, v in http.items() if k not in ("headers", "headerMap")}
    headers = http.get("headers")
    headers_is_mapping = isinstance(headers, Mapping)
    if headers_is_mapping:
        kept = {}
        for name, value in headers.items():
            if projector._keeps(name):
                kept[name] = value
            else:
                omitted_count += 1
                omitted_bytes += len(name) + len(str(value))
        slim_http["headers"] = kept
    header_map = http.get("headerMap")
    if isinstance(header_map, Mapping):
        entries = []
        for entry in header_map.get("headers", ()):
            name = str(entry.get("key", "")).lower() if isinstance(entry, Mapping) else ""
            if name and projector._keeps(name):
                entries.append(entry)
            else:
                omitted_count += 1
                omitted_bytes += len(orjson.dumps(entry, default=str))
        slim_http["headerMap"] = {**header_map, "headers": entries}
    size = len(http.get("body", "")) + len(http.get("rawBody", ""))
    keep_body = 0 < size <= projector.p.body_max_bytes
    slim = dict(document)
    if not keep_body:
        for name in ("body", "rawBody"):
            slim_http.pop(name, None)
        slim.pop("parsed_body", None)
    slim["attributes"] = {**attributes, "request": {**request, "http": slim_http}}
    if size and not keep_body:
        slim["body_omitted"] = size
    if omitted_count:
        slim["headers_omitted"] = {"count": omitted_count, "bytes": omitted_bytes}
    credentials = document.get("credentials")
    if credentials and headers_is_mapping and isinstance(credentials, Mapping):
        schemes = {}
        for name in credentials:
            match = _PREVIOUS_SCHEME_RE.fullmatch(str(headers.get(name, "")))
            if match:
                schemes[name] = match.group(1)
        if schemes:
            slim["credential_schemes"] = schemes
    return slim


def _previous_charge(document: Any) -> int:
    """What _charge added to the overhead and the record's path for a slim document."""
    size = 0
    http = document.get("attributes", {}).get("request", {}).get("http", {})
    size += len(http.get("path", "")) * 2
    size += len(http.get("body", "")) * 2 + len(http.get("rawBody", ""))
    for name, value in http.get("headers", {}).items():
        size += len(name) + len(value)
    for entry in http.get("headerMap", {}).get("headers", ()):
        size += sum(len(str(v)) for v in entry.values())
    return size


def _scheme_headers() -> dict[str, Any]:
    # Values at and around the " sha256:" the scheme scan looks for 72 characters from the
    # end: schemes of 1, 32 and 33 characters, no scheme, upper-case or short hex, a
    # trailing newline, no space, two spaces, a value not a string.
    hexes = "0123456789abcdef" * 4
    return {
        "authorization": f"Bearer sha256:{DIGEST}",
        "x-api-key": "sha256:" + DIGEST,
        "x-one": f"B sha256:{hexes}",
        "x-thirty-two": f"{'t' * 32} sha256:{hexes}",
        "x-thirty-three": f"{'t' * 33} sha256:{hexes}",
        "x-upper": f"Bearer sha256:{hexes.upper()}",
        "x-short": f"Bearer sha256:{hexes[:-1]}",
        "x-newline": f"Bearer sha256:{hexes}\n",
        "x-no-space": f"Bearersha256:{hexes}",
        "x-two-spaces": f"Bearer  sha256:{hexes}",
        "x-bad-token": f"Bea(rer sha256:{hexes}",
        "number": 12345,
        "x-bytes": b"Bearer sha256:" + hexes.encode(),
    }


PREVIOUS_CASES: list[tuple[dict[str, Any], str]] = [
    *SLIM_CASES,
    (
        _http_document(
            {"path": "/p", "headers": _scheme_headers()},
            credentials={name: DIGEST for name in [*_scheme_headers(), "absent"]},
        ),
        "scheme-forms",
    ),
    (
        _http_document(
            {
                "path": "/p?q=1",
                "headers": {"host": "h", "user-agent": "ua", "x-envoy-a": "1", "x-b": "2"},
                "headerMap": {
                    "headers": [
                        {"key": "Host", "value": "h", "rawValue": "aA=="},
                        {"key": "x-envoy-b", "value": "ü" * 3},
                        {"key": "x-c", "value": 7},
                    ]
                },
                "body": "é" * 20,
                "rawBody": "w6k=",
            },
            parsed_body={"k": "v"},
        ),
        "kept-headers-header-map-and-body",
    ),
    (
        _http_document({"headers": {"host": "h"}, "headerMap": None, "body": "", "rawBody": "x"}),
        "header-map-none-raw-body-only",
    ),
    (
        _http_document({"headers": {"host": b"bytes", "user-agent": ("t", "u")}, "path": b"/b"}),
        "sized-values-not-strings",
    ),
    (_http_document({"path": ""}, credentials={}), "empty-credentials"),
    ({"attributes": {"request": {}}, "credentials": {"x": DIGEST}}, "no-http"),
]


@pytest.mark.parametrize(
    "projection",
    [audit.Projection(), audit.Projection(headers=("host", "x-*"), body_max_bytes=64)],
    ids=["default", "prefix-and-body"],
)
@pytest.mark.parametrize("view", [False, True], ids=["dicts", "read-only-mappings"])
@pytest.mark.parametrize(
    "document", [case for case, _ in PREVIOUS_CASES], ids=[i for _, i in PREVIOUS_CASES]
)
def test_slim_charged_equals_the_previous_slim_and_charge(
    document: dict[str, Any], view: bool, projection: audit.Projection
) -> None:
    # One pass computes the slim document and its charge: the same document, key order
    # included, and the same charge as the separate slim, _schemes and _charge it replaced.
    projector = projection_module._Projector(projection)
    given = _read_only(document) if view else document
    slim, charge = projector.slim_charged(given)
    expected = _previous_slim(projector, given)
    assert orjson.dumps(slim, default=repr) == orjson.dumps(expected, default=repr)
    assert slim == expected
    assert charge == _previous_charge(expected)


def test_audit_record_charges_the_overhead_path_slim_document_and_log_fields(
    tmp_path: Path,
) -> None:
    # What AuditTrail.record queues is charged the fixed overhead, the record's path,
    # slim_charged's count and the log fields it carries (what the byte bound adds up).
    document = PREVIOUS_CASES[-5][0]
    trail = AuditTrail(tmp_path / "a.db")
    try:
        charged: list[int] = []
        trail._put = lambda *item: charged.append(item[-1])  # type: ignore[method-assign]
        trail.record(DecisionRecord("d", T0, "p", True, "a", 200, path="/p", document=document))
        trail.record(DecisionRecord("e", T0, "p", True, "a", 200, path="/pp"))
        pinned = _previous_charge(_previous_slim(trail._projector, document))
        overhead = audit_store._ENTRY_OVERHEAD
        assert charged == [overhead + len("/p") + pinned, overhead + len("/pp")]
        # A record whose log fields were built (the decision log ran first) pins them too.
        logged = DecisionRecord("f", T0, "p", True, "a", 200, path="/pp")
        logged.log_fields()
        trail.record(logged)
        assert charged[-1] == overhead + len("/pp") + audit_store._LOG_FIELDS_CHARGE
    finally:
        trail.close()


@pytest.mark.parametrize(
    "http",
    [{"path": None}, {"headers": {"host": 7}}, {"headers": {"user-agent": None}}],
    ids=["path-none", "kept-header-int", "kept-header-none"],
)
def test_audit_record_never_raises_on_values_without_a_length(
    tmp_path: Path, http: dict[str, Any]
) -> None:
    # The charge counted len() of the path and of kept header values, and raised out of
    # record() (which never raises) for a value with none: now str() of it is counted,
    # and the entry is written with its input.
    trail = AuditTrail(tmp_path / "a.db", retention_days=None)
    document = _http_document(http)
    trail.record(DecisionRecord("d", T0, "p", True, "a", 200, document=document))
    trail.close()
    with reader(tmp_path / "a.db") as conn:
        [entry] = read_entries(conn)
    assert entry.body["input"]["attributes"]["request"]["http"] == http


# The fields __init__ sets (the log fields' cache is not one).
_INIT_FIELDS = [field for field in dataclasses.fields(DecisionRecord) if field.init]


def test_queued_record_is_the_record_with_the_slim_document_and_no_result() -> None:
    # _queued copies slots without __init__: every field must come across (one with a
    # value unlike its default each), and no __post_init__ may exist for it to skip.
    values: dict[str, Any] = {
        field.name: value
        for field, value in zip(
            _INIT_FIELDS,
            (
                "d-1",
                T0,
                "authz/p",
                False,
                "denied",
                403,
                True,
                "dry-run",
                True,
                False,
                "policy_reason",
                "tier",
                "o-1",
                "source",
                "d-0",
                "r1",
                {"k": "v"},
                "req",
                "POST",
                "/p",
                0.5,
                0.25,
                "error",
                {"a": 1},
                {"allowed": False},
                {"main": "r1"},
                "ipv4:127.0.0.1:1",
                ("body",),
            ),
            strict=True,
        )
    }
    full = DecisionRecord(**values)
    defaults = DecisionRecord("d", 0.0, "", True, "", 0)
    for field in _INIT_FIELDS:
        assert getattr(full, field.name) != getattr(defaults, field.name), field.name
    assert not hasattr(DecisionRecord, "__post_init__")
    slim: dict[str, Any] = {"attributes": {}}
    queued = audit_store._queued(full, slim)
    expected = dataclasses.replace(full, document=slim, opa_result=None)
    for field in _INIT_FIELDS:
        assert getattr(queued, field.name) == getattr(expected, field.name), field.name
    assert queued == expected
    assert full.document == {"a": 1}  # the original is untouched
    assert queued._log_fields is None  # none built yet: none copied
    # The log fields the decision log built travel to the writer thread with the copy.
    built = full.log_fields()
    assert audit_store._queued(full, slim)._log_fields == built


# --- the writer thread's part: the row body, shortcut and slow path -----------------------

VALUE_MAX = config.DEFAULT_AUDIT_VALUE_MAX_BYTES
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNlY3JldA"
GATEWAY_INPUT = build_input(
    check_request(
        path="/api/v1/items/1?page=2",
        headers={
            "x-api-key": "k-1",
            "user-agent": "curl/8.5.0",
            "x-request-id": "f3a9c1d2-4b5e-4f60-8a71-92b3c4d5e6f7",
            "accept": "*/*",
        },
    ),
    config.DEFAULT_CREDENTIAL_HEADERS,
)
EGRESS_INPUT = build_input(
    check_request(
        method="CONNECT",
        path="",
        headers={
            ":authority": "api.example.com:443",
            "proxy-authorization": "Basic dXNlcjpwYXNz",
            "x-sandbox-id": "sbx-1",
        },
    ),
    config.DEFAULT_CREDENTIAL_HEADERS,
)


class _OddKey(str):
    """A str whose str() is another string (_cap_values writes str(key))."""

    __slots__ = ()

    def __str__(self) -> str:
        return "renamed"


def _deep(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


def _many_headers(count: int, size: int) -> dict[str, str]:
    return {f"x-h{i}": "v" * size for i in range(count)}


# (document, record overrides): for each condition of the shortcut a case only it keeps
# right; documents as they reach the writer (slimmed) and as a caller might pass them.
BODY_CASES: list[tuple[Any, dict[str, Any], str]] = [
    (GATEWAY_INPUT, {}, "gateway"),
    (EGRESS_INPUT, {"source": "egress"}, "egress"),
    (None, {}, "no-input"),
    (
        GATEWAY_INPUT,
        {"identity": {"key_id": "k", "role": "r"}, "tier": "t", "cached_from": "d-0"},
        "cache-hit",
    ),
    (GATEWAY_INPUT, {"policy_allowed": None, "error": "opa unreachable"}, "no-policy-result"),
    (_http_document({"path": "/a"}), {}, "plain-path"),
    (_http_document({"path": f"/a?api_key={SECRET}&page=2"}), {}, "secret-in-path"),
    (_http_document({"path": "/a?page=2"}), {}, "query-without-secret"),
    (_http_document({"headers": {":path": f"/a?token={SECRET}"}}), {}, "secret-in-path-header"),
    (_http_document({"headers": {":path": "/a?page=2"}}), {}, "path-header-without-secret"),
    (_http_document({"headers": {"authorization": f"Bearer {SECRET}"}}), {}, "credential-header"),
    (_http_document({"headers": {"authorization": SCHEMED}}), {}, "credential-header-digest"),
    (_http_document({"headers": {"set-cookie": f"s={SECRET}"}}), {}, "set-cookie-header"),
    (_http_document({"headers": {"cookie": f"s={SECRET}"}}), {}, "cookie-header"),
    (
        _http_document({"headerMap": {"headers": [{"key": "Authorization", "value": SECRET}]}}),
        {},
        "credential-in-header-map",
    ),
    (
        _http_document({"headerMap": {"headers": [{"key": "x-api-key", "rawValue": "U0VDUkVU"}]}}),
        {},
        "credential-raw-value-in-header-map",
    ),
    (
        _http_document({"headerMap": {"headers": [{"key": ":path", "rawValue": "L2E/cD0x"}]}}),
        {},
        "raw-path-in-header-map",
    ),
    (
        _http_document({"headerMap": {"headers": [{"key": ":path", "value": "/a?token=t"}]}}),
        {},
        "secret-path-in-header-map",
    ),
    (
        _http_document({"headerMap": {"headers": [{"key": "accept", "value": "*/*"}, "x"]}}),
        {},
        "header-map-without-credentials",
    ),
    (_http_document({"headerMap": "junk"}), {}, "header-map-not-a-dict"),
    (_http_document({"headerMap": {"headers": "junk"}}), {}, "header-map-headers-a-string"),
    (_http_document({"headerMap": {"headers": 7}}), {}, "header-map-headers-a-number"),
    (_http_document({"headerMap": None}), {}, "header-map-null"),
    (_http_document({}, parsed_query={"api_key": [SECRET]}), {}, "secret-in-parsed-query"),
    (_http_document({}, parsed_query={"API_KEY": SECRET}), {}, "secret-in-parsed-query-caps"),
    (_http_document({}, parsed_query={"page": ["2"]}), {}, "parsed-query-without-secret"),
    (_http_document({}, parsed_query=[1]), {}, "parsed-query-not-a-dict"),
    (_http_document({"path": 7, "headers": {":path": 7}}), {}, "paths-not-strings"),
    (_http_document({"headers": ["x-a", "b"]}), {}, "headers-not-a-dict"),
    (["x"], {}, "input-a-list"),
    ({"attributes": ["x"]}, {}, "attributes-not-a-dict"),
    ({"attributes": {"request": "x"}}, {}, "request-not-a-dict"),
    ({"attributes": {"request": {"http": None}}}, {}, "http-null"),
    ({"attributes": {"request": {}}}, {}, "no-http"),
    ({"version": {"ext_authz": "v3"}}, {}, "no-attributes"),
    (_http_document({"headers": {"x-jwt": JWT}}), {}, "jwt-header"),
    (_http_document({"path": f"/a/{JWT}"}), {"path": f"/a/{JWT}"}, "jwt-path"),
    (GATEWAY_INPUT, {"identity": {"sub": JWT, JWT: "k"}}, "jwt-identity"),
    (_http_document({"body": JWT}, parsed_body={"token": JWT}), {}, "jwt-body"),
    (_http_document({"headers": {"x-a": "x" * (VALUE_MAX - 1)}}), {}, "header-under-cap"),
    (_http_document({"headers": {"x-a": "x" * VALUE_MAX}}), {}, "header-at-cap"),
    (_http_document({"headers": {"x-a": "x" * (VALUE_MAX + 1)}}), {}, "header-over-cap"),
    (_http_document({"headers": {"x" * (VALUE_MAX + 1): "a"}}), {}, "header-name-over-cap"),
    (
        _http_document({"headers": {"x" * VALUE_MAX + "1": "a", "x" * VALUE_MAX + "2": "b"}}),
        {},
        "header-names-one-when-cut",
    ),
    (_http_document({"path": "/" + "é" * (VALUE_MAX // 2)}), {}, "2-byte-over-cap"),
    (_http_document({"path": "é" * (VALUE_MAX // 2)}), {}, "2-byte-at-cap"),
    (_http_document({"path": "€" * (VALUE_MAX // 3 + 1)}), {}, "3-byte-over-cap"),
    (_http_document({"path": "😀" * (VALUE_MAX // 4)}), {}, "4-byte-at-cap"),
    (_http_document({"path": "😀" * (VALUE_MAX // 4 + 1)}), {}, "4-byte-over-cap"),
    (_http_document({"path": '"\\\n' * (VALUE_MAX // 3)}), {}, "escapes-near-cap"),
    (GATEWAY_INPUT, {"identity": {"a": "x" * (VALUE_MAX + 1)}}, "identity-over-cap"),
    (_http_document({}, parsed_body=_deep(100, "x")), {}, "deep-nesting"),
    (_http_document({}, parsed_body=_deep(300, "x")), {}, "nesting-beyond-orjson"),
    (_http_document({"body": "x" * 10}, parsed_body={"a": 1}), {}, "body-kept"),
    (_http_document({}, body_omitted=100), {}, "body-omitted"),
    (_http_document({"headers": _many_headers(30, 80)}), {}, "headers-over-quarter"),
    (_http_document({"headers": _many_headers(20, 80)}), {}, "headers-near-quarter"),
    (
        _http_document({"headers": {"x-a": "b"}}, headers_omitted={"count": 2, "bytes": 9}),
        {},
        "headers-omitted-dict",
    ),
    (
        _http_document({"headers": {"x-a": "b"}}, headers_omitted=[["count", 2]]),
        {},
        "omitted-pairs",
    ),
    (_http_document({"headers": {"x-a": "b"}}, headers_omitted="junk"), {}, "omitted-string"),
    (_http_document({"headers": {"x-a": "b"}}, headers_omitted=0), {}, "omitted-falsy"),
    (_http_document({"headers": {"x-a": 1e16, "x-b": [1, 2]}}), {}, "header-values-not-strings"),
    (_http_document({"headers": {"x-a": 1e16 * 7}}, pad="p" * 1800), {}, "non-str-near-quarter"),
    (
        _http_document({"body": "b" * 10}, parsed_body={f"k{i}": "v" * 900 for i in range(8)}),
        {},
        "row-over-budget",
    ),
    (
        _http_document({"headers": _many_headers(20, 90)}, parsed_body=["v" * 900] * 6),
        {},
        "row-just-over-budget",
    ),
    (GATEWAY_INPUT, {"identity": {f"f{i}": "v" * 900 for i in range(10)}}, "fields-over-budget"),
    (_http_document({}, parsed_body={"n": 2**64}), {}, "int-beyond-64-bits"),
    (GATEWAY_INPUT, {"identity": {"n": 2**64}}, "identity-int-beyond-64-bits"),
    (
        _http_document({}, parsed_body={"f": [1.5e308, -0.0, float("nan"), float("inf")]}),
        {},
        "floats",
    ),
    (_http_document({}, parsed_body={1: "a"}), {}, "key-not-a-string"),
    (GATEWAY_INPUT, {"identity": {1: "a"}}, "identity-key-not-a-string"),
    (_http_document({"headers": {_OddKey("x-a"): "b"}}), {}, "key-str-subclass"),
    (_http_document({}, parsed_body=("a", ("b",))), {}, "tuples"),
    (_http_document({"path": "\ud800"}), {}, "lone-surrogate"),
    (_http_document({}, parsed_body={"o": object()}), {}, "not-json"),
    (GATEWAY_INPUT, {"identity": {"o": object()}}, "identity-not-json"),
    (MappingProxyType(GATEWAY_INPUT), {}, "read-only-mapping"),
]


def _body_outcome(make: Callable[[], str]) -> str:
    try:
        return make()
    except Exception as exc:  # both ways must fail alike (_safe_body names the type)
        return type(exc).__name__


@pytest.mark.parametrize(
    "projection",
    [
        audit.Projection(),
        audit.Projection(headers=("host", "x-*"), body_max_bytes=64, value_max_bytes=64),
        audit.Projection(value_max_bytes=512, row_max_bytes=4096),
    ],
    ids=["default", "small-values", "small-rows"],
)
@pytest.mark.parametrize("slimmed", [True, False], ids=["slimmed", "as-given"])
@pytest.mark.parametrize(
    ("document", "overrides"),
    [(doc, over) for doc, over, _ in BODY_CASES],
    ids=[i for _, _, i in BODY_CASES],
)
def test_row_body_shortcut_writes_the_slow_paths_text(
    document: Any, overrides: dict[str, Any], slimmed: bool, projection: audit.Projection
) -> None:
    projector = projection_module._Projector(projection)
    if slimmed and document is not None:
        try:
            document = projector.slim(document)
        except Exception:  # AuditTrail.record stores no input then
            document = None
    base = {"request_id": "r-1", "method": "GET", "path": "/api", "policy_allowed": True}
    fields: dict[str, Any] = base | overrides
    record = DecisionRecord("d-1", T0, "authz/p", True, "allowed", 200, **fields)
    record = audit_store._queued(record, document)
    fast = _body_outcome(lambda: projector.body(record))
    slow = _body_outcome(lambda: projector._body_slow(record))
    assert fast == slow


@pytest.mark.parametrize(
    "document",
    [GATEWAY_INPUT, EGRESS_INPUT, _http_document({"headers": {":path": "/a?page=2"}})],
    ids=["gateway", "egress", "query-without-secret"],
)
def test_row_body_of_an_ordinary_decision_skips_the_slow_path(
    document: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shortcut must be what an ordinary row takes (else the test above proves nothing
    # about what runs): a cache hit's slimmed input, every header kept.
    projector = projection_module._Projector(audit.Projection())
    record = DecisionRecord(
        "d-1", T0, "authz/p", True, "allowed", 200, identity={"key_id": "k"}, tier="t"
    )
    record = audit_store._queued(record, projector.slim(document))
    expected = projector._body_slow(record)

    def refuse(*_: Any) -> str:
        raise AssertionError("slow path taken")

    monkeypatch.setattr(projector, "_body_slow", refuse)
    assert projector.body(record) == expected


@pytest.mark.parametrize("over", [-1, 0, 1], ids=["under", "at", "over"])
@pytest.mark.parametrize("edge", ["row", "headers"])
def test_row_body_shortcut_writes_the_slow_paths_text_at_each_budget(edge: str, over: int) -> None:
    # A row exactly at, one under and one over its budget; headers whose cost is exactly
    # at, under and over a quarter of the row: where the shortcut's own tests turn.
    projection = audit.Projection()
    projector = projection_module._Projector(projection)

    def record_with(pad: int) -> DecisionRecord:
        if edge == "row":
            # eight strings (each under the value cap): the row grows by one per pad byte
            document = _http_document({}, pad=["p" * (pad // 8 + (i < pad % 8)) for i in range(8)])
        else:  # four headers (each under the value cap) costing name + value + 6 each
            size = pad - 4 * 10
            values = ["v" * (size // 4 + (i < size % 4)) for i in range(4)]
            document = _http_document({"headers": {f"x-a{i}": v for i, v in enumerate(values)}})
        record = DecisionRecord("d-1", T0, "authz/p", True, "allowed", 200, document=document)
        return audit_store._queued(record, document)

    if edge == "row":
        budget = projection.row_max_bytes - 200 - len(b"d-1")  # _ROW_OVERHEAD
        pad = budget - len(projector._body_slow(record_with(0))) + over
    else:
        pad = projection.row_max_bytes // 4 + over
    record = record_with(pad)
    slow = projector._body_slow(record)
    assert ("omitted" in slow) == (over > 0)  # the edge is where it was meant to be
    assert projector.body(record) == slow
