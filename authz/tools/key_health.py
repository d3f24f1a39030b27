"""Key hygiene: which API keys are expired, expiring, disabled or unused.

The core is pure: :func:`assess` takes the bundle's ``data.gateway.api_keys`` mapping
(keyed by SHA-256 digest, values ``{"id", "enabled", "expires_at"?, "namespace"?, ...}``),
the time, when each key id was last seen, and two windows, and returns a
:class:`HealthReport`. Two thin I/O helpers feed it: :func:`load_api_keys` (a bundle
``.tar.gz``, a bundle/source directory or one ``data.json``) and :func:`read_last_seen`
(the audit trail, opened read-only). ``authz keys health`` and ``scripts/nightly-audit``
print the report; :mod:`authz.runtime.expiry` warns about expiring keys at runtime.

Each key gets one status, the first that applies::

    disabled        "enabled" is not true: the policy refuses the key whatever else holds
    invalid_expiry  "expires_at" is present but not an RFC 3339 time (the policy treats
                    the key as expired: fail closed)
    expired         expires_at <= now
    expiring        now < expires_at <= now + expiring_days
    unused          last seen at or before now - unused_days, or never seen
                    (only when last-seen times are given, i.e. an audit store was read)
    ok              none of the above

**Needs action** is true when any key has status ``invalid_expiry``, ``expired``,
``expiring`` or ``unused``; since ``disabled`` comes first, each of those is an *enabled*
key. Disabled keys are reported, never actionable: they cannot authenticate.

Sandboxes (``data.egress.sandboxes``) carry no ``expires_at`` in the shipped policies,
so they are not assessed here.
"""

from __future__ import annotations

import io
import json
import sqlite3
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any, Final

from authz.core.decision import json_type
from authz.core.errors import DataFileError
from authz.core.rfc3339 import DAY_S, parse_rfc3339

__all__ = [
    "ACTIONABLE",
    "API_KEYS_PATH",
    "HealthReport",
    "KeyHealth",
    "Status",
    "assess",
    "load_api_keys",
    "load_data",
    "read_last_seen",
    "report_json",
    "report_text",
    "short_digest",
]

# Where the gateway policy reads its keys: data.gateway.api_keys.
API_KEYS_PATH: Final = ("gateway", "api_keys")
# RFC 3339 date-time as Go's time.RFC3339 parser (OPA's time.parse_rfc3339_ns) accepts it:
# upper-case T and Z, optional fraction, numeric offset with a colon; ASCII digits only.
# Digest characters shown when a message must point at an entry: enough to find it.
_SHORT: Final = 8
# Per data file, far above any real key list; a bundle is never read whole into memory.
_MAX_DATA_BYTES: Final = 64 * 1024 * 1024


class Status(StrEnum):
    """A key's hygiene status (the first that applies, in this order)."""

    DISABLED = "disabled"
    INVALID_EXPIRY = "invalid_expiry"
    EXPIRED = "expired"
    EXPIRING = "expiring"
    UNUSED = "unused"
    OK = "ok"


ACTIONABLE: Final = frozenset(
    {Status.INVALID_EXPIRY, Status.EXPIRED, Status.EXPIRING, Status.UNUSED}
)


@dataclass(frozen=True, slots=True)
class KeyHealth:
    """One key. Times are Unix seconds.

    ``expires_at_text`` is the data's ``expires_at`` as written (a non-string value as
    JSON), None when absent; ``expires_at`` its parsed time (None when absent or
    invalid); ``last_seen`` the newest audited decision naming the key (None: never seen,
    or no audit store read); ``namespace`` the key's namespace, if any.
    """

    key_id: str
    status: Status
    enabled: bool
    expires_at_text: str | None
    expires_at: float | None
    last_seen: float | None
    namespace: str | None = None

    @property
    def needs_action(self) -> bool:
        """True for the statuses in :data:`ACTIONABLE`."""
        return self.status in ACTIONABLE


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The assessment of every key, sorted by status (in :class:`Status` order) then id.

    ``now`` is Unix seconds; ``expiring_days``/``unused_days`` the windows used;
    ``unused_checked`` is false when no last-seen times were given (no key is then
    ``unused``).
    """

    now: float
    expiring_days: float
    unused_days: float
    unused_checked: bool
    keys: tuple[KeyHealth, ...]

    @property
    def needs_action(self) -> bool:
        """True when any key's status is actionable (see the module docstring)."""
        return any(key.needs_action for key in self.keys)

    def counts(self) -> dict[Status, int]:
        """Number of keys per status, every status present (zero when none)."""
        found = Counter(key.status for key in self.keys)
        return {status: found[status] for status in Status}


