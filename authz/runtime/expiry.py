"""Runtime key-expiry warnings: a decision sink that notices keys about to expire.

The gateway policy puts the key's ``expires_at`` (RFC 3339, only when the key has one)
in the decision's ``identity``. :class:`KeyExpiryWatch` looks at every allowed decision
and, when that time is within ``warning_days``, counts the decision in
``authz_expiring_key_decisions_total{path}`` and logs ``api key expiring`` (``key_id``,
``expires_at``, ``expires_in_days``, ``decision_path``) at most once per key per
``interval_s`` (an hour). The offline view of the same data is
``authz keys health`` (:mod:`authz.tools.key_health`).

Cheap on the hot path: a decision without ``identity.expires_at`` costs one dict lookup;
a timestamp is parsed once per distinct string (a bounded cache), and the per-key
warning times are bounded too (oldest forgotten first).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from typing import Final

from prometheus_client import Counter

from authz.core.record import DecisionRecord
from authz.core.rfc3339 import DAY_S, parse_rfc3339

__all__ = ["WARN_INTERVAL_S", "KeyExpiryWatch"]

WARN_INTERVAL_S: Final = 3600.0
# Distinct expires_at strings kept parsed; keys share few expiry times, so this is plenty.
_PARSED_MAX: Final = 4096
# Keys remembered for the once-per-interval warning; beyond it the oldest are forgotten
# (such a key may then warn again within the interval, never more often than it is used).
_WARNED_MAX: Final = 10_000

log = logging.getLogger(__name__)

_parse_cached = functools.lru_cache(maxsize=_PARSED_MAX)(parse_rfc3339)


class KeyExpiryWatch:
    """A :class:`~authz.core.record.DecisionSink` warning about allowed decisions whose
    ``identity.expires_at`` is at most ``warning_days`` days after the decision.

    A decision counts when ``record.allowed`` (the request went through) and
    ``expires_at - record.timestamp <= warning_days`` days; a key already past its
    expiry that was still let through (dry-run, fail-open, clocks apart) counts too, with
    a negative ``expires_in_days``. ``warning_days`` 0 turns the watch off. Times come
    from the record (``timestamp``, Unix seconds: the authorizer's injectable
    ``wall_clock``). ``counter`` is ``Metrics.expiring_key_decisions`` (label: the
    decision path). An ``expires_at`` that does not parse is ignored here (the policy
    denies such a key; ``authz keys health`` reports it).
    """

    def __init__(
        self,
        warning_days: float,
        counter: Counter,
        *,
        interval_s: float = WARN_INTERVAL_S,
        max_keys: int = _WARNED_MAX,
    ) -> None:
        self._window_s = warning_days * DAY_S
        self._counter = counter
        self._interval_s = interval_s
        self._max_keys = max(1, max_keys)
        # key id -> when it was last warned about, oldest first.
        self._warned: OrderedDict[str, float] = OrderedDict()

    def set_warning_days(self, warning_days: float) -> None:
        """Change the warning window (days; 0 turns the watch off), e.g. on reload."""
        self._window_s = warning_days * DAY_S

    def record(self, record: DecisionRecord) -> None:
        """Count and maybe warn about ``record``; never raises for any identity."""
        text = record.identity.get("expires_at")
        if text is None or not record.allowed or self._window_s <= 0:
            return
        expires = _parse_cached(text)
        if expires is None:
            return
        now = record.timestamp
        left_s = expires - now
        if left_s > self._window_s:
            return
        self._counter.labels(record.decision_path).inc()
        key_id = record.identity.get("key_id", "")
        if self._should_warn(key_id, now):
            log.warning(
                "api key expiring",
                extra={
                    "key_id": key_id,
                    "expires_at": text,
                    "expires_in_days": round(left_s / DAY_S, 2),
                    "decision_path": record.decision_path,
                },
            )

    def _should_warn(self, key_id: str, now: float) -> bool:
        """True (and remembered) when ``key_id`` was not warned about in the interval."""
        last = self._warned.get(key_id)
        if last is not None and 0 <= now - last < self._interval_s:
            return False
        self._warned.pop(key_id, None)
        while len(self._warned) >= self._max_keys:
            self._warned.popitem(last=False)
        self._warned[key_id] = now
        return True
