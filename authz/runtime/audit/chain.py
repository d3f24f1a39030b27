"""The audit store's chain: the schema, the entry hash, the entry and connections.

See :mod:`authz.runtime.audit` for the chain's format and guarantees.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

__all__ = [
    "GENESIS",
    "VOLUME_HEADROOM_BYTES",
    "AuditEntry",
    "connect",
    "entry_hash",
    "volume_bytes",
]

log = logging.getLogger(__name__)


_MIB: Final = 1024 * 1024
# What the store's volume needs beyond max_bytes: a batch written past the last check,
# the overrides file beside the database, slack for the filesystem.
VOLUME_HEADROOM_BYTES: Final = 64 * _MIB
GENESIS: Final = "0" * 64
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    decision_id TEXT NOT NULL,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_time ON audit (time);
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def entry_hash(
    seq: int,
    prev_hash: str,
    kind: str,
    when: float,
    decision_id: str,
    body: str,
    *,
    replica: str | None = None,
) -> str:
    """The chain hash of one entry: hex SHA-256 over every column of the row (``seq``,
    ``prev_hash``, ``kind``, ``time`` as ``repr``, ``decision_id``, ``body``), so no
    column can be edited without breaking the chain. A row of a replica's chain in
    PostgreSQL also has a ``replica`` column: it comes first, ``"<replica>\\n"``, so a
    chain cannot be relabelled as another replica's."""
    text = f"{seq}\n{prev_hash}\n{kind}\n{when!r}\n{decision_id}\n{body}"
    if replica is not None:
        text = f"{replica}\n{text}"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One stored entry; ``body`` is the decoded JSON; ``replica`` names the chain of a
    PostgreSQL store (None in SQLite: one chain)."""

    seq: int
    kind: str
    time: float
    decision_id: str
    body: Mapping[str, Any]
    prev_hash: str
    hash: str
    replica: str | None = None


def _owner_only(path: Path) -> None:
    """Create ``path`` mode 0600 if missing, and make it (and an existing ``-wal``/``-shm``)
    0600: decisions name keys, sandboxes and request paths. SQLite's unix VFS creates the
    ``-wal`` and ``-shm`` files with the database file's permissions (``robust_open`` /
    ``findCreateFileMode`` in ``os_unix.c``), so the database's mode carries over."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)


def volume_bytes(max_bytes: int) -> int:
    """Bytes a volume holding an audit store bounded at ``max_bytes`` needs:
    ``max_bytes`` plus :data:`VOLUME_HEADROOM_BYTES`. The Kubernetes manifest's data
    volume is sized with this (checked by ``tests/infra/test_audit_volume.py``)."""
    return max_bytes + VOLUME_HEADROOM_BYTES


def connect(path: Path, *, timeout_s: float = 0.5) -> sqlite3.Connection:
    """Open (creating if needed, mode 0600) the audit database at ``path``: WAL journal,
    the schema applied. Raises sqlite3.Error / OSError when it cannot be opened."""
    _owner_only(path)
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    try:
        # Before the first table: lets a store over its byte bound give free pages back
        # (incremental_vacuum); a no-op on an existing file.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        # Deleted rows are zeroed within their pages but freed pages are not rewritten: a
        # prune does not copy the pruned bytes into the WAL (SQLite's "secure_delete").
        conn.execute("PRAGMA secure_delete=FAST")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
    except BaseException:
        # Closed here, not left to the garbage collector (a ResourceWarning on 3.13+).
        conn.close()
        raise
    return conn


def _meta(conn: sqlite3.Connection, key: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT value FROM audit_meta WHERE key = ?", (key,)).fetchone()
    return orjson.loads(row[0]) if row else None


def _set_meta(conn: sqlite3.Connection, key: str, value: Mapping[str, Any]) -> None:
    conn.execute(
        "INSERT INTO audit_meta (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, orjson.dumps(value).decode()),
    )
