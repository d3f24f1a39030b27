"""DecisionRecord: what one decision was, for the decision log, metrics and audit trail.

One record per Check, built by :mod:`authz.core.authorizer` whatever the outcome. The record
holds only low-risk values: the input document it keeps has credential headers already
replaced by digests (:mod:`authz.core.input`), and :meth:`DecisionRecord.log_fields` never
includes the input, headers or query strings.

Three answers can differ, and the record keeps each:

- the **policy** decision: what OPA said (``policy_allowed``/``policy_reason``; None
  when OPA gave no usable decision);
- the **decision**: what authz decides to enforce after rate limiting and failures
  (``decision_allowed``, ``reason``, ``http_status``);
- the **result** sent to Envoy (``allowed``): the decision, unless the mode is
  ``dry-run`` (a deny is suppressed), ``bypass``, or the path fails open.
"""

from __future__ import annotations

import collections
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from itertools import repeat
from types import MappingProxyType
from typing import Any, Final, Protocol

__all__ = ["FIELD_NAMES", "DecisionRecord", "DecisionSink", "record_from_fields"]

_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})
# The end of a log time after its second: ".000+00:00" to ".999+00:00".
_MILLIS: Final = tuple(f".{ms:03d}+00:00" for ms in range(1000))
# The last second formatted (as "YYYY-MM-DDTHH:MM:SS") and its Unix second: one tuple,
# replaced whole, so the event loop and the audit writer thread each read a pair.
_last_second: Final[list[tuple[int, str]]] = [(0, "1970-01-01T00:00:00")]


