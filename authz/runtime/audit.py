"""Tamper-evident audit trail: every decision appended to SQLite, hash-chained.

Each row of table ``audit`` is one entry: ``seq`` (1, 2, 3, ... without gaps), ``kind``
(``decision``, ``admin`` for admin actions, ``gap`` for entries lost while the store was
degraded, ``anchor`` for a retention prune moving the anchor), ``time`` (Unix
seconds), ``decision_id``, ``body`` (canonical JSON: the decision-log fields plus the
policy decision and the size-capped :class:`Projection` of the input, never a credential
header, keys sorted), ``prev_hash`` and ``hash``::

    hash = sha256("<seq>\\n<prev_hash>\\n<kind>\\n<time>\\n<decision_id>\\n<body>")
    (hex; the first prev_hash is 64 "0"; time as Python's repr of the float)

Editing any column, re-ordering, or deleting a row breaks the chain at that row;
:func:`verify` names the first broken row. Table ``audit_meta`` keeps ``head`` (last
seq and hash, updated with every write, so a truncated tail is detected too) and
``anchor`` (the last pruned row, when retention has removed old rows). Both live in the
same file, so someone able to write the file can delete the newest entries and move the
head back: the writer therefore also logs the head (``audit head`` log line with ``seq``
and ``hash``, at most once a minute and at shutdown), and ``verify(head=...)`` /
``authz audit verify --head SEQ:HASH`` checks the file against a head taken from the
shipped logs. It is tamper *evident*, not tamper proof.

Retention deletes the oldest rows and moves the anchor; each move is recorded as an
``anchor`` entry chained after the head (body ``{"from": previous anchor, "to": new
anchor, "deleted": n}``, anchors as ``{"seq", "hash"}``; the first move's ``from`` is
``{"seq": 0, "hash": GENESIS}``) and logged (``audit anchor moved``). :func:`verify`
checks that consecutive moves follow each other and that the stored anchor is where
the last one put it, so rows deleted and an anchor moved by hand are detected. Forging
a move takes appending an ``anchor`` entry to the chain: every genuine one has its log
line (compare ``authz audit tail --kind anchor`` with the shipped ``audit anchor moved``
lines), and the head logged after it vouches for it like for any other entry.

Writes happen on one background thread, in batches, so a Check never waits for the disk.
A full disk, a locked database or any SQLite error degrades the trail to log-only (the
decision log still has every decision): ``degraded`` is set (metric
``authz_audit_degraded``), failures are counted, and when writes succeed again a ``gap``
entry records how many entries were lost and when. A request never fails because of the
audit trail. Retention (``retention_days``, ``max_records``, ``max_bytes``) prunes the
oldest rows.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from authz.core.errors import ConfigError, DataFileError
from authz.core.headers import CREDENTIAL_HEADERS, TCHAR
from authz.core.record import DecisionRecord
from authz.runtime.config import (
    DEFAULT_AUDIT_BODY_MAX_BYTES,
    DEFAULT_AUDIT_HEADERS,
    DEFAULT_AUDIT_MAX_BYTES,
    DEFAULT_AUDIT_ROW_MAX_BYTES,
    DEFAULT_AUDIT_VALUE_MAX_BYTES,
)
from authz.runtime.logs import redact_document

__all__ = [
    "GENESIS",
    "VOLUME_HEADROOM_BYTES",
    "AuditEntry",
    "AuditTrail",
    "Projection",
    "VerifyReport",
    "entry_hash",
    "read_entries",
    "read_last_seen",
    "replay_input",
    "truncation_marker",
    "verify",
    "volume_bytes",
]

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
_BATCH: Final = 500
# A batch is also cut at this many (charged) bytes: one transaction's share of the WAL.
_BATCH_BYTES: Final = 4 * 1024 * 1024
_MIB: Final = 1024 * 1024
# The -shm file (32 KiB per 4096 WAL frames' index) and what else the bound leaves room for.
_SHM_RESERVE: Final = 64 * 1024
# What the store's volume needs beyond max_bytes: a batch written past the last check,
# the overrides file beside the database, slack for the filesystem.
VOLUME_HEADROOM_BYTES: Final = 64 * _MIB
# (kind, time, decision id, body or the record to build it from on the writer thread)
_Item = tuple[str, float, str, "bytes | DecisionRecord"]
# How long a caught-up writer lets entries accumulate before committing them.
_FLUSH_S: Final = 0.2
DEFAULT_QUEUE_SIZE: Final = 20_000
DEFAULT_QUEUE_MAX_BYTES: Final = 32 * 1024 * 1024
# What a queued entry is charged beyond its variable-size parts: the record, the
# document's fixed fields, the queue slot.
_ENTRY_OVERHEAD: Final = 1024
_PRUNE_EVERY_S: Final = 60.0
_HEAD_LOG_EVERY_S: Final = 60.0

log = logging.getLogger(__name__)


def entry_hash(
    seq: int, prev_hash: str, kind: str, when: float, decision_id: str, body: str
) -> str:
    """The chain hash of one entry: hex SHA-256 over every column of the row (``seq``,
    ``prev_hash``, ``kind``, ``time`` as ``repr``, ``decision_id``, ``body``), so no
    column can be edited without breaking the chain."""
    text = f"{seq}\n{prev_hash}\n{kind}\n{when!r}\n{decision_id}\n{body}"
    return hashlib.sha256(text.encode()).hexdigest()


# -- what a row keeps: the projection ------------------------------------------------------

# The input fields that carry the request body.
_BODY_FIELDS: Final = ("body", "rawBody")
# The columns besides body and decision_id: seq, kind, time and two 64-hex hashes.
_ROW_OVERHEAD: Final = 200
# A whole row that still does not fit keeps only these fields, cut to this size.
_CORE_FIELDS: Final = frozenset(
    {
        "type", "decision_id", "time", "decision_path", "revision", "mode", "result",
        "decision", "reason", "http_status", "request_id", "method", "path", "duration_ms",
        "opa_ms", "policy_result", "fail_open", "error", "policy", "input", "omitted",
        # who: what `keys health` and `audit replay` report by
        "key_id", "role", "tier", "sandbox_id", "service", "override_id", "source",
        "cached_from",
    }
)  # fmt: skip
_CORE_VALUE_MAX: Final = 128
# Shed in this order when a row is over its cap: (path in the input, name in "omitted").
_SHED_ORDER: Final = (
    (("parsed_body",), "parsed_body"),
    (("attributes", "request", "http", "body"), "body"),
    (("attributes", "request", "http", "rawBody"), "rawBody"),
    (("parsed_query",), "parsed_query"),
    (("parsed_path",), "parsed_path"),
    (("attributes", "metadataContext"), "metadataContext"),
    (("attributes", "routeMetadataContext"), "routeMetadataContext"),
    (("attributes", "source", "certificate"), "source.certificate"),
    (("attributes", "destination", "certificate"), "destination.certificate"),
    (("attributes", "tlsSession"), "tlsSession"),
    (("attributes", "request", "http", "headerMap"), "headerMap"),
    (("attributes", "request", "http", "headers"), "headers"),
    (("attributes", "contextExtensions"), "contextExtensions"),
)
_SCHEME_RE: Final = re.compile(rf"^({TCHAR}{{1,32}}) sha256:[0-9a-f]{{64}}$")


def truncation_marker(size: int) -> str:
    """What replaces the end of a value cut to its cap: names the original size (bytes)."""
    return f"...[truncated from {size} bytes]"


def _cut(text: str, limit: int) -> str:
    """``text`` if at most ``limit`` UTF-8 bytes, else its longest prefix that fits with
    the :func:`truncation_marker` appended (a cut never splits a character)."""
    if len(text) * 4 <= limit:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    marker = truncation_marker(len(raw))
    keep = raw[: max(0, limit - len(marker))].decode("utf-8", "ignore")
    return keep + marker


def _capped(value: Any, limit: int) -> Any:
    """:func:`_cap_values`, skipping the walk when the whole of ``value`` fits in ``limit``
    bytes as JSON (then no string in it can be longer): most rows. ``value`` must be the
    caller's own copy (it may be returned as is)."""
    if len(orjson.dumps(value, default=str)) <= limit:
        return value
    return _cap_values(value, limit)


