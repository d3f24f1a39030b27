"""authz.runtime.audit under hostile callers (issue #13, findings 4 and 9): the database file is
owner-only, the writer drains a backlog without sleeping and bounds its queue in bytes,
rows are a size-capped projection of the request, the store is bounded in bytes, and an
anchor moved by hand is caught by ``verify``."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sqlite3
import stat
import string
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from authz.core.errors import ConfigError
from authz.core.input import build_input
from authz.core.record import DecisionRecord
from authz.runtime import audit, config
from authz.runtime.audit import AuditTrail, read_entries, verify
from authz.tools.cli import main
from tests.unit.fakes import ManualClock, check_request
from tests.unit.test_audit import decision, reader, wait_until


@pytest.fixture(autouse=True)
def quick_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_FLUSH_S", 0.02)


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


# --- finding 4: the database file is 0600 ---------------------------------------------------


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


# --- finding 9: the writer drains a backlog without sleeping; its queue is bounded in bytes --


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
    backlog = 4 * audit._BATCH
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
    assert sleeps == [audit._FLUSH_S]
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


# --- finding 9: anchor moves are recorded, logged and checked -----------------------------


def _prune_now(trail: AuditTrail, clock: ManualClock) -> None:
    """Move the writer's clock past its pruning interval and wait for a pruning pass."""
    before = trail.prunes
    clock.now += 61
    wait_until(lambda: trail.prunes > before, "a pruning pass")


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
    clock = ManualClock(30.0)
    trail = AuditTrail(db, retention_days=None, max_records=8, clock=clock)
    try:
        for n in range(1, 11):
            trail.record(decision(n))
        wait_until(lambda: trail.written >= 10, "10 entries written")
        if pruned_before:
            _prune_now(trail, clock)
    finally:
        trail.close()
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


# --- finding 4: an audit row is a size-capped projection of the request -------------------

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


def test_row_for_huge_headers_and_body_stays_under_the_row_cap(tmp_path: Path) -> None:
    record, body_size = _hostile_record(random.Random(13))  # noqa: S311 (test data)
    db = tmp_path / "audit.db"
    trail = AuditTrail(db, retention_days=None, max_records=None)
    try:
        trail.record(record)
        wait_until(lambda: trail.written >= 1, "the entry written")
    finally:
        trail.close()
    size, body, text = _stored_row(db)
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
    db = tmp_path / "audit.db"
    trail = AuditTrail(db, retention_days=None, max_records=None)
    try:
        trail.record(decision(1, document=document))
        wait_until(lambda: trail.written >= 1, "the entry written")
    finally:
        trail.close()
    size, body, text = _stored_row(db)
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
    db = tmp_path / "audit.db"
    trail = AuditTrail(db, retention_days=None, max_records=None)
    try:
        trail.record(_record_for(**parts))
        wait_until(lambda: trail.written >= 1, "the entry written")
    finally:
        trail.close()
    size, body, _ = _stored_row(db)
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
    db = tmp_path / "audit.db"
    trail = AuditTrail(db, retention_days=None, max_records=None)
    try:
        trail.record(decision(1, document=document))
        wait_until(lambda: trail.written >= 1, "the entry written")
    finally:
        trail.close()
    _, body, text = _stored_row(db)
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


# --- finding 4: the store is bounded in bytes, WAL included --------------------------------


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
    clock = ManualClock(30.0)
    trail = AuditTrail(db, retention_days=None, max_records=5, clock=clock)
    try:
        for n in range(1, 11):
            trail.record(decision(n))
        wait_until(lambda: trail.written >= 10, "10 entries written")
        _prune_now(trail, clock)
    finally:
        trail.close()
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
    clock = ManualClock(30.0)
    trail = AuditTrail(db, retention_days=None, max_records=5, clock=clock)
    try:
        for n in range(1, 11):
            trail.record(decision(n))
        wait_until(lambda: trail.written >= 10, "10 entries written")
        _prune_now(trail, clock)
    finally:
        trail.close()
    capsys.readouterr()
    assert main(["audit", "--db", str(db), "tail", "--kind", "anchor"]) == 0
    lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["kind"], line["from"]["seq"], line["to"]["seq"]) for line in lines] == [
        ("anchor", 0, 6)
    ]
