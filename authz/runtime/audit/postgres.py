"""The fleet audit store: every replica's hash chain in one PostgreSQL schema.

``AUTHZ_AUDIT_URL=postgresql://...`` makes the audit writer append through
:class:`PostgresStorage` instead of the SQLite file. Each replica (``AUTHZ_REPLICA_ID``)
keeps its own chain, exactly the SQLite chain of :mod:`authz.runtime.audit` (seq 1, 2, 3,
... per replica, head, anchor moves, gap entries), with two differences:

- every row has a ``replica`` column, and the hash covers it first::

      hash = sha256("<replica>\\n<seq>\\n<prev_hash>\\n<kind>\\n<time>\\n<decision_id>\\n<body>")

- two more columns, ``key_id`` and ``sandbox_id``, copy those fields of the body (a string
  of at most :data:`INDEXED_MAX_CHARS` characters without NUL, else NULL) so an auditor's
  queries by key or sandbox use an index; :func:`authz.runtime.audit.verify` recomputes
  them from the hashed body, so an edited copy is a broken chain like an edited column.

Schema (created, and migrated, at start under an advisory lock, so replicas starting
together do not race; ``audit_schema`` holds its version)::

    audit (replica, seq, kind, time, decision_id, body, prev_hash, hash, key_id, sandbox_id)
        PRIMARY KEY (replica, seq); indexes on time, (replica, time), (key_id, time),
        (sandbox_id, time), decision_id
    audit_meta (replica, key, value)   -- head, anchor, anchor_moves, bytes; per replica

The body is ``text``, not ``jsonb``: the hash is over its exact bytes, and PostgreSQL's
``jsonb`` rewrites them (and refuses ``\\u0000``). The writer runs on the trail's own
thread with psycopg's blocking connection, so the event loop never waits for the database;
when the database is unreachable the trail degrades to log-only and writes a ``gap`` entry
once it is back (a reconnect is tried at most every :data:`RECONNECT_S` seconds).
``max_bytes`` bounds one replica's rows (body and decision id plus
:data:`ROW_OVERHEAD_BYTES` for the other columns and index entries, counted in
``audit_meta``), not the database's files: size the volume for the replicas.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
import psycopg

from authz.core.errors import ConfigError, DataFileError
from authz.core.secret import MASK, Secret
from authz.runtime.audit.chain import AuditEntry
from authz.runtime.audit.storage import AuditTxn, Row, batch_bytes_for, check_max_bytes
from authz.runtime.config import REPLICA_ID_RE

__all__ = [
    "INDEXED_MAX_CHARS",
    "RECONNECT_S",
    "ROW_OVERHEAD_BYTES",
    "PostgresChain",
    "PostgresStorage",
    "indexed_columns",
    "mask_url",
    "open_reader",
    "read_entries",
    "read_last_seen",
    "replicas",
]

log = logging.getLogger(__name__)

INDEXED_MAX_CHARS: Final = 256
RECONNECT_S: Final = 1.0
# Per row beyond body and decision id: replica, seq, kind, time, two 64-hex hashes, the
# indexed copies, the tuple header and the entries in six indexes.
ROW_OVERHEAD_BYTES: Final = 400
_CONNECT_TIMEOUT_S: Final = 3
# A statement (a batch insert) that takes longer than this fails: degraded, not stuck.
_STATEMENT_TIMEOUT_MS: Final = 10_000
# pg_advisory_xact_lock(int4, int4) namespace: "authz audit".
_LOCK_NS: Final = 0x61756474
_SCHEMA_LOCK: Final = 0
_MIGRATIONS: Final = (
    # 1: the chains, their meta, the auditor's indexes.
    (
        """CREATE TABLE IF NOT EXISTS audit (
            replica TEXT NOT NULL,
            seq BIGINT NOT NULL,
            kind TEXT NOT NULL,
            time DOUBLE PRECISION NOT NULL,
            decision_id TEXT NOT NULL,
            body TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL,
            key_id TEXT,
            sandbox_id TEXT,
            PRIMARY KEY (replica, seq)
        )""",
        "CREATE INDEX IF NOT EXISTS audit_time ON audit (time)",
        "CREATE INDEX IF NOT EXISTS audit_replica_time ON audit (replica, time)",
        "CREATE INDEX IF NOT EXISTS audit_key_id ON audit (key_id, time) WHERE key_id IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS audit_sandbox_id ON audit (sandbox_id, time) "
        "WHERE sandbox_id IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS audit_decision_id ON audit (decision_id)",
        """CREATE TABLE IF NOT EXISTS audit_meta (
            replica TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (replica, key)
        )""",
    ),
)
# Fixed statements only: every value is a bound parameter.
_COPY: Final = (
    "COPY audit (replica, seq, kind, time, decision_id, body, prev_hash, hash, key_id, "
    "sandbox_id) FROM STDIN"
)
_CHAIN_ROWS: Final = (
    "SELECT seq, kind, time, decision_id, body, prev_hash, hash, key_id, sandbox_id "
    "FROM audit WHERE replica = %s ORDER BY seq"
)
_ENTRIES: Final = (
    "SELECT replica, seq, kind, time, decision_id, body, prev_hash, hash FROM audit "
    "WHERE (%s::text IS NULL OR kind = %s) ORDER BY time, replica, seq"
)
_LAST_ENTRIES: Final = (
    "SELECT * FROM (SELECT replica, seq, kind, time, decision_id, body, prev_hash, hash "
    "FROM audit WHERE (%s::text IS NULL OR kind = %s) "
    "ORDER BY time DESC, replica DESC, seq DESC LIMIT %s) AS newest "
    "ORDER BY time, replica, seq"
)


def mask_url(url: str) -> str:
    """``url`` for logs and messages: the password replaced by the mask, the query (it may
    hold ``password=``) dropped; ``postgresql://<redacted>`` when it does not parse."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        user = parts.username or ""
    except ValueError:
        return "postgresql://<redacted>"
    auth = f"{user}:{MASK}@" if parts.password is not None else (f"{user}@" if user else "")
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{auth}{host}{port}{parts.path}"


