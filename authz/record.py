"""DecisionRecord: what one decision was, for the decision log (and later audit/metrics).

One record per Check, built by :mod:`authz.authorizer` whatever the outcome. The record
holds only low-risk values: the input document it keeps has credential headers already
replaced by digests (:mod:`authz.input`), and :meth:`DecisionRecord.log_fields` never
includes the input, headers or query strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Protocol

from authz.decision import Decision
from authz.errors import AuthzError
from authz.policy import Evaluation
from authz.response import DEFAULT_DENY_STATUS, status_for

__all__ = ["DecisionRecord", "DecisionSink"]

_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One decision. ``timestamp`` is Unix seconds; durations are seconds.

    ``reason`` is a stable snake_case code: the policy's ``reason`` (or ``allowed`` /
    ``denied`` when it gave none) or the :class:`~authz.errors.AuthzError` code when no
    decision could be made, in which case ``error`` holds the log-only detail.
    """

    decision_id: str
    timestamp: float
    decision_path: str
    allowed: bool
    reason: str
    http_status: int
    revision: str = ""
    identity: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    request_id: str = ""
    method: str = ""
    path: str = ""
    duration_s: float = 0.0
    opa_duration_s: float = 0.0
    error: str | None = None
    document: Mapping[str, Any] | None = None

    @classmethod
    def build(
        cls,
        *,
        decision_id: str,
        timestamp: float,
        decision_path: str,
        document: Mapping[str, Any] | None,
        evaluation: Evaluation | None,
        decision: Decision | None,
        error: AuthzError | None,
        duration_s: float,
    ) -> DecisionRecord:
        """Assemble a record from whatever the pipeline got to before it finished."""
        if error is not None or decision is None:
            allowed, reason = False, error.code if error is not None else "internal_error"
            status = status_for(reason)
            identity = _EMPTY
        else:
            allowed = decision.allowed
            reason = decision.reason_code
            status = 200 if allowed else decision.http_status or DEFAULT_DENY_STATUS
            identity = decision.identity
        request_id = method = path = ""
        if document is not None:
            http = document.get("attributes", {}).get("request", {}).get("http", {})
            # Envoy's x-request-id ties the decision to the access log line.
            request_id = str(http.get("headers", {}).get("x-request-id") or http.get("id", ""))
            method = str(http.get("method", ""))
            path = str(http.get("path", "")).split("?", 1)[0]
        return cls(
            decision_id=decision_id,
            timestamp=timestamp,
            decision_path=decision_path,
            allowed=allowed,
            reason=reason,
            http_status=status,
            revision=evaluation.revision if evaluation is not None else "",
            identity=identity,
            request_id=request_id,
            method=method,
            path=path,
            duration_s=duration_s,
            opa_duration_s=evaluation.duration_s if evaluation is not None else 0.0,
            error=str(error) if error is not None else None,
            document=document,
        )

    def log_fields(self) -> dict[str, Any]:
        """The decision-log line as a JSON-ready dict, ``{"type": "decision", ...}``; it never
        holds the input, headers or query string. Identity fields cannot replace these."""
        fields: dict[str, Any] = {
            "type": "decision",
            "decision_id": self.decision_id,
            "time": datetime.fromtimestamp(self.timestamp, UTC).isoformat(timespec="milliseconds"),
            "decision_path": self.decision_path,
            "revision": self.revision,
            "result": "allow" if self.allowed else "deny",
            "reason": self.reason,
            "http_status": self.http_status,
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "duration_ms": round(self.duration_s * 1000, 3),
            "opa_ms": round(self.opa_duration_s * 1000, 3),
        }
        for key, value in self.identity.items():
            if key not in fields and key != "error":  # a policy cannot fake core fields
                fields[key] = value
        if self.error is not None:
            fields["error"] = self.error
        return fields


class DecisionSink(Protocol):
    """Receives every decision record (decision log, metrics, audit trail)."""

    def record(self, record: DecisionRecord) -> None:
        """Take one record; must not block the event loop for long."""
        ...
