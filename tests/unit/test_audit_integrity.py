"""Audit trail integrity claims and memory bounds (found in review).

README: "hash-chained so that any edit, re-ordering or deletion is detectable".
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from authz.runtime import audit
from authz.runtime.audit import AuditTrail, read_entries, verify
from tests.unit.test_audit import decision, wait_until


@pytest.fixture(autouse=True)
def quick_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_FLUSH_S", 0.02)


def _filled(db: Path) -> None:
    trail = AuditTrail(db, retention_days=None, max_records=None)
    for n in range(1, 6):
        trail.record(decision(n))
    trail.admin("set_mode", {"mode": "dry-run", "actor": "alice"}, entry_id="set_mode")
    wait_until(lambda: trail.written >= 6, "6 entries")
    trail.close()


def test_columns_outside_the_hash_cannot_be_edited_undetected(tmp_path: Path) -> None:
    # entry_hash covers seq, prev_hash and body only; kind, time and decision_id are
    # stored beside it and trusted by `audit tail` (kind), `audit replay` (kind =
    # 'decision'), verify's report (decision_id) and retention (time < cutoff). Editing
    # them passes verify: e.g. dating an entry 40 days back makes the next retention
    # pass delete it and move the anchor, erasing it without a trace.
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
    # The writer queue is bounded by count (queue_size=100,000), but each queued
    # DecisionRecord pins its whole input document: request body plus parsed body. For
    # an anonymous request with a 63 KB JSON body (under the gateway's max_request_bytes)
    # that is ~1.6 MB, so a full queue is ~160 GB. The writer needs ~4 ms per such entry
    # (it re-serializes the body twice), slower than authz handles them, so a flood of
    # such requests grows the queue until the process is killed.
    from authz.core.authorizer import Authorizer
    from tests.unit.fakes import FakeEngine, bytes_retained_per_check

    monkeypatch.setattr(audit, "_FLUSH_S", 3.0)  # a slow disk: the writer is behind
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
        monkeypatch.setattr(audit, "_FLUSH_S", 0.02)
    projected_gb = per_entry * 100_000 / 1e9  # AuditTrail's default queue_size
    try:
        assert projected_gb < 2.0, f"a full audit queue would pin {projected_gb:.0f} GB"
    finally:
        trail.close(timeout_s=60)