def _scrub(text: str, url: Secret) -> str:
    """``text`` (an error message) without the URL or its password, should libpq quote them."""
    secret = url.reveal()
    text = text.replace(secret, mask_url(secret))
    with contextlib.suppress(ValueError):
        password = urlsplit(secret).password
        if password:
            text = text.replace(password, MASK)
    return text


def indexed_columns(body: str) -> tuple[str | None, str | None]:
    """``(key_id, sandbox_id)`` of an entry's body (JSON text), as stored in the indexed
    columns: each a string of at most :data:`INDEXED_MAX_CHARS` characters without NUL
    (PostgreSQL text cannot hold one), else None."""
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(decoded, dict):
        return None, None

    def pick(name: str) -> str | None:
        value = decoded.get(name)
        ok = isinstance(value, str) and len(value) <= INDEXED_MAX_CHARS and "\0" not in value
        return value if ok else None

    return pick("key_id"), pick("sandbox_id")


def _connect(url: Secret, *, read_only: bool = False) -> psycopg.Connection[Any]:
    conn = psycopg.connect(
        url.reveal(),
        autocommit=not read_only,
        connect_timeout=_CONNECT_TIMEOUT_S,
        options=f"-c statement_timeout={_STATEMENT_TIMEOUT_MS}" if not read_only else None,
        # A peer that vanished (not refused) is noticed in seconds, not at TCP's timeout.
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
        tcp_user_timeout=_STATEMENT_TIMEOUT_MS,
        application_name="authz-audit",
    )
    if read_only:
        # One snapshot for a whole verify or tail: a writer appending meanwhile is not a
        # "broken" chain; and the tools never write.
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
    return conn


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Create or migrate the schema to the newest version under an advisory lock (safe
    when several replicas start at once); returns the version. ``conn`` is autocommit."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NS, _SCHEMA_LOCK))
        conn.execute("CREATE TABLE IF NOT EXISTS audit_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM audit_schema").fetchone()
        version = int(row[0]) if row and row[0] is not None else 0
        for number, statements in enumerate(_MIGRATIONS, start=1):
            if number <= version:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO audit_schema (version) VALUES (%s)", (number,))
            version = number
    return version


