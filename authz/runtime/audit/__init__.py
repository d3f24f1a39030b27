"""Tamper-evident audit trail: every decision appended to SQLite, hash-chained.

Each row of table ``audit`` is one entry: ``seq`` (1, 2, 3, ... without gaps), ``kind``
(``decision``, ``admin`` for admin actions, ``gap`` for entries lost while the store was
degraded, ``anchor`` for a retention prune moving the anchor, ``tunnel`` for the end of a CONNECT
tunnel: its decision id, sandbox, host, port, bytes and duration from Envoy's access log
service, :mod:`authz.runtime.als`), ``time`` (Unix
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

from authz.runtime.audit.chain import (
    GENESIS,
    VOLUME_HEADROOM_BYTES,
    AuditEntry,
    connect,
    entry_hash,
    volume_bytes,
)
from authz.runtime.audit.projection import Projection, replay_input, truncation_marker
from authz.runtime.audit.store import AuditTrail
from authz.runtime.audit.verify import VerifyReport, read_entries, read_last_seen, verify

__all__ = [
    "GENESIS",
    "VOLUME_HEADROOM_BYTES",
    "AuditEntry",
    "AuditTrail",
    "Projection",
    "VerifyReport",
    "connect",
    "entry_hash",
    "read_entries",
    "read_last_seen",
    "replay_input",
    "truncation_marker",
    "verify",
    "volume_bytes",
]
