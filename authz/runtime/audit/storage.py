"""Where the audit chain is kept: the storage Protocol the writer (:class:`AuditTrail
<authz.runtime.audit.store.AuditTrail>`) appends through, and its SQLite implementation.

The chain logic (hashing, gap entries, anchor moves, degradation) lives in the writer,
once; a storage only gives it transactions with a few primitive operations on one chain
(:class:`AuditTxn`) and keeps its own byte bound. The PostgreSQL implementation, one
chain per replica in a shared schema, is :mod:`authz.runtime.audit.postgres`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from authz.core.errors import ConfigError
from authz.runtime.audit.chain import _MIB, _meta, _set_meta, connect

__all__ = [
    "AuditStorage",
    "AuditTxn",
    "Row",
    "SqliteStorage",
    "batch_bytes_for",
    "check_max_bytes",
]

log = logging.getLogger(__name__)

# A row as stored: (seq, kind, time, decision_id, body, prev_hash, hash).
Row = tuple[int, str, float, str, str, str, str]
# A batch is also cut at this many (charged) bytes: one transaction's share of the WAL.
BATCH_BYTES: Final = 4 * 1024 * 1024
# The -shm file (32 KiB per 4096 WAL frames' index) and what else the bound leaves room for.
_SHM_RESERVE: Final = 64 * 1024


def check_max_bytes(max_bytes: int | None) -> None:
    """Raise ConfigError unless ``max_bytes`` is None or at least 1 MiB."""
    if max_bytes is not None and max_bytes < _MIB:
        raise ConfigError(f"audit max_bytes={max_bytes}: expected at least {_MIB}")


def batch_bytes_for(max_bytes: int | None) -> int:
    """The writer's batch cut in charged bytes: :data:`BATCH_BYTES`, at most 1/32 of the
    store's bound (so two batches past a check stay a small part of it)."""
    return BATCH_BYTES if max_bytes is None else min(BATCH_BYTES, max_bytes // 32)


class AuditTxn(Protocol):
    """One write transaction on one chain (what the writer needs of a store)."""

    def meta(self, key: str) -> dict[str, Any] | None:
        """The chain's meta value ``key`` (``head``, ``anchor``, ``anchor_moves``) or None."""
        ...

    def set_meta(self, key: str, value: Mapping[str, Any]) -> None:
        """Set the chain's meta value ``key``."""
        ...

    def insert(self, rows: list[Row]) -> None:
        """Insert ``rows`` (already chained and hashed) into the chain."""
        ...

    def last_seq_before(self, when: float) -> int:
        """The highest seq of an entry older than ``when`` (Unix seconds); 0 if none."""
        ...

    def last_through(self, seq: int) -> tuple[int, str] | None:
        """``(seq, hash)`` of the newest entry at or before ``seq``, or None."""
        ...

    def delete_through(self, seq: int) -> int:
        """Delete the entries up to ``seq``; the number deleted."""
        ...


class AuditStorage(Protocol):
    """A place one audit chain is appended to. ``label`` names it in logs (a file path,
    or a URL with its password masked); ``errors`` are the exceptions its operations
    raise when it cannot be used right now (the writer degrades to log-only on them);
    ``batch_bytes`` is where the writer cuts a batch (charged bytes)."""

    label: str
    errors: tuple[type[Exception], ...]
    batch_bytes: int

    @property
    def replica(self) -> str | None:
        """The chain's replica, hashed into every entry (None: SQLite's one chain)."""
        ...

    def read_meta(self, key: str) -> dict[str, Any] | None:
        """The chain's meta value ``key``, read outside a write transaction."""
        ...

    def transaction(self) -> contextlib.AbstractContextManager[AuditTxn]:
        """A write transaction holding the chain's write lock; committed when the block
        ends, rolled back when it raises."""
        ...

    def before_write(self) -> None:
        """Called before each batch; raises one of ``errors`` when a write now would
        break the store's byte bound."""
        ...

    def bound(self, prune: Callable[[int, int], None]) -> None:
        """Called after each batch: when the chain outgrows its byte bound, call
        ``prune(excess_bytes, used_bytes)`` (the writer moves the anchor) and give back
        what the store can. Never raises."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


class _SqliteTxn:
    """:class:`AuditTxn` on an open SQLite transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def meta(self, key: str) -> dict[str, Any] | None:
        return _meta(self._conn, key)

    def set_meta(self, key: str, value: Mapping[str, Any]) -> None:
        _set_meta(self._conn, key, value)

    def insert(self, rows: list[Row]) -> None:
        self._conn.executemany(
            "INSERT INTO audit (seq, kind, time, decision_id, body, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def last_seq_before(self, when: float) -> int:
        row = self._conn.execute("SELECT MAX(seq) FROM audit WHERE time < ?", (when,)).fetchone()
        return int(row[0] or 0)

    def last_through(self, seq: int) -> tuple[int, str] | None:
        row = self._conn.execute(
            "SELECT seq, hash FROM audit WHERE seq <= ? ORDER BY seq DESC LIMIT 1", (seq,)
        ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def delete_through(self, seq: int) -> int:
        return int(self._conn.execute("DELETE FROM audit WHERE seq <= ?", (seq,)).rowcount)


class SqliteStorage:
    """:class:`AuditStorage` in the SQLite file at ``path`` (mode 0600, WAL journal; see
    :mod:`authz.runtime.audit`). ``max_bytes`` bounds the database, its WAL and
    shared-memory file together (None: unbounded). Raises ConfigError naming the file
    when it cannot be opened."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    replica: str | None = None

    def __init__(self, path: Path, max_bytes: int | None) -> None:
        check_max_bytes(max_bytes)
        self.path = path
        self.label = str(path)
        self._max_bytes = max_bytes
        self.batch_bytes = batch_bytes_for(max_bytes)
        self._wal_limit = self._data_budget = 0
        if max_bytes is not None:
            # Room for the WAL and two batches past a check; the rows get the rest.
            self._wal_limit = min(max(max_bytes // 8, 256 * 1024), 64 * _MIB)
            self._data_budget = max_bytes - self._wal_limit - 2 * self.batch_bytes - _SHM_RESERVE
        self._vacuum_warned = False
        try:
            self.conn = connect(path)
            if max_bytes is not None:
                # A checkpoint once the WAL holds half its room; the WAL file is cut
                # back to that size after it (SQLite's journal_size_limit).
                page_size = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
                half = self._wal_limit // 2
                self.conn.execute(f"PRAGMA wal_autocheckpoint={max(8, half // page_size)}")
                self.conn.execute(f"PRAGMA journal_size_limit={half}")
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"audit database {str(path)!r}: {exc}") from None

    def read_meta(self, key: str) -> dict[str, Any] | None:
        return _meta(self.conn, key)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[AuditTxn]:
        conn = self.conn
        try:
            with conn:  # one transaction
                conn.execute("BEGIN IMMEDIATE")
                yield _SqliteTxn(conn)
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.conn.close()

    # -- the byte bound ------------------------------------------------------------------
    def _wal_bytes(self) -> int:
        try:
            return os.path.getsize(f"{self.path}-wal")
        except OSError:
            return 0

    def before_write(self) -> None:
        """A WAL past its room (a long reader held off checkpoints) is checkpointed and
        cut back; if it cannot be, the write fails (degraded, then a gap entry) rather
        than the store outgrowing ``max_bytes``."""
        if self._max_bytes is None or self._wal_bytes() <= self._wal_limit:
            return
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if self._wal_bytes() > self._wal_limit:
            raise sqlite3.OperationalError(
                f"audit WAL over its {self._wal_limit} bytes (a reader holds it): not writing"
            )

    def _pages(self) -> tuple[int, int, int]:
        """``(page_size, page_count, freelist_count)`` of the database."""
        size, count, free = (
            int(self.conn.execute(f"PRAGMA {name}").fetchone()[0])
            for name in ("page_size", "page_count", "freelist_count")
        )
        return size, count, free

    def bound(self, prune: Callable[[int, int], None]) -> None:
        """Prune the oldest rows when the rows' pages outgrow their share of
        ``max_bytes`` (down to 90% of it), give back free pages of a file over the bound,
        and checkpoint a WAL past half its room."""
        if self._max_bytes is None:
            return
        try:
            page_size, pages, free = self._pages()
            used = (pages - free) * page_size
            if used > self._data_budget:
                prune(used - self._data_budget * 9 // 10, used)
                page_size, pages, free = self._pages()
            if pages * page_size + self._wal_bytes() > self._max_bytes and free:
                self._give_back(free)
            if self._wal_bytes() > self._wal_limit // 2:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("audit byte bound not enforced", extra={"error": str(exc)})

    def _give_back(self, free: int) -> None:
        """Return free pages to the filesystem, a batch's worth at a time (a store made
        under a larger bound); only an ``auto_vacuum=INCREMENTAL`` file can."""
        if int(self.conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2:
            page_size = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
            pages = min(free, max(1, self.batch_bytes // page_size))
            self.conn.execute(f"PRAGMA incremental_vacuum({pages})")
        elif not self._vacuum_warned:
            self._vacuum_warned = True
            log.warning(
                "audit database larger than AUTHZ_AUDIT_MAX_BYTES and made without "
                "auto_vacuum: its free pages are reused, not given back (VACUUM it offline)",
                extra={"audit_db": self.label, "max_bytes": self._max_bytes},
            )