class _PgTxn:
    """:class:`~authz.runtime.audit.storage.AuditTxn` on one replica's chain inside an
    open transaction holding the replica's advisory lock."""

    def __init__(self, conn: psycopg.Connection[Any], replica: str) -> None:
        self._conn = conn
        self._replica = replica
        self.bytes_delta = 0

    def meta(self, key: str) -> dict[str, Any] | None:
        return _meta(self._conn, self._replica, key)

    def set_meta(self, key: str, value: Mapping[str, Any]) -> None:
        self._conn.execute(
            "INSERT INTO audit_meta (replica, key, value) VALUES (%s, %s, %s) "
            "ON CONFLICT (replica, key) DO UPDATE SET value = excluded.value",
            (self._replica, key, orjson.dumps(value).decode()),
        )

    def insert(self, rows: list[Row]) -> None:
        values = []
        for seq, kind, when, decision_id, body, prev_hash, digest in rows:
            key_id, sandbox_id = indexed_columns(body)
            values.append(
                (
                    *(self._replica, seq, kind, when, decision_id, body, prev_hash, digest),
                    *(key_id, sandbox_id),
                )
            )
            self.bytes_delta += len(body.encode()) + len(decision_id.encode())
            self.bytes_delta += ROW_OVERHEAD_BYTES
        # COPY: the batch in one stream (docs/decisions.md: 3.6x executemany's rate).
        with self._conn.cursor() as cur, cur.copy(_COPY) as copy:
            for row in values:
                copy.write_row(row)

    def last_seq_before(self, when: float) -> int:
        row = self._conn.execute(
            "SELECT max(seq) FROM audit WHERE replica = %s AND time < %s", (self._replica, when)
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def last_through(self, seq: int) -> tuple[int, str] | None:
        row = self._conn.execute(
            "SELECT seq, hash FROM audit WHERE replica = %s AND seq <= %s "
            "ORDER BY seq DESC LIMIT 1",
            (self._replica, seq),
        ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def delete_through(self, seq: int) -> int:
        row = self._conn.execute(
            "WITH gone AS (DELETE FROM audit WHERE replica = %s AND seq <= %s "
            "RETURNING octet_length(body) + octet_length(decision_id) AS n) "
            "SELECT count(*), coalesce(sum(n), 0) FROM gone",
            (self._replica, seq),
        ).fetchone()
        deleted, size = (int(row[0]), int(row[1])) if row else (0, 0)
        self.bytes_delta -= size + deleted * ROW_OVERHEAD_BYTES
        return deleted


def _meta(conn: psycopg.Connection[Any], replica: str, key: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT value FROM audit_meta WHERE replica = %s AND key = %s", (replica, key)
    ).fetchone()
    if row is None:
        return None
    value = orjson.loads(row[0])
    return value if isinstance(value, dict) else None


class PostgresStorage:
    """:class:`~authz.runtime.audit.storage.AuditStorage`: the chain of replica
    ``replica`` in the PostgreSQL database at ``url`` (a :class:`Secret`: it may hold the
    password; ``label`` is :func:`mask_url` of it). The schema is created or migrated at
    construction. ``max_bytes`` bounds this replica's rows (None: unbounded; at least
    1 MiB). Raises ConfigError naming the masked URL when the replica id is invalid or
    the database cannot be reached or migrated (an authz that cannot audit does not start;
    once running, an outage degrades it to log-only instead)."""

    errors: tuple[type[Exception], ...] = (psycopg.Error,)

    def __init__(
        self,
        url: Secret,
        replica: str,
        *,
        max_bytes: int | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        check_max_bytes(max_bytes)
        if not REPLICA_ID_RE.fullmatch(replica):
            raise ConfigError(
                f"AUTHZ_REPLICA_ID={replica!r}: expected 1-128 letters, digits, '_', '.' "
                "or '-', starting with a letter or digit"
            )
        self._url = url
        self.replica = replica
        self.label = mask_url(url.reveal())
        self.batch_bytes = batch_bytes_for(max_bytes)
        self._max_bytes = max_bytes
        self._monotonic = monotonic
        self._last_attempt = monotonic()
        self._lock = threading.Lock()  # the writer thread, and close() from another
        self._conn: psycopg.Connection[Any] | None = None
        try:
            self._conn = _connect(url)
            migrate(self._conn)
        except psycopg.Error as exc:
            self.close()
            raise ConfigError(f"audit database {self.label!r}: {_scrub(str(exc), url)}") from None

    def __repr__(self) -> str:
        return f"PostgresStorage({self.label!r}, replica={self.replica!r})"

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection, or a new one (at most every :data:`RECONNECT_S`)."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            self._conn = None
        now = self._monotonic()
        if now - self._last_attempt < RECONNECT_S:
            raise psycopg.OperationalError("audit database unreachable; reconnecting shortly")
        self._last_attempt = now
        try:
            self._conn = _connect(self._url)
        except psycopg.Error as exc:
            raise psycopg.OperationalError(_scrub(str(exc), self._url)) from None
        return self._conn

    def read_meta(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return _meta(self._connection(), self.replica, key)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[AuditTxn]:
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    # One writer per chain at a time (two processes given one replica id
                    # chain onto each other's entries, like two sharing a SQLite file).
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_NS, self.replica)
                    )
                    txn = _PgTxn(conn, self.replica)
                    yield txn
                    if txn.bytes_delta:
                        conn.execute(
                            "INSERT INTO audit_meta (replica, key, value) "
                            "VALUES (%s, 'bytes', %s) ON CONFLICT (replica, key) DO UPDATE "
                            "SET value = (audit_meta.value::bigint + %s)::text",
                            (self.replica, str(max(0, txn.bytes_delta)), txn.bytes_delta),
                        )
            except psycopg.Error as exc:
                raise type(exc)(_scrub(str(exc), self._url)) from None

    def before_write(self) -> None:
        """Nothing to check: the database's own files are PostgreSQL's to manage."""

    def used_bytes(self) -> int:
        """This replica's rows as counted in ``audit_meta`` (see the module doc)."""
        with self._lock:
            row = (
                self._connection()
                .execute(
                    "SELECT value FROM audit_meta WHERE replica = %s AND key = 'bytes'",
                    (self.replica,),
                )
                .fetchone()
            )
        return int(row[0]) if row else 0

    def bound(self, prune: Callable[[int, int], None]) -> None:
        """Prune the oldest rows (down to 90%) when this replica's rows pass
        ``max_bytes`` less two batches (written past a check)."""
        if self._max_bytes is None:
            return
        try:
            used = self.used_bytes()
        except psycopg.Error as exc:
            log.warning("audit byte bound not enforced", extra={"error": str(exc)})
            return
        budget = self._max_bytes - 2 * self.batch_bytes
        if used > budget:
            prune(used - budget * 9 // 10, used)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
                self._conn = None


# -- reading: the tools (authz audit tail|verify|replay) --------------------------------


def open_reader(url: Secret) -> psycopg.Connection[Any]:
    """A read-only connection (one REPEATABLE READ snapshot until commit/rollback) to the
    audit database at ``url``. Raises DataFileError naming the masked URL when it cannot
    connect or has no audit schema."""
    label = mask_url(url.reveal())
    try:
        conn = _connect(url, read_only=True)
    except psycopg.Error as exc:
        raise DataFileError(f"{label}: cannot connect: {_scrub(str(exc), url)}") from None
    try:
        conn.execute("SELECT seq FROM audit LIMIT 0")
        conn.execute("SELECT key FROM audit_meta LIMIT 0")
    except psycopg.Error as exc:
        conn.close()
        raise DataFileError(
            f"{label}: cannot read the audit trail: {_scrub(str(exc), url)}"
        ) from None
    return conn


def replicas(conn: psycopg.Connection[Any]) -> list[str]:
    """Every replica with a chain (rows or meta), sorted."""
    rows = conn.execute(
        "SELECT replica FROM audit_meta UNION SELECT DISTINCT replica FROM audit ORDER BY 1"
    ).fetchall()
    return [str(row[0]) for row in rows]


class PostgresChain:
    """One replica's chain as :func:`authz.runtime.audit.verify` reads it."""

    def __init__(self, conn: psycopg.Connection[Any], replica: str) -> None:
        self._conn = conn
        self.replica = replica

    def meta(self, key: str) -> dict[str, Any] | None:
        return _meta(self._conn, self.replica, key)

    def rows(self) -> Iterator[tuple[Any, ...]]:
        """``(seq, kind, time, decision_id, body, prev_hash, hash, (key_id, sandbox_id))``
        in seq order, streamed (a server-side cursor)."""
        with self._conn.cursor(name=f"audit_verify_{abs(hash(self.replica))}") as cur:
            cur.itersize = 2000
            cur.execute(_CHAIN_ROWS, (self.replica,))
            for row in cur:
                yield (*row[:7], (row[7], row[8]))

    def hash_at(self, seq: int) -> str | None:
        row = self._conn.execute(
            "SELECT hash FROM audit WHERE replica = %s AND seq = %s", (self.replica, seq)
        ).fetchone()
        return str(row[0]) if row else None

    @staticmethod
    def derived(body: str) -> tuple[str | None, str | None]:
        """What the indexed columns of a row with ``body`` must hold."""
        return indexed_columns(body)


def read_entries(
    conn: psycopg.Connection[Any], *, last: int | None = None, kind: str | None = None
) -> Iterator[AuditEntry]:
    """Entries of every chain, oldest first (by time, then replica and seq); only the
    ``last`` N when given; only ``kind`` when given. Raises DataFileError naming the
    replica and row when a body is not JSON."""
    args: tuple[Any, ...] = (kind, kind) if last is None else (kind, kind, last)
    sql = _ENTRIES if last is None else _LAST_ENTRIES
    with conn.cursor(name="audit_entries") as cur:
        cur.itersize = 2000
        cur.execute(sql, args)
        for replica, seq, entry_kind, when, decision_id, body, prev_hash, digest in cur:
            try:
                decoded = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise DataFileError(
                    f"audit entry {seq} of replica {replica!r}: body is not JSON"
                ) from None
            yield AuditEntry(
                int(seq), entry_kind, when, decision_id, decoded, prev_hash, digest, replica
            )


def read_last_seen(conn: psycopg.Connection[Any]) -> dict[str, float]:
    """Key id -> Unix seconds of the newest ``decision`` entry naming it, over every
    replica's chain (the indexed ``key_id`` column; what ``authz keys health --audit-url``
    reports unused keys by, like :func:`authz.runtime.audit.read_last_seen` for SQLite)."""
    rows = conn.execute(
        "SELECT key_id, max(time) FROM audit WHERE kind = 'decision' AND key_id IS NOT NULL "
        "GROUP BY key_id"
    ).fetchall()
    return {str(key_id): float(when) for key_id, when in rows}
