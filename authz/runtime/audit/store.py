"""The audit writer: one background thread appending batches, retention and the byte
bound, degradation to log-only and gap entries.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import operator
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from itertools import repeat
from pathlib import Path
from typing import Any, Final

import orjson

from authz.core.errors import ConfigError
from authz.core.record import DecisionRecord
from authz.runtime.audit.chain import GENESIS, entry_hash
from authz.runtime.audit.projection import Projection, _Projector, _safe_body
from authz.runtime.audit.storage import AuditStorage, AuditTxn, Row, SqliteStorage
from authz.runtime.config import (
    DEFAULT_AUDIT_MAX_BYTES,
)

__all__ = [
    "DEFAULT_QUEUE_MAX_BYTES",
    "DEFAULT_QUEUE_SIZE",
    "AuditTrail",
]

log = logging.getLogger(__name__)


_BATCH: Final = 500
# (kind, time, decision id, body or the record to build it from on the writer thread)
_Item = tuple[str, float, str, "bytes | DecisionRecord"]
# How long a caught-up writer lets entries accumulate before committing them.
_FLUSH_S: Final = 0.2
DEFAULT_QUEUE_SIZE: Final = 20_000
DEFAULT_QUEUE_MAX_BYTES: Final = 32 * 1024 * 1024
# What a queued entry is charged beyond its variable-size parts: the record, the
# document's fixed fields, the queue slot. tracemalloc counts an ordinary gateway allow's
# entry (a slim input with a few kept headers) retaining ~4.6 KB, ~3.5 KB more than its
# variable-size parts: the objects around them (dicts, the record's slots, each string's
# own header). tests/unit/runtime/test_audit.py::
# test_audit_queue_charges_at_least_what_a_queued_entry_retains holds the charge to it.
_ENTRY_OVERHEAD: Final = 6 * 1024
# What a queued record also pins when it carries the log fields the decision log built
# (DecisionRecord.log_fields, kept for the row body): ~600 bytes measured with
# tracemalloc for a gateway allow with three identity fields.
_LOG_FIELDS_CHARGE: Final = 640
_PRUNE_EVERY_S: Final = 60.0
_HEAD_LOG_EVERY_S: Final = 60.0


# DecisionRecord's fields but the two _queued sets: read at once, set slot by slot (a
# slot's descriptor sets it past the frozen class's __setattr__).
_KEPT_FIELDS: Final = tuple(
    f.name for f in dataclasses.fields(DecisionRecord) if f.name not in ("document", "opa_result")
)
_read_kept: Final = operator.attrgetter(*_KEPT_FIELDS)
_SLOT_SETTERS: Final[dict[str, Callable[[DecisionRecord, Any], None]]] = {
    f.name: getattr(DecisionRecord, f.name).__set__ for f in dataclasses.fields(DecisionRecord)
}
# The setters of _KEPT_FIELDS, then of the two _queued sets.
_set_all: Final = (
    *(_SLOT_SETTERS[name] for name in _KEPT_FIELDS),
    _SLOT_SETTERS["document"],
    _SLOT_SETTERS["opa_result"],
)
_consume: Final[Callable[[Iterable[object]], None]] = collections.deque[object](maxlen=0).extend


def _queued(record: DecisionRecord, document: Mapping[str, Any] | None) -> DecisionRecord:
    """``dataclasses.replace(record, document=document, opa_result=None)``, a third of its
    cost (it runs per decision on the event loop): the frozen slots copied as they are,
    without ``__init__``'s keyword handling (``record`` was built, and so checked, by it;
    DecisionRecord has no ``__post_init__``), each setter called from C (``map``)."""
    copy = object.__new__(DecisionRecord)
    _consume(map(operator.call, _set_all, repeat(copy), (*_read_kept(record), document, None)))
    return copy


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
    """A :class:`~authz.core.record.DecisionSink` appending every record to an audit chain:
    the SQLite database at ``target`` (a path), or ``target`` itself (an
    :class:`~authz.runtime.audit.storage.AuditStorage`, e.g. one replica's chain in
    PostgreSQL, :class:`~authz.runtime.audit.postgres.PostgresStorage`). Raises
    ConfigError at construction if the store cannot be opened.

    ``retention_days`` and ``max_records`` bound the store (None: unbounded);
    ``queue_size`` (entries) and ``queue_max_bytes`` (charged bytes: a fixed overhead
    per entry plus the path, headers and body it pins) bound what waits for the writer;
    beyond either an entry is dropped and counted like a failed write (a ``gap`` entry
    records it). ``on_state(degraded, written, failed)`` is called after every batch for
    metrics. ``clock`` (Unix seconds) and ``sleep`` are injectable for tests.
    ``projection`` decides what a decision row keeps of the request (:class:`Projection`,
    defaults from :mod:`authz.runtime.config`). ``max_bytes`` (for a path ``target``)
    bounds the database, its WAL and shared-memory file together (None: unbounded; at
    least 1 MiB): after each batch the oldest rows are pruned (an anchor move) when the
    rows' pages pass their share; a storage ``target`` carries its own bound.

    The writer takes a backlog (a full batch or more waiting) at once, batch after
    batch; only when it is caught up does it sleep ``_FLUSH_S`` so that entries
    accumulate into one transaction instead of one commit each.
    """

    def __init__(
        self,
        target: Path | AuditStorage,
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
        self._projector = _Projector(projection or Projection())
        storage = SqliteStorage(target, max_bytes) if isinstance(target, Path) else target
        self._store: AuditStorage = storage
        self.path: Path | None = target if isinstance(target, Path) else None
        self.label = storage.label
        self._errors = storage.errors
        self._batch_bytes = storage.batch_bytes
        self._seq, self._hash = 0, GENESIS
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
        except self._errors as exc:
            storage.close()
            raise ConfigError(f"audit database {self.label!r}: {exc}") from None
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    @property
    def _conn(self) -> sqlite3.Connection:
        """The SQLite connection of a SQLite-backed trail (tests replace it)."""
        if not isinstance(self._store, SqliteStorage):
            raise AttributeError("_conn: not a SQLite-backed audit trail")
        return self._store.conn

    @_conn.setter
    def _conn(self, conn: sqlite3.Connection) -> None:
        if not isinstance(self._store, SqliteStorage):
            raise AttributeError("_conn: not a SQLite-backed audit trail")
        self._store.conn = conn

    def _adopt_anchor(self) -> None:
        """Read the head; and a store pruned before anchor moves were recorded has an
        anchor and no ``anchor`` entry: record one (``"from": null``) once, so it
        verifies from here on. The ``anchor_moves`` meta key marks a store whose moves are
        all recorded."""
        head = self._store.read_meta("head")
        if head is not None:
            self._seq, self._hash = int(head["seq"]), str(head["hash"])
        if self._store.read_meta("anchor_moves") is not None:
            return
        with self._store.transaction() as txn:
            if txn.meta("anchor_moves") is not None:
                return
            anchor = txn.meta("anchor")
            if anchor is not None:
                body = _move_body(None, anchor, 0)
                self._seq, self._hash = self._append(txn, [("anchor", self._clock(), "", body)])
                log.warning(
                    "audit anchor adopted: pruned before anchor moves were recorded",
                    extra={"audit_db": self.label, "anchor": anchor, "seq": self._seq},
                )
            txn.set_meta("anchor_moves", {"recorded": True})

    # -- producer side (event loop) -----------------------------------------------------
    @property
    def queued_bytes(self) -> int:
        """Charged bytes of the entries waiting for the writer."""
        return self._queue.bytes

    def record(self, record: DecisionRecord) -> None:
        """Queue ``record`` for the writer; never blocks, never raises. The body is built
        on the writer thread, off the request path."""
        # Charged: a fixed overhead, the path, what the slim document pins of the
        # request (_Projector.slim_charged counts it in its one pass) and the log fields
        # when the record carries them.
        size = _ENTRY_OVERHEAD + len(record.path)
        if record.document is not None:  # a queued entry pins only what the row keeps
            try:
                slim, pinned = self._projector.slim_charged(record.document)
            except Exception:  # an odd document costs its input, never the entry
                log.exception("audit input for %s not projected", record.decision_id)
                slim, pinned = None, 0
            record = _queued(record, slim)
            size += pinned
        if record._log_fields is not None:
            size += _LOG_FIELDS_CHARGE
        self._put("decision", record.timestamp, record.decision_id, record, size)

    def admin(self, action: str, fields: Mapping[str, Any], entry_id: str) -> None:
        """Queue an admin action (mode switch, override) as an entry of kind ``admin``."""
        body = orjson.dumps({"action": action, **fields}, option=orjson.OPT_SORT_KEYS)
        self._put("admin", self._clock(), entry_id, body, _ENTRY_OVERHEAD + len(body))

    def tunnel(self, decision_id: str, fields: Mapping[str, Any]) -> None:
        """Queue the end of a CONNECT tunnel (issue 18, :mod:`authz.runtime.als`) as an
        entry of kind ``tunnel`` under the CONNECT decision's id; ``fields`` is the body
        (host, port, sandbox, byte counts, duration; never a header)."""
        body = orjson.dumps(dict(fields), option=orjson.OPT_SORT_KEYS)
        self._put("tunnel", self._clock(), decision_id, body, _ENTRY_OVERHEAD + len(body))

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
        self._store.close()

    def _log_head(self) -> None:
        """Log the chain head, the anchor ``verify --head`` checks a file against."""
        self._head_logged = self._clock()
        if self._seq:
            log.info(
                "audit head",
                extra={"audit_db": self.label, "seq": self._seq, "hash": self._hash},
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
                # A NUL cannot be stored in PostgreSQL text: never let one id poison a batch.
                entry_id.replace("\0", "\ufffd"),
                (body if isinstance(body, bytes) else _safe_body(self._projector, body)).decode(),
            )
            for kind, when, entry_id, body in entries
        ]
        try:
            self._store.before_write()
            with self._store.transaction() as txn:
                seq, prev = self._append(txn, texts)
        except self._errors as exc:
            with self._lost_lock:
                self.failed += len(batch)
                if not self._lost:
                    self._lost_since = batch[0][1] if batch else self._clock()
                self._lost += len(batch)
            if not self.degraded:
                self.degraded = True
                log.error(
                    "audit trail degraded to log-only (decisions are still in the decision log)",
                    extra={"audit_db": self.label, "error": str(exc)},
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
                extra={"audit_db": self.label, "lost": lost},
            )
        with self._lost_lock:
            self._lost -= lost  # entries dropped meanwhile stay counted for the next gap
            if not self._lost:
                self._lost_since = None
        self._report()
        self._store.bound(self._prune)

    def _append(self, txn: AuditTxn, texts: list[tuple[str, float, str, str]]) -> tuple[int, str]:
        """Chain ``(kind, time, id, body)`` entries onto the head and move the head; inside
        ``txn``. Returns the new head ``(seq, hash)``."""
        # The head is read under the write lock: another authz process sharing this
        # chain may have appended since our last batch; chain onto its entries.
        head = txn.meta("head")
        seq = int(head["seq"]) if head else self._seq
        prev = str(head["hash"]) if head else self._hash
        replica = self._store.replica
        rows: list[Row] = []
        for kind, when, entry_id, text in texts:
            seq += 1
            digest = entry_hash(seq, prev, kind, when, entry_id, text, replica=replica)
            rows.append((seq, kind, when, entry_id, text, prev, digest))
            prev = digest
        txn.insert(rows)
        txn.set_meta("head", {"seq": seq, "hash": prev})
        return seq, prev

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
            with self._store.transaction() as txn:
                moved = self._move_anchor(txn, excess_bytes, used_bytes)
        except self._errors as exc:
            log.warning("audit retention pruning failed", extra={"error": str(exc)})
            return
        finally:
            self.prunes += 1
        if moved is not None:
            self._announce_move(*moved)

    def _cutoff(
        self, txn: AuditTxn, head_seq: int, anchor_seq: int, excess_bytes: int, used_bytes: int
    ) -> int:
        """The last seq retention removes (<= ``anchor_seq``: nothing to remove)."""
        cutoff = anchor_seq
        rows = head_seq - anchor_seq
        if excess_bytes > 0 and rows > 0:
            # Rows are of similar size: the average over the store (index included).
            per_row = max(1, used_bytes // rows)
            cutoff = max(cutoff, anchor_seq + min(rows, -(-excess_bytes // per_row)))
        if self._retention_s is not None:
            cutoff = max(cutoff, txn.last_seq_before(self._clock() - self._retention_s))
        if self._max_records is not None and head_seq - anchor_seq > self._max_records:
            # Room for the anchor entry itself: max_records entries after the move, and
            # an idle store does not prune again (no churn of anchor entries).
            cutoff = max(cutoff, head_seq - self._max_records + 1)
        return cutoff

    def _move_anchor(
        self, txn: AuditTxn, excess_bytes: int, used_bytes: int
    ) -> tuple[dict[str, Any], dict[str, Any], int, int, str] | None:
        """Inside a write transaction: prune and record the move. Returns ``(previous
        anchor, new anchor, entries deleted, move entry seq, its hash)`` or None."""
        head = txn.meta("head")
        if head is None:
            return None
        previous = txn.meta("anchor") or {"seq": 0, "hash": GENESIS}
        cutoff = self._cutoff(txn, int(head["seq"]), int(previous["seq"]), excess_bytes, used_bytes)
        if cutoff <= int(previous["seq"]):
            return None
        last = txn.last_through(cutoff)
        if last is None:
            return None
        anchor = {"seq": last[0], "hash": last[1]}
        deleted = txn.delete_through(last[0])
        txn.set_meta("anchor", anchor)
        body = _move_body(previous, anchor, deleted)
        seq, digest = self._append(txn, [("anchor", self._clock(), "", body)])
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
                "audit_db": self.label,
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