def short_digest(digest: str) -> str:
    """The first characters of a key digest followed by ``…``: enough to find an entry in
    the data, never the whole digest."""
    return f"{digest[:_SHORT]}…"


def assess(
    api_keys: Mapping[str, Any],
    *,
    now: float,
    last_seen: Mapping[str, float] | None = None,
    expiring_days: float = 14.0,
    unused_days: float = 30.0,
) -> HealthReport:
    """Assess every key of ``api_keys`` (``data.gateway.api_keys``: digest -> entry).

    ``now`` and the ``last_seen`` values (key id -> Unix seconds of its newest decision)
    are Unix seconds; None for ``last_seen`` skips the ``unused`` check (no audit store).
    ``expiring_days`` and ``unused_days`` are days (fractions allowed, >= 0).

    Raises DataFileError for data the policy cannot use, naming the entry by a shortened
    digest: ``api_keys`` not an object, an entry not an object, an ``id`` missing, empty
    or not a string, two entries with the same id, an ``enabled`` or ``namespace`` of the
    wrong type. A bad ``expires_at`` is a finding (``invalid_expiry``), not an error.
    Raises ValueError for a negative window.
    """
    if expiring_days < 0 or unused_days < 0:
        raise ValueError("expiring_days and unused_days must be >= 0")
    if not isinstance(api_keys, Mapping):
        raise DataFileError(f"api_keys: expected an object but got {json_type(api_keys)}")
    expiring_until = now + expiring_days * DAY_S
    unused_before = now - unused_days * DAY_S
    seen_ids: dict[str, str] = {}
    keys: list[KeyHealth] = []
    for digest, entry in api_keys.items():
        key_id, enabled, namespace = _entry_fields(digest, entry)
        if key_id in seen_ids:
            raise DataFileError(
                f"api_keys: id {key_id!r} is used by two entries "
                f"({short_digest(seen_ids[key_id])} and {short_digest(digest)})"
            )
        seen_ids[key_id] = digest
        raw = entry.get("expires_at")
        has_expiry = "expires_at" in entry
        text = None if not has_expiry else raw if isinstance(raw, str) else json.dumps(raw)
        expires = parse_rfc3339(raw) if isinstance(raw, str) else None
        seen = last_seen.get(key_id) if last_seen is not None else None
        if not enabled:
            status = Status.DISABLED
        elif has_expiry and expires is None:
            status = Status.INVALID_EXPIRY
        elif expires is not None and expires <= now:
            status = Status.EXPIRED
        elif expires is not None and expires <= expiring_until:
            status = Status.EXPIRING
        elif last_seen is not None and (seen is None or seen <= unused_before):
            status = Status.UNUSED
        else:
            status = Status.OK
        keys.append(KeyHealth(key_id, status, enabled, text, expires, seen, namespace))
    order = {status: index for index, status in enumerate(Status)}
    keys.sort(key=lambda key: (order[key.status], key.key_id))
    return HealthReport(
        now=now,
        expiring_days=expiring_days,
        unused_days=unused_days,
        unused_checked=last_seen is not None,
        keys=tuple(keys),
    )