def _log_time(timestamp: float) -> str:
    """``datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")``
    (ISO 8601 / RFC 3339 with ``+00:00``), about a fifth of its cost for a float: the
    microseconds rounded as CPython's ``fromtimestamp`` rounds them (``modf``, times
    10**6, round half to even, carried into the second), the second's text formatted
    once and reused while the seconds repeat. Raises what that call raises (NaN,
    infinities, years past 9999). Anything but a float takes that call."""
    if type(timestamp) is not float:
        return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
    frac, whole = math.modf(timestamp)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1.0
    elif micros < 0:
        micros += 1_000_000
        whole -= 1.0
    second = int(whole)
    last = _last_second[0]
    if last[0] != second:
        text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")[:-6]
        last = _last_second[0] = (second, text)
    return last[1] + _MILLIS[micros // 1000]


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One decision. ``timestamp`` is Unix seconds; durations are seconds.

    ``reason`` is a stable snake_case code: the decision's reason (the policy's, or
    ``rate_limited``, or an :class:`~authz.core.errors.AuthzError` code when no decision could
    be made, with the log-only detail in ``error``). ``mode`` is the enforcement mode
    (``enforce``, ``dry-run``, ``bypass``); ``fail_open`` is true when an OPA failure was
    allowed by the path's failure policy.

    For the decision log in OPA's schema (:mod:`authz.runtime.logs`): ``opa_result`` is
    OPA's ``result`` for the query as it came (the policy's decision document; None when
    OPA gave none, e.g. bypass or OPA unreachable), ``revisions`` maps each active bundle's
    name to its revision (OPA provenance; ``revision`` is the same as one string), and
    ``peer`` is who asked (the gRPC peer of the Check call, Envoy, e.g.
    ``ipv4:127.0.0.1:50000``; ``""`` when unknown).
    """

    decision_id: str
    timestamp: float
    decision_path: str
    allowed: bool
    reason: str
    http_status: int
    decision_allowed: bool | None = None
    mode: str = "enforce"
    fail_open: bool = False
    policy_allowed: bool | None = None
    policy_reason: str | None = None
    tier: str | None = None
    override_id: str | None = None
    source: str | None = None
    cached_from: str | None = None
    revision: str = ""
    identity: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    request_id: str = ""
    method: str = ""
    path: str = ""
    duration_s: float = 0.0
    opa_duration_s: float = 0.0
    error: str | None = None
    document: Mapping[str, Any] | None = None
    opa_result: Any = None
    revisions: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    peer: str = ""
    # Decision fields the outcome does not use, as opa-envoy-plugin ignores them
    # (authz.core.decision.Decision.ignored): counted, never an error.
    ignored_fields: tuple[str, ...] = ()
    # log_fields() once built: the decision log and the audit row each ask for it (not
    # a value of the decision: left out of __init__, repr and equality).
    _log_fields: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def enforced_allowed(self) -> bool:
        """What authz decided (before dry-run or fail-open turned it into an allow)."""
        return self.allowed if self.decision_allowed is None else self.decision_allowed

    @property
    def suppressed(self) -> bool:
        """True when a deny was not enforced (dry-run, bypass or fail-open)."""
        return self.allowed and not self.enforced_allowed

    def log_fields(self) -> dict[str, Any]:
        """The decision-log line as a JSON-ready dict, ``{"type": "decision", ...}``; it never
        holds the input, headers or query string. Identity fields cannot replace these.
        Built once per record (every field is frozen) and returned as a new dict each
        call, so a caller may change its copy."""
        built = self._log_fields
        if built is None:
            built = self._build_log_fields()
            _set_log_fields(self, built)  # the slot's setter: past the frozen __setattr__
        return dict(built)

    def _build_log_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "type": "decision",
            "decision_id": self.decision_id,
            "time": _log_time(self.timestamp),
            "decision_path": self.decision_path,
            "revision": self.revision,
            "mode": self.mode,
            "result": "allow" if self.allowed else "deny",
            "decision": "allow" if self.enforced_allowed else "deny",
            "reason": self.reason,
            "http_status": self.http_status,
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "duration_ms": round(self.duration_s * 1000, 3),
            "opa_ms": round(self.opa_duration_s * 1000, 3),
        }
        if self.policy_allowed is not None:
            fields["policy_result"] = "allow" if self.policy_allowed else "deny"
        if self.fail_open:
            fields["fail_open"] = True
        if self.tier is not None:
            fields["tier"] = self.tier
        if self.override_id is not None:
            fields["override_id"] = self.override_id
        if self.source is not None:
            fields["source"] = self.source
        if self.cached_from is not None:
            fields["cached_from"] = self.cached_from
        for key, value in self.identity.items():
            if key not in fields and key != "error":  # a policy cannot fake core fields
                fields[key] = value
        if self.error is not None:
            fields["error"] = self.error
        return fields


# DecisionRecord's fields in order, and each slot's setter (a slot's descriptor sets it
# past the frozen class's __setattr__).
FIELD_NAMES: Final = tuple(f.name for f in fields(DecisionRecord) if f.init)
_SETTERS: Final[tuple[Callable[[DecisionRecord, Any], None], ...]] = (
    *(getattr(DecisionRecord, name).__set__ for name in FIELD_NAMES),
    DecisionRecord._log_fields.__set__,  # type: ignore[misc,union-attr]
)
_set_log_fields: Final[Callable[[DecisionRecord, dict[str, Any]], None]] = _SETTERS[-1]
_consume: Final[Callable[[Iterable[object]], None]] = collections.deque[object](maxlen=0).extend


def record_from_fields(values: tuple[Any, ...]) -> DecisionRecord:
    """``DecisionRecord(*values)``, ``values`` one per ``__init__`` field in
    :data:`FIELD_NAMES` order, at half the cost (one per decision): the frozen
    dataclass's ``__init__`` sets each field through ``object.__setattr__``; this calls
    each slot's setter from C.
    DecisionRecord has no ``__post_init__`` to skip. Raises ValueError unless there is
    exactly one value per field."""
    if len(values) != len(FIELD_NAMES):
        raise ValueError(f"{len(values)} values for {len(FIELD_NAMES)} DecisionRecord fields")
    record = object.__new__(DecisionRecord)
    _consume(map(operator.call, _SETTERS, repeat(record), (*values, None)))
    return record


class DecisionSink(Protocol):
    """Receives every decision record (decision log, metrics, audit trail)."""

    def record(self, record: DecisionRecord) -> None:
        """Take one record; must not block the event loop for long."""
        ...
