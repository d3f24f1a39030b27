"""Key hygiene: which API keys are expired, expiring, disabled or unused.

This module is the pure assessment: :func:`assess` takes the bundle's
``data.gateway.api_keys`` mapping (keyed by SHA-256 digest, values ``{"id", "enabled",
"expires_at"?, "namespace"?, ...}``), the time, when each key id was last seen, and two
windows, and returns a :class:`HealthReport`. Its parts live beside it:
:func:`authz.tools.bundle_data.load_api_keys` reads the keys (a bundle ``.tar.gz``, a
bundle/source directory or one ``data.json``), :func:`authz.runtime.audit.read_last_seen`
queries the audit trail (opened read-only), and :mod:`authz.tools.key_health_report`
renders the report (text, JSON). They are re-exported here under their old names.
``authz keys health`` and ``scripts/nightly-audit`` print the report;
:mod:`authz.runtime.expiry` warns about expiring keys at runtime.

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

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from authz.core.decision import json_type
from authz.core.errors import DataFileError
from authz.core.rfc3339 import DAY_S, parse_rfc3339
from authz.runtime.audit import read_last_seen
from authz.tools.bundle_data import API_KEYS_PATH, load_api_keys, load_data
from authz.tools.key_health_report import report_json, report_text

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

# Digest characters shown when a message must point at an entry: enough to find it.
_SHORT: Final = 8


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