def _entry_fields(digest: str, entry: Any) -> tuple[str, bool, str | None]:
    """``(id, enabled, namespace)`` of one entry; DataFileError naming it when malformed."""
    where = f"api_keys[{short_digest(digest)}]"
    if not isinstance(entry, Mapping):
        raise DataFileError(f"{where}: expected an object but got {json_type(entry)}")
    key_id = entry.get("id")
    if not isinstance(key_id, str) or not key_id:
        raise DataFileError(f"{where}: expected a non-empty string id but got {key_id!r}")
    enabled = entry.get("enabled", False)
    if not isinstance(enabled, bool):
        raise DataFileError(f"{where} ({key_id}): expected enabled to be a boolean")
    namespace = entry.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        raise DataFileError(f"{where} ({key_id}): expected namespace to be a string")
    return key_id, enabled, namespace


# -- I/O: bundle data ---------------------------------------------------------------------


def load_data(path: Path) -> dict[str, Any]:
    """The data tree of ``path`` as OPA would load it (Rego files ignored):

    - a bundle ``.tar.gz`` (``opa build`` output): every ``data.json`` member placed at
      its directory (``/gateway/api_keys/data.json`` is ``data.gateway.api_keys``);
    - a directory (a bundle source tree, an unpacked bundle, an overlay such as
      ``infra/demo/bundle-data``): every ``**/data.json`` the same way;
    - a ``.json`` file: the data root itself.

    Raises DataFileError naming the file: missing, unreadable, not gzip/tar, invalid JSON,
    or two files that set the same leaf differently.
    """
    if not path.exists():
        raise DataFileError(f"{path}: no such file or directory")
    root: dict[str, Any] = {}
    if path.is_dir():
        for file in sorted(path.rglob("data.json")):
            relative = file.relative_to(path).parent.parts
            _merge_at(root, relative, _read_json(file.read_bytes, str(file)), str(file))
    elif path.name.endswith((".tar.gz", ".tgz")):
        for name, value in _bundle_members(path):
            parts = PurePosixPath(name.lstrip("/")).parent.parts
            _merge_at(root, parts, value, f"{path}:{name}")
    else:
        _merge_at(root, (), _read_json(path.read_bytes, str(path)), str(path))
    return root


def load_api_keys(path: Path) -> Mapping[str, Any]:
    """``data.gateway.api_keys`` from ``path`` (see :func:`load_data` for what ``path``
    may be). Raises DataFileError naming the file when it cannot be read or holds no
    ``data.gateway.api_keys`` (a bundle built without key data)."""
    node: Any = load_data(path)
    for part in API_KEYS_PATH:
        if not isinstance(node, dict) or part not in node:
            raise DataFileError(
                f"{path}: no data.{'.'.join(API_KEYS_PATH)} (a bundle built without key "
                "data? scripts/build-policy-bundle --data DIR adds it)"
            )
        node = node[part]
    if not isinstance(node, dict):
        raise DataFileError(
            f"{path}: data.{'.'.join(API_KEYS_PATH)} is {json_type(node)}, not an object"
        )
    return node


