"""Reading the audit store and verifying its chain, head and anchor moves."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from authz.core.errors import DataFileError
from authz.runtime.audit.chain import GENESIS, AuditEntry, _meta, entry_hash

__all__ = [
    "ChainSource",
    "VerifyReport",
    "read_entries",
    "read_last_seen",
    "verify",
]

log = logging.getLogger(__name__)


# -- reading, verifying ---------------------------------------------------------------


def read_entries(
    conn: sqlite3.Connection, *, last: int | None = None, kind: str | None = None
) -> Iterator[AuditEntry]:
    """Entries in ``seq`` order (only the ``last`` N when given; only ``kind`` when
    given). Raises DataFileError naming the row when a body is not JSON (an edited store:
    :func:`verify` reports the same row as a broken chain)."""
    # Fixed statements only: the optional filters are bound parameters.
    if last is not None:
        sql = (
            "SELECT * FROM (SELECT seq, kind, time, decision_id, body, prev_hash, hash FROM audit "
            "WHERE (? IS NULL OR kind = ?) ORDER BY seq DESC LIMIT ?) ORDER BY seq"
        )
        args: tuple[Any, ...] = (kind, kind, last)
    else:
        sql = (
            "SELECT seq, kind, time, decision_id, body, prev_hash, hash FROM audit "
            "WHERE (? IS NULL OR kind = ?) ORDER BY seq"
        )
        args = (kind, kind)
    for seq, entry_kind, when, decision_id, body, prev_hash, digest in conn.execute(sql, args):
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise DataFileError(f"audit entry {seq}: body is not JSON") from None
        yield AuditEntry(seq, entry_kind, when, decision_id, decoded, prev_hash, digest)


# One pass over the trail: the newest decision per key id. json_valid guards the few rows
# an attacker (or a bug) may have left unparseable; verify reports those separately.
_LAST_SEEN_SQL: Final = """
SELECT json_extract(CASE WHEN json_valid(body) THEN body END, '$.key_id') AS key_id,
       max(time)
FROM audit
WHERE kind = 'decision'
GROUP BY 1
HAVING key_id IS NOT NULL
"""


def read_last_seen(path: Path, *, timeout_s: float = 5.0) -> dict[str, float]:
    """Key id -> Unix seconds of the newest ``decision`` entry naming it (``key_id`` of
    the decision body), from the audit database at ``path``.

    Opens the database read-only (``mode=ro``): the running writer is not disturbed and
    the file is never created or changed. Waits up to ``timeout_s`` for a lock. Raises
    DataFileError naming the file when it is missing, not SQLite, or has no audit table.
    """
    if not path.is_file():
        raise DataFileError(f"{path}: no audit database")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=timeout_s)
        try:
            rows = conn.execute(_LAST_SEEN_SQL).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise DataFileError(f"{path}: cannot read the audit trail: {exc}") from None
    return {key_id: float(when) for key_id, when in rows if isinstance(key_id, str)}


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of :func:`verify`. When ``ok`` is false, ``broken_seq`` (and its
    ``broken_decision_id``) name the first bad entry and ``problem`` says what is wrong.
    ``replica`` names the chain in a PostgreSQL store (None for SQLite's one chain)."""

    ok: bool
    entries: int
    first_seq: int | None
    last_seq: int | None
    broken_seq: int | None = None
    broken_decision_id: str | None = None
    problem: str | None = None
    replica: str | None = None


class ChainSource(Protocol):
    """One chain as :func:`verify` reads it (a SQLite file's, or a replica's in
    PostgreSQL, :class:`authz.runtime.audit.postgres.PostgresChain`)."""

    @property
    def replica(self) -> str | None:
        """The replica whose chain this is (None: SQLite's one chain)."""
        ...

    def meta(self, key: str) -> dict[str, Any] | None:
        """The chain's meta value ``key`` (``head``, ``anchor``) or None."""
        ...

    def rows(self) -> Iterable[tuple[Any, ...]]:
        """``(seq, kind, time, decision_id, body, prev_hash, hash, derived)`` in seq
        order; ``derived`` holds the row's columns copied from its body."""
        ...

    def hash_at(self, seq: int) -> str | None:
        """The hash of entry ``seq``, or None when it is not stored."""
        ...

    def derived(self, body: str) -> tuple[Any, ...]:
        """What the ``derived`` columns of a row with ``body`` must hold."""
        ...


class _SqliteChain:
    """:class:`ChainSource` over a SQLite audit database (no derived columns)."""

    replica: str | None = None

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def meta(self, key: str) -> dict[str, Any] | None:
        return _meta(self._conn, key)

    def rows(self) -> Iterator[tuple[Any, ...]]:
        for row in self._conn.execute(
            "SELECT seq, kind, time, decision_id, body, prev_hash, hash FROM audit ORDER BY seq"
        ):
            yield (*row, ())

    def hash_at(self, seq: int) -> str | None:
        row = self._conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
        return str(row[0]) if row else None

    def derived(self, body: str) -> tuple[Any, ...]:
        return ()


def verify(
    conn: sqlite3.Connection | ChainSource, *, head: tuple[int, str] | None = None
) -> VerifyReport:
    """Walk the chain from the anchor (or genesis) to the recorded head; report the first
    entry whose seq, link or hash is wrong, or a head that does not match the last entry
    (a truncated or extended tail). ``head`` is ``(seq, hash)`` recorded elsewhere (an
    ``audit head`` log line): the chain must still hold that entry with that hash.
    ``conn`` is a SQLite audit database or one replica's chain (:class:`ChainSource`);
    the report names that replica."""
    source: ChainSource = _SqliteChain(conn) if isinstance(conn, sqlite3.Connection) else conn
    replica = source.replica
    report = _verify(source, replica, head)
    return report if replica is None else _with_replica(report, replica)


