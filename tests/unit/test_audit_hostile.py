"""authz.audit under hostile callers (issue #13, findings 4 and 9): the database file is
owner-only, the writer drains a backlog without sleeping and bounds its queue in bytes,
rows are a size-capped projection of the request, the store is bounded in bytes, and an
anchor moved by hand is caught by ``verify``."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz import audit
from authz.audit import AuditTrail
from tests.unit.test_audit import decision, wait_until


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