def _bundle_members(path: Path) -> Iterator[tuple[str, Any]]:
    """``(member name, decoded JSON)`` of every regular ``data.json`` member."""
    try:
        with tarfile.open(path, mode="r:gz") as bundle:
            for member in bundle:
                if not member.isfile() or PurePosixPath(member.name).name != "data.json":
                    continue
                if member.size > _MAX_DATA_BYTES:
                    raise DataFileError(
                        f"{path}:{member.name}: larger than {_MAX_DATA_BYTES} bytes"
                    )
                handle = bundle.extractfile(member)
                if handle is None:
                    continue
                with handle:
                    yield member.name, _read_json(handle.read, f"{path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataFileError(f"{path}: not a readable bundle (.tar.gz): {exc}") from None


def _read_json(read: Callable[[], bytes], where: str) -> Any:
    try:
        raw = read()
        return json.load(io.BytesIO(raw)) if raw.strip() else {}
    except OSError as exc:
        raise DataFileError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DataFileError(f"{where}: invalid JSON: {exc}") from None


def _merge_at(root: dict[str, Any], parts: Iterable[str], value: Any, where: str) -> None:
    """Place ``value`` at ``root[parts...]``, merging objects like OPA does."""
    node = root
    path = tuple(parts)
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise DataFileError(f"{where}: data.{'.'.join(path)} conflicts with another file")
        node = child
    if not path:
        if not isinstance(value, dict):
            raise DataFileError(f"{where}: the data root must be an object")
        _merge(root, value, where, ())
    elif isinstance(node.get(path[-1]), dict) and isinstance(value, dict):
        _merge(node[path[-1]], value, where, path)
    elif path[-1] in node:
        raise DataFileError(f"{where}: data.{'.'.join(path)} conflicts with another file")
    else:
        node[path[-1]] = value


def _merge(into: dict[str, Any], other: Mapping[str, Any], where: str, at: tuple[str, ...]) -> None:
    for name, value in other.items():
        if isinstance(into.get(name), dict) and isinstance(value, dict):
            _merge(into[name], value, where, (*at, name))
        elif name in into:
            raise DataFileError(
                f"{where}: data.{'.'.join((*at, name))} conflicts with another file"
            )
        else:
            into[name] = value


# -- I/O: audit trail ----------------------------------------------------------------------

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


# -- presentation ---------------------------------------------------------------------------


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _relative(when: float, now: float) -> str:
    days = (when - now) / DAY_S
    return f"in {days:.1f}d" if days >= 0 else f"{-days:.1f}d ago"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def report_json(report: HealthReport) -> dict[str, Any]:
    """``report`` as a JSON-ready dict (what ``authz keys health --json`` prints)::

        {"now": RFC 3339, "expiring_days": float, "unused_days": float,
         "unused_checked": bool, "needs_action": bool, "counts": {status: int},
         "keys": [{"id", "status", "needs_action", "enabled", "namespace",
                   "expires_at" (as in the data, or null),
                   "last_seen" (RFC 3339, or null: never seen / not checked)}]}

    Keys are named by id only, never by digest."""
    return {
        "now": _iso(report.now),
        "expiring_days": report.expiring_days,
        "unused_days": report.unused_days,
        "unused_checked": report.unused_checked,
        "needs_action": report.needs_action,
        "counts": {str(status): count for status, count in report.counts().items()},
        "keys": [
            {
                "id": key.key_id,
                "status": str(key.status),
                "needs_action": key.needs_action,
                "enabled": key.enabled,
                "namespace": key.namespace,
                "expires_at": key.expires_at_text,
                "last_seen": _iso(key.last_seen) if key.last_seen is not None else None,
            }
            for key in report.keys
        ],
    }


def report_text(report: HealthReport) -> str:
    """``report`` as a table for people (what ``authz keys health`` prints): one row per
    key (id, status, expiry and last use with their distance from now in days, namespace),
    then a count per status and whether action is needed. Ends without a newline."""
    unused = (
        f"unused: no decision in {report.unused_days:g} days"
        if report.unused_checked
        else "unused: not checked (no audit store)"
    )
    lines = [
        f"key health at {_iso(report.now)}: expiring within {report.expiring_days:g} days; {unused}"
    ]
    rows = [("KEY", "STATUS", "EXPIRES", "LAST SEEN", "NAMESPACE")]
    for key in report.keys:
        expires = key.expires_at_text or "-"
        if key.expires_at is not None:
            expires += f" ({_relative(key.expires_at, report.now)})"
        if key.last_seen is not None:
            seen = f"{_iso(key.last_seen)} ({_relative(key.last_seen, report.now)})"
        else:
            seen = "never" if report.unused_checked else "-"
        rows.append((key.key_id, str(key.status), expires, seen, key.namespace or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    counts = report.counts()
    summary = ", ".join(f"{counts[status]} {status}" for status in Status)
    lines.append(f"{_plural(len(report.keys), 'key')}: {summary}")
    actionable = sum(1 for key in report.keys if key.needs_action)
    lines.append(
        f"ACTION NEEDED: {_plural(actionable, 'key')} expired, expiring, unused or with an "
        "invalid expires_at"
        if actionable
        else "no action needed"
    )
    return "\n".join(lines)