def _with_replica(report: VerifyReport, replica: str) -> VerifyReport:
    return VerifyReport(
        report.ok,
        report.entries,
        report.first_seq,
        report.last_seq,
        report.broken_seq,
        report.broken_decision_id,
        report.problem,
        replica,
    )


def _verify(source: ChainSource, replica: str | None, head: tuple[int, str] | None) -> VerifyReport:
    anchor = source.meta("anchor")
    stored = source.meta("head")
    expected_seq = int(anchor["seq"]) + 1 if anchor else 1
    prev = str(anchor["hash"]) if anchor else GENESIS
    count, first, last = 0, None, None
    head_seq = int(stored["seq"]) if stored is not None else None
    last_move: tuple[int, Any] | None = None  # (seq, body["to"]) of the newest anchor entry
    for seq, kind, when, decision_id, body, prev_hash, digest, derived in source.rows():
        first = first if first is not None else seq
        problem = None
        if seq != expected_seq:
            problem = f"expected entry {expected_seq} here: entries are missing"
        elif prev_hash != prev:
            problem = "prev_hash does not match the previous entry's hash"
        elif entry_hash(seq, prev_hash, kind, when, decision_id, body, replica=replica) != digest:
            problem = "hash does not match the entry's contents (edited)"
        elif tuple(derived) != source.derived(body):
            problem = "indexed columns (key_id, sandbox_id) do not match the entry's body (edited)"
        elif head_seq is not None and seq > head_seq:
            problem = f"entry is past the recorded head ({head_seq}): entries were added"
        elif kind == "anchor":
            problem = _move_problem(seq, body, last_move)
            last_move = (seq, orjson.loads(body)["to"]) if problem is None else last_move
        if problem is not None:
            return VerifyReport(False, count, first, last, seq, decision_id, problem)
        prev, expected_seq, last, count = digest, seq + 1, seq, count + 1
    problem = _anchor_problem(anchor, last_move)
    if problem is not None:
        at = int(anchor["seq"]) if anchor else None
        return VerifyReport(False, count, first, last, at, None, problem)
    # The chain must end exactly at the head (or at the anchor, when retention pruned all).
    end_seq = expected_seq - 1
    if head is not None:
        problem = _external_head_problem(source, head, end_seq)
        if problem is not None:
            return VerifyReport(False, count, first, last, head[0], None, problem)
    if stored is not None and (head_seq != end_seq or stored["hash"] != prev):
        return VerifyReport(
            False,
            count,
            first,
            last,
            head_seq,
            None,
            f"the head records entry {head_seq} but the chain ends at {end_seq}: "
            "entries were removed from the end",
        )
    return VerifyReport(True, count, first, last)


def _move_problem(seq: int, body: str, last_move: tuple[int, Any] | None) -> str | None:
    """Why the ``anchor`` entry ``seq`` is not a valid next anchor move, or None. A move
    goes forward, to an entry before its own, from where the previous move went (the
    first surviving move may come from anywhere: earlier moves were pruned with it)."""
    try:
        move = orjson.loads(body)
        to, source = move["to"], move["from"]
        to_seq = int(to["seq"])
        ok = isinstance(to["hash"], str) and (source is None or isinstance(source, dict))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return "anchor move entry is malformed"
    if not ok or not 0 < to_seq < seq:
        return "anchor move entry is malformed"
    if last_move is not None and source != last_move[1]:
        return (
            f"anchor move does not start where the move in entry {last_move[0]} "
            f"ended (entry {last_move[1].get('seq')})"
        )
    if source is not None and int(source.get("seq", -1)) >= to_seq:
        return "anchor move does not go forward"
    return None


def _anchor_problem(
    anchor: Mapping[str, Any] | None, last_move: tuple[int, Any] | None
) -> str | None:
    """Why the stored anchor is not where the recorded anchor moves put it, or None."""
    if anchor is None:
        return None  # nothing pruned: the chain must start at entry 1 (checked above)
    stored = {"seq": int(anchor["seq"]), "hash": str(anchor["hash"])}
    if last_move is None:
        return (
            f"the anchor is at entry {stored['seq']} but no anchor move is recorded: "
            "the oldest entries were deleted and the anchor moved by hand"
        )
    if last_move[1] != stored:
        return (
            f"the anchor is at entry {stored['seq']} but the last recorded anchor move "
            f"(entry {last_move[0]}) moved it to entry {last_move[1].get('seq')}: the "
            "oldest entries were deleted and the anchor moved by hand"
        )
    return None


def _external_head_problem(source: ChainSource, head: tuple[int, str], end_seq: int) -> str | None:
    """Why the chain does not hold the externally recorded ``head``, or None."""
    seq, digest = head
    if seq > end_seq:
        return (
            f"the recorded head is entry {seq} but the chain ends at {end_seq}: entries "
            "were removed from the end (and the head rewritten)"
        )
    stored = source.hash_at(seq)
    if stored is None:
        anchor = source.meta("anchor")
        if anchor and int(anchor["seq"]) == seq and anchor["hash"] == digest:
            return None  # pruned by retention, and the anchor vouches for it
        return f"entry {seq} of the recorded head is no longer in the chain"
    if stored != digest:
        return f"entry {seq} does not have the recorded head's hash: the chain was rewritten"
    return None
