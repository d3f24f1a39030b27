"""RFC 3339 date-times, parsed once for every part of authz that reads one.

The syntax is RFC 3339 section 5.6 as OPA's ``time.parse_rfc3339_ns`` accepts it (Go's
``time.RFC3339``): an upper-case ``T`` and ``Z``, an optional fraction, a numeric offset.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

__all__ = ["DAY_S", "parse_rfc3339"]

DAY_S: Final = 86_400.0
_RFC3339: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})", re.ASCII
)


def parse_rfc3339(text: str) -> float | None:
    """Unix seconds of an RFC 3339 date-time such as ``2027-01-01T00:00:00Z`` or
    ``2027-01-01T09:30:00.5+02:00``; None when ``text`` is not one (a date alone, no
    offset, a lower-case ``t``/``z``, an impossible date). Accepts what OPA's
    ``time.parse_rfc3339_ns`` accepts, so a key this calls invalid is one the policy
    treats as expired."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        tz = UTC
        if offset != "Z":
            sign = -1 if offset[0] == "-" else 1
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            if minutes >= 60:
                return None
            tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz
        )
    except ValueError:  # month 13, Feb 30, hour 24, offset >= 24h, year 0, ...
        return None
    return moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)