def _cap_values(value: Any, limit: int) -> Any:
    """A copy of the JSON ``value`` with every string (keys too) cut to ``limit`` bytes."""
    if isinstance(value, str):
        return _cut(value, limit)
    if isinstance(value, dict):
        return {_cut(str(k), limit): _cap_values(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_cap_values(item, limit) for item in value]
    return value


@dataclass(frozen=True, slots=True)
class Projection:
    """What an audit row keeps of a request (README "Audit trail" has the table).

    ``headers``: lowercase names kept, a trailing ``*`` making a prefix; a name in
    ``never`` (the credential headers) is never kept, whatever the list says. Kept
    headers are limited to a quarter of the row (exact names first, in list order, then
    prefix matches by name); the others are counted in ``headers_omitted``
    (``{"count", "bytes"}``: names plus values). ``body_max_bytes``: a request body up
    to this size is kept with its ``parsed_body``; a bigger one (or any, at 0) is left
    out and ``body_omitted`` records its size. ``value_max_bytes``: every string, key
    or value, is cut to this many UTF-8 bytes, ending in :func:`truncation_marker`.
    ``row_max_bytes``: the whole row (every column) stays within this; over it, input
    fields are shed in a fixed order (``_SHED_ORDER``), each named with its size in
    ``input.omitted``, then the whole input, then every non-core field. Credential
    digests (``input.credentials``) are kept: replay needs what the policy keyed on.
    """

    headers: tuple[str, ...] = DEFAULT_AUDIT_HEADERS
    body_max_bytes: int = DEFAULT_AUDIT_BODY_MAX_BYTES
    value_max_bytes: int = DEFAULT_AUDIT_VALUE_MAX_BYTES
    row_max_bytes: int = DEFAULT_AUDIT_ROW_MAX_BYTES
    never: frozenset[str] = frozenset(CREDENTIAL_HEADERS)

    def header_rank(self) -> tuple[dict[str, int], tuple[str, ...]]:
        """``({exact name: rank}, prefixes)`` of the allow-list, without ``never``."""
        exact = [h for h in self.headers if not h.endswith("*") and h not in self.never]
        prefixes = tuple(h[:-1] for h in self.headers if h.endswith("*"))
        return {name: i for i, name in enumerate(exact)}, prefixes


class _Projector:
    """Applies a :class:`Projection`: :meth:`slim` on the event loop (cheap: drops what a
    row never keeps, so a queued entry pins little), :meth:`body` on the writer thread."""

    def __init__(self, projection: Projection) -> None:
        self.p = projection
        self._exact, self._prefixes = projection.header_rank()
        self._never = projection.never

    def _keeps(self, name: str) -> bool:
        return name in self._exact or (
            bool(self._prefixes) and name.startswith(self._prefixes) and name not in self._never
        )

    def slim(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """``document`` without the headers a row does not keep (counted) and without a
        body it does not keep (its size recorded); credential schemes noted for replay."""
        attributes = document.get("attributes", {})
        request = attributes.get("request", {})
        http = request.get("http", {})
        omitted_count = omitted_bytes = 0
        slim_http = {k: v for k, v in http.items() if k not in ("headers", "headerMap")}
        headers = http.get("headers")
        if isinstance(headers, Mapping):
            kept = {}
            for name, value in headers.items():
                if self._keeps(name):
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
                if name and self._keeps(name):
                    entries.append(entry)
                else:
                    omitted_count += 1
                    omitted_bytes += len(orjson.dumps(entry, default=str))
            slim_http["headerMap"] = {**header_map, "headers": entries}
        size = sum(len(http.get(name, "")) for name in _BODY_FIELDS)
        keep_body = 0 < size <= self.p.body_max_bytes
        if not keep_body:
            for name in _BODY_FIELDS:
                slim_http.pop(name, None)
        slim = {k: v for k, v in document.items() if keep_body or k != "parsed_body"}
        slim["attributes"] = {**attributes, "request": {**request, "http": slim_http}}
        if size and not keep_body:
            slim["body_omitted"] = size
        if omitted_count:
            slim["headers_omitted"] = {"count": omitted_count, "bytes": omitted_bytes}
        schemes = self._schemes(document.get("credentials"), headers)
        if schemes:
            slim["credential_schemes"] = schemes
        return slim

    @staticmethod
    def _schemes(credentials: Any, headers: Any) -> dict[str, str]:
        """``{header: scheme}`` of masked ``<scheme> sha256:<hex>`` credentials (RFC 9110
        section 11.4), so replay can rebuild the masked header from the digest."""
        if not isinstance(credentials, Mapping) or not isinstance(headers, Mapping):
            return {}
        schemes = {}
        for name in credentials:
            match = _SCHEME_RE.fullmatch(str(headers.get(name, "")))
            if match:
                schemes[name] = match.group(1)
        return schemes

    def _headers_within(self, http: dict[str, Any], omitted: dict[str, int]) -> None:
        """Keep headers (already value-capped) up to a quarter of the row: exact names in
        allow-list order first, then prefix matches by name."""
        headers = http.get("headers")
        if not isinstance(headers, dict) or not headers:
            return
        budget = self.p.row_max_bytes // 4
        order = sorted(headers, key=lambda n: (self._exact.get(n, len(self._exact)), n))
        kept: dict[str, Any] = {}
        used = 0
        for name in order:
            cost = len(name) + len(str(headers[name]).encode()) + 6
            if used + cost > budget:
                omitted["count"] = omitted.get("count", 0) + 1
                omitted["bytes"] = omitted.get("bytes", 0) + cost - 6
                continue
            kept[name] = headers[name]
            used += cost
        http["headers"] = kept

    def body(self, record: DecisionRecord) -> str:
        """The row body (canonical JSON) for ``record`` (its document already slimmed),
        within ``row_max_bytes`` together with the other columns."""
        limit = self.p.value_max_bytes
        body = record.log_fields()
        body["policy"] = (
            {"allowed": record.policy_allowed, "reason": record.policy_reason}
            if record.policy_allowed is not None
            else None
        )
        body = _capped(body, limit)
        if record.document is not None:
            document: dict[str, Any] = _capped(redact_document(record.document), limit)
            http = document.get("attributes", {}).get("request", {}).get("http")
            if isinstance(http, dict):
                omitted = dict(document.get("headers_omitted") or {})
                self._headers_within(http, omitted)
                if omitted:
                    document["headers_omitted"] = omitted
            body["input"] = document
        budget = self.p.row_max_bytes - _ROW_OVERHEAD - len(record.decision_id.encode())
        return _fit(body, budget)


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _fit(body: dict[str, Any], budget: int) -> str:
    """``body`` as canonical JSON within ``budget`` bytes: input fields shed in
    ``_SHED_ORDER`` (named with their size in ``input.omitted``), then the whole input
    (``omitted.input``), then every non-core field (``omitted.fields``), then core values
    cut to ``_CORE_VALUE_MAX``, and last only the outcome (``omitted.row``; the decision
    id and time are columns of the row anyway)."""
    text = _dumps(body)
    if len(text.encode()) <= budget:
        return text
    document = body.get("input")
    if isinstance(document, dict):
        shed: dict[str, int] = document.setdefault("omitted", {})
        for path, name in _SHED_ORDER:
            *parents, leaf = path
            holder: Any = document
            for key in parents:
                holder = holder.get(key) if isinstance(holder, dict) else None
            if not isinstance(holder, dict) or leaf not in holder:
                continue
            shed[name] = len(_dumps(holder.pop(leaf)).encode())
            text = _dumps(body)
            if len(text.encode()) <= budget:
                return text
        body["input"] = None
        body["omitted"] = {"input": len(_dumps(document).encode())}
        text = _dumps(body)
        if len(text.encode()) <= budget:
            return text
    extra = {k: body.pop(k) for k in list(body) if k not in _CORE_FIELDS}
    omitted = body.setdefault("omitted", {})
    if extra:
        omitted["fields"] = len(_dumps(extra).encode())
    text = _dumps(body)
    if len(text.encode()) <= budget:
        return text
    text = _dumps(_cap_values(body, _CORE_VALUE_MAX))
    if len(text.encode()) <= budget:
        return text
    # Only fixed-size fields are left (row_max_bytes is at least 4096).
    minimal: dict[str, Any] = {
        k: body[k] for k in ("type", "result", "decision", "http_status") if k in body
    }
    minimal["omitted"] = {"row": len(text.encode())}
    return _dumps(minimal)


def replay_input(document: Mapping[str, Any]) -> dict[str, Any]:
    """A stored input made ready for replay: each credential header the policy saw is put
    back in its masked form (``sha256:<hex>``, ``<scheme> sha256:<hex>`` for a scheme
    recorded in ``credential_schemes``) from the digests in ``credentials``; no secret
    is involved, the row only ever held digests."""
    copy: dict[str, Any] = orjson.loads(orjson.dumps(document))
    credentials = copy.get("credentials")
    http = copy.get("attributes", {}).get("request", {}).get("http")
    if not isinstance(credentials, dict) or not isinstance(http, dict):
        return copy
    schemes = copy.get("credential_schemes") or {}
    headers = http.setdefault("headers", {})
    for name, digest in credentials.items():
        scheme = schemes.get(name) if isinstance(schemes, dict) else None
        headers[name] = f"{scheme} sha256:{digest}" if scheme else f"sha256:{digest}"
    return copy


def _safe_body(projector: _Projector, record: DecisionRecord) -> bytes:
    try:
        return projector.body(record).encode()
    except Exception as exc:  # never lose the entry (or the batch) over one odd value
        log.exception("audit body for %s not serializable", record.decision_id)
        fallback = {"decision_id": record.decision_id, "audit_error": type(exc).__name__}
        return orjson.dumps(fallback, option=orjson.OPT_SORT_KEYS, default=str)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One stored entry; ``body`` is the decoded JSON."""

    seq: int
    kind: str
    time: float
    decision_id: str
    body: Mapping[str, Any]
    prev_hash: str
    hash: str


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
    # Before the first table: lets a store over its byte bound give free pages back
    # (incremental_vacuum); a no-op on an existing file.
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    # Deleted rows are zeroed within their pages but freed pages are not rewritten: a
    # prune does not copy the pruned bytes into the WAL (SQLite's "secure_delete").
    conn.execute("PRAGMA secure_delete=FAST")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
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


def _charge(record: DecisionRecord) -> int:
    """Bytes a queued record is charged: a fixed overhead plus the variable-size parts it
    pins (request path, header names and values, body), counted without copying."""
    size = _ENTRY_OVERHEAD + len(record.path)
    if record.document is not None:
        http = record.document.get("attributes", {}).get("request", {}).get("http", {})
        size += len(http.get("path", "")) * 2  # parsed_path and parsed_query repeat it
        size += len(http.get("body", "")) * 2 + len(http.get("rawBody", ""))
        for name, value in http.get("headers", {}).items():
            size += len(name) + len(value)
        for entry in http.get("headerMap", {}).get("headers", ()):
            size += sum(len(str(v)) for v in entry.values())
    return size


class _ByteQueue:
    """A FIFO bounded by entry count and by charged bytes; never blocks the producer.
    ``put`` returns False (and keeps nothing) when either bound would be passed; the
    stop marker of ``close`` is always accepted."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._items: collections.deque[tuple[_Item | None, int]] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: _Item | None, size: int) -> bool:
        with self._ready:
            if item is not None and (
                len(self._items) >= self._max_entries or self.bytes + size > self._max_bytes
            ):
                return False
            self._items.append((item, size))
            self.bytes += size
            self._ready.notify()
            return True

    def get(self, timeout_s: float) -> tuple[bool, _Item | None, int]:
        """``(True, item, size)`` for the oldest entry (waiting up to ``timeout_s``), or
        ``(False, None, 0)`` when none came."""
        with self._ready:
            if not self._items and not self._ready.wait_for(lambda: self._items, timeout_s):
                return False, None, 0
            item, size = self._items.popleft()
            self.bytes -= size
            return True, item, size


class AuditTrail:
    """A :class:`~authz.core.record.DecisionSink` appending every record to the database at
    ``path``. Raises ConfigError at construction if the database cannot be opened.

    ``retention_days`` and ``max_records`` bound the store (None: unbounded);
    ``queue_size`` (entries) and ``queue_max_bytes`` (charged bytes: a fixed overhead
    per entry plus the path, headers and body it pins) bound what waits for the writer;
    beyond either an entry is dropped and counted like a failed write (a ``gap`` entry
    records it). ``on_state(degraded, written, failed)`` is called after every batch for
    metrics. ``clock`` (Unix seconds) and ``sleep`` are injectable for tests.
    ``projection`` decides what a decision row keeps of the request (:class:`Projection`,
    defaults from :mod:`authz.runtime.config`). ``max_bytes`` bounds the database, its WAL and
    shared-memory file together (None: unbounded; at least 1 MiB): after each batch the
    oldest rows are pruned (an anchor move) when the rows' pages pass their share.

    The writer takes a backlog (a full batch or more waiting) at once, batch after
    batch; only when it is caught up does it sleep ``_FLUSH_S`` so that entries
    accumulate into one transaction instead of one commit each.
    """

    def __init__(
        self,
        path: Path,
        *,
        retention_days: float | None = 30.0,
        max_records: int | None = 1_000_000,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES,
        on_state: Callable[[bool, int, int], None] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        projection: Projection | None = None,
        max_bytes: int | None = DEFAULT_AUDIT_MAX_BYTES,
    ) -> None:
        self.path = path
        self._projector = _Projector(projection or Projection())
        self._max_bytes = max_bytes
        self._batch_bytes = _BATCH_BYTES
        self._wal_limit = self._data_budget = 0
        if max_bytes is not None:
            if max_bytes < _MIB:
                raise ConfigError(f"audit max_bytes={max_bytes}: expected at least {_MIB}")
            # Room for the WAL and two batches past a check; the rows get the rest.
            self._wal_limit = min(max(max_bytes // 8, 256 * 1024), 64 * _MIB)
            self._batch_bytes = min(_BATCH_BYTES, max_bytes // 32)
            self._data_budget = max_bytes - self._wal_limit - 2 * self._batch_bytes - _SHM_RESERVE
        self._vacuum_warned = False
        try:
            self._conn = connect(path)
            if max_bytes is not None:
                # A checkpoint once the WAL holds half its room; the WAL file is cut
                # back to that size after it (SQLite's journal_size_limit).
                page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
                half = self._wal_limit // 2
                self._conn.execute(f"PRAGMA wal_autocheckpoint={max(8, half // page_size)}")
                self._conn.execute(f"PRAGMA journal_size_limit={half}")
            head = _meta(self._conn, "head")
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"audit database {str(path)!r}: {exc}") from None
        self._seq = int(head["seq"]) if head else 0
        self._hash = str(head["hash"]) if head else GENESIS
        self._retention_s = retention_days * 86400 if retention_days else None
        self._max_records = max_records
        self._queue = _ByteQueue(queue_size, queue_max_bytes)
        self._on_state = on_state
        self._clock = clock
        self._sleep = sleep
        self.degraded = False
        self.written = 0
        self.failed = 0
        self._lost = 0
        self._lost_since: float | None = None
        self._lost_lock = threading.Lock()
        self._last_prune = 0.0
        self.prunes = 0
        self._head_logged = 0.0
        try:
            self._adopt_anchor()
        except sqlite3.Error as exc:
            self._rollback()
            raise ConfigError(f"audit database {str(path)!r}: {exc}") from None
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def _adopt_anchor(self) -> None:
        """A store pruned before anchor moves were recorded has an anchor and no ``anchor``
        entry; record one (``"from": null``) once, so it verifies from here on. The
        ``anchor_moves`` meta key marks a store whose moves are all recorded."""
        if _meta(self._conn, "anchor_moves") is not None:
            return
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            anchor = _meta(self._conn, "anchor")
            if anchor is not None and _meta(self._conn, "anchor_moves") is None:
                body = _move_body(None, anchor, 0)
                self._seq, self._hash = self._append([("anchor", self._clock(), "", body)])
                log.warning(
                    "audit anchor adopted: pruned before anchor moves were recorded",
                    extra={"audit_db": str(self.path), "anchor": anchor, "seq": self._seq},
                )
            _set_meta(self._conn, "anchor_moves", {"recorded": True})

    # -- producer side (event loop) -----------------------------------------------------
    @property
    def queued_bytes(self) -> int:
        """Charged bytes of the entries waiting for the writer."""
        return self._queue.bytes

    def record(self, record: DecisionRecord) -> None:
        """Queue ``record`` for the writer; never blocks, never raises. The body is built
        on the writer thread, off the request path."""
        if record.document is not None:  # a queued entry pins only what the row keeps
            try:
                slim: Mapping[str, Any] | None = self._projector.slim(record.document)
            except Exception:  # an odd document costs its input, never the entry
                log.exception("audit input for %s not projected", record.decision_id)
                slim = None
            record = dataclasses.replace(record, document=slim)
        self._put("decision", record.timestamp, record.decision_id, record, _charge(record))

    def admin(self, action: str, fields: Mapping[str, Any], entry_id: str) -> None:
        """Queue an admin action (mode switch, override) as an entry of kind ``admin``."""
        body = orjson.dumps({"action": action, **fields}, option=orjson.OPT_SORT_KEYS)
        self._put("admin", self._clock(), entry_id, body, _ENTRY_OVERHEAD + len(body))

    def _put(
        self, kind: str, when: float, entry_id: str, body: bytes | DecisionRecord, size: int
    ) -> None:
        if not self._queue.put((kind, when, entry_id, body), size):
            with self._lost_lock:
                self.failed += 1
                self._lost += 1
                self._lost_since = self._lost_since or when

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued, log the head, and stop the writer."""
        self._queue.put(None, 0)
        self._thread.join(timeout_s)
        self._log_head()
        self._conn.close()

    def _log_head(self) -> None:
        """Log the chain head, the anchor ``verify --head`` checks a file against."""
        self._head_logged = self._clock()
        if self._seq:
            log.info(
                "audit head",
                extra={"audit_db": str(self.path), "seq": self._seq, "hash": self._hash},
            )

    # -- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch, stopping = self._next_batch()
            if batch or self._lost:
                self._write(batch)
            if self._clock() - self._last_prune > _PRUNE_EVERY_S:
                self._prune()
            if stopping:
                return

    def _next_batch(self) -> tuple[list[_Item], bool]:
        """Up to ``_BATCH`` queued entries (and about ``_batch_bytes``; waiting at most
        ``_FLUSH_S`` for the first), and whether close() asked to stop. With a full batch
        already waiting (a backlog) it returns at once; with fewer, the writer is caught
        up and sleeps ``_FLUSH_S`` first: waking (and committing) per entry would cost a
        transaction and two GIL hand-offs with the event loop for every request."""
        batch: list[_Item] = []
        got, item, size = self._queue.get(_FLUSH_S)
        if not got:
            return batch, False
        if item is not None and len(self._queue) < _BATCH - 1:
            self._sleep(_FLUSH_S)
        charged = 0
        while True:
            if item is None:
                return batch, True
            batch.append(item)
            charged += size
            if len(batch) >= _BATCH or charged >= self._batch_bytes:
                return batch, False
            got, item, size = self._queue.get(0)
            if not got:
                return batch, False

    def _write(self, batch: list[_Item]) -> None:
        entries = list(batch)
        with self._lost_lock:
            lost, lost_since = self._lost, self._lost_since
        if lost:
            gap = orjson.dumps(
                {"lost": lost, "since": lost_since, "until": self._clock()},
                option=orjson.OPT_SORT_KEYS,
            )
            entries.insert(0, ("gap", self._clock(), "", gap))
        texts = [
            (
                kind,
                when,
                entry_id,
                (body if isinstance(body, bytes) else _safe_body(self._projector, body)).decode(),
            )
            for kind, when, entry_id, body in entries
        ]
        try:
            self._check_wal()
            with self._conn:  # one transaction
                self._conn.execute("BEGIN IMMEDIATE")
                seq, prev = self._append(texts)
        except sqlite3.Error as exc:
            self._rollback()
            with self._lost_lock:
                self.failed += len(batch)
                if not self._lost:
                    self._lost_since = batch[0][1] if batch else self._clock()
                self._lost += len(batch)
            if not self.degraded:
                self.degraded = True
                log.error(
                    "audit trail degraded to log-only (decisions are still in the decision log)",
                    extra={"audit_db": str(self.path), "error": str(exc)},
                )
            self._report()
            return
        self._seq, self._hash = seq, prev
        self.written += len(batch)
        if self._clock() - self._head_logged > _HEAD_LOG_EVERY_S:
            self._log_head()
        if self.degraded:
            self.degraded = False
            log.warning(
                "audit trail recovered; a gap entry records what was lost",
                extra={"audit_db": str(self.path), "lost": lost},
            )
        with self._lost_lock:
            self._lost -= lost  # entries dropped meanwhile stay counted for the next gap
            if not self._lost:
                self._lost_since = None
        self._report()
        self._enforce_max_bytes()

    # -- the byte bound ------------------------------------------------------------------
    def _wal_bytes(self) -> int:
        try:
            return os.path.getsize(f"{self.path}-wal")
        except OSError:
            return 0

    def _check_wal(self) -> None:
        """Before a write: a WAL past its room (a long reader held off checkpoints) is
        checkpointed and cut back; if it cannot be, the write fails (degraded, then a
        gap entry) rather than the store outgrowing ``max_bytes``."""
        if self._max_bytes is None or self._wal_bytes() <= self._wal_limit:
            return
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if self._wal_bytes() > self._wal_limit:
            raise sqlite3.OperationalError(
                f"audit WAL over its {self._wal_limit} bytes (a reader holds it): not writing"
            )

    def _pages(self) -> tuple[int, int, int]:
        """``(page_size, page_count, freelist_count)`` of the database."""
        size, count, free = (
            int(self._conn.execute(f"PRAGMA {name}").fetchone()[0])
            for name in ("page_size", "page_count", "freelist_count")
        )
        return size, count, free

    def _enforce_max_bytes(self) -> None:
        """After a write: prune the oldest rows when the rows' pages outgrow their share of
        ``max_bytes`` (down to 90% of it), give back free pages of a file over the bound,
        and checkpoint a WAL past half its room."""
        if self._max_bytes is None:
            return
        try:
            page_size, pages, free = self._pages()
            used = (pages - free) * page_size
            if used > self._data_budget:
                self._prune(excess_bytes=used - self._data_budget * 9 // 10, used_bytes=used)
                page_size, pages, free = self._pages()
            if pages * page_size + self._wal_bytes() > self._max_bytes and free:
                self._give_back(free)
            if self._wal_bytes() > self._wal_limit // 2:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("audit byte bound not enforced", extra={"error": str(exc)})

    def _give_back(self, free: int) -> None:
        """Return free pages to the filesystem, a batch's worth at a time (a store made
        under a larger bound); only an ``auto_vacuum=INCREMENTAL`` file can."""
        if int(self._conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2:
            page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
            pages = min(free, max(1, self._batch_bytes // page_size))
            self._conn.execute(f"PRAGMA incremental_vacuum({pages})")
        elif not self._vacuum_warned:
            self._vacuum_warned = True
            log.warning(
                "audit database larger than AUTHZ_AUDIT_MAX_BYTES and made without "
                "auto_vacuum: its free pages are reused, not given back (VACUUM it offline)",
                extra={"audit_db": str(self.path), "max_bytes": self._max_bytes},
            )

    def _append(self, texts: list[tuple[str, float, str, str]]) -> tuple[int, str]:
        """Chain ``(kind, time, id, body)`` entries onto the head and move the head; inside
        the caller's write transaction. Returns the new head ``(seq, hash)``."""
        # The head is read under the write lock: another authz process sharing this
        # file may have appended since our last batch; chain onto its entries.
        head = _meta(self._conn, "head")
        seq = int(head["seq"]) if head else self._seq
        prev = str(head["hash"]) if head else self._hash
        rows = []
        for kind, when, entry_id, text in texts:
            seq += 1
            digest = entry_hash(seq, prev, kind, when, entry_id, text)
            rows.append((seq, kind, when, entry_id, text, prev, digest))
            prev = digest
        self._conn.executemany(
            "INSERT INTO audit (seq, kind, time, decision_id, body, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        _set_meta(self._conn, "head", {"seq": seq, "hash": prev})
        return seq, prev

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")

    def _report(self) -> None:
        if self._on_state is not None:
            try:
                self._on_state(self.degraded, self.written, self.failed)
            except Exception:
                log.exception("audit state callback failed")

    def _prune(self, excess_bytes: int = 0, used_bytes: int = 0) -> None:
        """Delete the oldest entries past retention (``retention_days``, ``max_records``,
        and about ``excess_bytes`` of the ``used_bytes`` rows hold, for ``max_bytes``)
        and move the anchor, recording the move as an ``anchor`` entry chained after the
        head (so the move itself is under the hash chain) and logging it."""
        self._last_prune = self._clock()
        try:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                moved = self._move_anchor(excess_bytes, used_bytes)
        except sqlite3.Error as exc:
            self._rollback()
            log.warning("audit retention pruning failed", extra={"error": str(exc)})
            return
        finally:
            self.prunes += 1
        if moved is not None:
            self._announce_move(*moved)

    def _cutoff(self, head_seq: int, anchor_seq: int, excess_bytes: int, used_bytes: int) -> int:
        """The last seq retention removes (<= ``anchor_seq``: nothing to remove)."""
        cutoff = anchor_seq
        rows = head_seq - anchor_seq
        if excess_bytes > 0 and rows > 0:
            # Rows are of similar size: the average over the store (index included).
            per_row = max(1, used_bytes // rows)
            cutoff = max(cutoff, anchor_seq + min(rows, -(-excess_bytes // per_row)))
        if self._retention_s is not None:
            row = self._conn.execute(
                "SELECT MAX(seq) FROM audit WHERE time < ?",
                (self._clock() - self._retention_s,),
            ).fetchone()
            cutoff = max(cutoff, int(row[0] or 0))
        if self._max_records is not None and head_seq - anchor_seq > self._max_records:
            # Room for the anchor entry itself: max_records entries after the move, and
            # an idle store does not prune again (no churn of anchor entries).
            cutoff = max(cutoff, head_seq - self._max_records + 1)
        return cutoff

    def _move_anchor(
        self, excess_bytes: int, used_bytes: int
    ) -> tuple[dict[str, Any], dict[str, Any], int, int, str] | None:
        """Inside a write transaction: prune and record the move. Returns ``(previous
        anchor, new anchor, entries deleted, move entry seq, its hash)`` or None."""
        head = _meta(self._conn, "head")
        if head is None:
            return None
        previous = _meta(self._conn, "anchor") or {"seq": 0, "hash": GENESIS}
        cutoff = self._cutoff(int(head["seq"]), int(previous["seq"]), excess_bytes, used_bytes)
        if cutoff <= int(previous["seq"]):
            return None
        row = self._conn.execute(
            "SELECT seq, hash FROM audit WHERE seq <= ? ORDER BY seq DESC LIMIT 1", (cutoff,)
        ).fetchone()
        if row is None:
            return None
        anchor = {"seq": int(row[0]), "hash": str(row[1])}
        deleted = self._conn.execute("DELETE FROM audit WHERE seq <= ?", (row[0],)).rowcount
        _set_meta(self._conn, "anchor", anchor)
        body = _move_body(previous, anchor, deleted)
        seq, digest = self._append([("anchor", self._clock(), "", body)])
        self._seq, self._hash = seq, digest
        return previous, anchor, deleted, seq, digest

    def _announce_move(
        self,
        previous: Mapping[str, Any],
        anchor: Mapping[str, Any],
        deleted: int,
        seq: int,
        digest: str,
    ) -> None:
        """One log line per anchor move: the new and the previous anchor and the move's
        own entry (``seq``/``hash``, usable as ``verify --head``)."""
        log.info(
            "audit anchor moved",
            extra={
                "audit_db": str(self.path),
                "anchor": dict(anchor),
                "previous": dict(previous),
                "deleted": deleted,
                "seq": seq,
                "hash": digest,
            },
        )


def _move_body(previous: Mapping[str, Any] | None, anchor: Mapping[str, Any], deleted: int) -> str:
    """The body of an ``anchor`` entry: ``{"from": previous anchor or null (adopted from a
    store written before moves were recorded), "to": new anchor, "deleted": count}``."""
    return orjson.dumps(
        {"from": previous, "to": anchor, "deleted": deleted}, option=orjson.OPT_SORT_KEYS
    ).decode()


# -- reading, verifying ---------------------------------------------------------------


def read_entries(
    conn: sqlite3.Connection, *, last: int | None = None, kind: str | None = None
) -> Iterator[AuditEntry]:
    """Entries in ``seq`` order (only the ``last`` N when given; only ``kind`` when
    given)."""
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
        yield AuditEntry(seq, entry_kind, when, decision_id, orjson.loads(body), prev_hash, digest)


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
    ``broken_decision_id``) name the first bad entry and ``problem`` says what is wrong."""

    ok: bool
    entries: int
    first_seq: int | None
    last_seq: int | None
    broken_seq: int | None = None
    broken_decision_id: str | None = None
    problem: str | None = None


def verify(conn: sqlite3.Connection, *, head: tuple[int, str] | None = None) -> VerifyReport:
    """Walk the chain from the anchor (or genesis) to the recorded head; report the first
    entry whose seq, link or hash is wrong, or a head that does not match the last entry
    (a truncated or extended tail). ``head`` is ``(seq, hash)`` recorded elsewhere (an
    ``audit head`` log line): the chain must still hold that entry with that hash."""
    anchor = _meta(conn, "anchor")
    stored = _meta(conn, "head")
    expected_seq = int(anchor["seq"]) + 1 if anchor else 1
    prev = str(anchor["hash"]) if anchor else GENESIS
    count, first, last = 0, None, None
    rows = conn.execute(
        "SELECT seq, kind, time, decision_id, body, prev_hash, hash FROM audit ORDER BY seq"
    )
    head_seq = int(stored["seq"]) if stored is not None else None
    last_move: tuple[int, Any] | None = None  # (seq, body["to"]) of the newest anchor entry
    for seq, kind, when, decision_id, body, prev_hash, digest in rows:
        first = first if first is not None else seq
        problem = None
        if seq != expected_seq:
            problem = f"expected entry {expected_seq} here: entries are missing"
        elif prev_hash != prev:
            problem = "prev_hash does not match the previous entry's hash"
        elif entry_hash(seq, prev_hash, kind, when, decision_id, body) != digest:
            problem = "hash does not match the entry's contents (edited)"
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
        problem = _external_head_problem(conn, head, end_seq)
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


def _external_head_problem(
    conn: sqlite3.Connection, head: tuple[int, str], end_seq: int
) -> str | None:
    """Why the chain does not hold the externally recorded ``head``, or None."""
    seq, digest = head
    if seq > end_seq:
        return (
            f"the recorded head is entry {seq} but the chain ends at {end_seq}: entries "
            "were removed from the end (and the head rewritten)"
        )
    row = conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
    if row is None:
        anchor = _meta(conn, "anchor")
        if anchor and int(anchor["seq"]) == seq and anchor["hash"] == digest:
            return None  # pruned by retention, and the anchor vouches for it
        return f"entry {seq} of the recorded head is no longer in the chain"
    if row[0] != digest:
        return f"entry {seq} does not have the recorded head's hash: the chain was rewritten"
    return None
