"""Decision records as the audit trail stores them, for the CLI tests that read a trail
(``authz audit verify``, ``authz audit replay``)."""

from __future__ import annotations

from typing import Any, Final

from authz.core.input import build_input
from authz.core.record import DecisionRecord
from authz.runtime.config import DEFAULT_CREDENTIAL_HEADERS
from tests.helpers.fakes import check_request

__all__ = ["GATEWAY", "gateway_decision"]

GATEWAY: Final = "authz/gateway/decision"


def gateway_decision(
    decision_id: str, *, allowed: bool, reason: str, document: dict[str, Any] | None = None
) -> DecisionRecord:
    """A :data:`GATEWAY` decision at 1_760_000_000.0 (epoch seconds) enforced as the policy
    decided it: ``allowed`` and ``reason`` for both, HTTP 200 or 403. ``document`` is the
    OPA input (default: :func:`check_request`'s, built with the default credential
    headers)."""
    if document is None:
        document = build_input(check_request(), DEFAULT_CREDENTIAL_HEADERS)
    return DecisionRecord(
        decision_id=decision_id,
        timestamp=1_760_000_000.0,
        decision_path=GATEWAY,
        allowed=allowed,
        reason=reason,
        http_status=200 if allowed else 403,
        policy_allowed=allowed,
        policy_reason=reason,
        document=document,
    )
