"""Key health for people and scripts: :func:`report_text` (the table ``authz keys
health`` prints) and :func:`report_json` (what ``--json`` prints) of a
:class:`authz.tools.key_health.HealthReport`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from authz.core.rfc3339 import DAY_S

if TYPE_CHECKING:  # key_health re-exports these renderers: no import cycle at run time
    from authz.tools.key_health import HealthReport

__all__ = ["report_json", "report_text"]


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
    summary = ", ".join(f"{count} {status}" for status, count in counts.items())
    lines.append(f"{_plural(len(report.keys), 'key')}: {summary}")
    actionable = sum(1 for key in report.keys if key.needs_action)
    lines.append(
        f"ACTION NEEDED: {_plural(actionable, 'key')} expired, expiring, unused or with an "
        "invalid expires_at"
        if actionable
        else "no action needed"
    )
    return "\n".join(lines)
