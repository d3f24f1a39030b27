"""DecisionRecord: built from whatever the pipeline reached; logged without input."""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

import pytest

from authz.decision import Decision
from authz.errors import (
    AuthzError,
    ConfigError,
    CredentialError,
    DeadlineExceeded,
    DecisionPathError,
    InvalidDecision,
    OpaResponseError,
    OpaTimeout,
    OpaUnavailable,
    PolicyError,
    RequestError,
    UndefinedDecision,
)
from authz.policy import Evaluation
from authz.record import DecisionRecord
from authz.response import FAILURE_STATUS

QUERY_SECRET = "sk-QUERYSECRET0123456789"
HEADER_SECRET = "COOKIESECRET0123456789"
DIGEST = "a" * 64
EVALUATION = Evaluation(result=True, revisions={"bundle": "r7"}, duration_s=0.0025)


def document(
    headers: dict[str, str] | None = None,
    *,
    path: str = f"/api/v1/items?api_key={QUERY_SECRET}&page=2",
    http_id: str | None = "envoy-id-1",
) -> dict[str, Any]:
    """An input document as authz.input builds it (credential headers already digests)."""
    http: dict[str, Any] = {
        "method": "POST",
        "path": path,
        "host": "api.example",
        "headers": headers
        if headers is not None
        else {
            "authorization": f"sha256:{DIGEST}",
            "cookie": f"session={HEADER_SECRET}",
            "x-request-id": "req-123",
        },
    }
    if http_id is not None:
        http["id"] = http_id
    return {
        "attributes": {"request": {"http": http}},
        "parsed_path": ["api", "v1", "items"],
        "parsed_query": {"api_key": [QUERY_SECRET], "page": ["2"]},
        "credentials": {"authorization": DIGEST},
    }


def build(
    *,
    decision: Decision | None = None,
    error: AuthzError | None = None,
    evaluation: Evaluation | None = EVALUATION,
    doc: dict[str, Any] | None = None,
) -> DecisionRecord:
    return DecisionRecord.build(
        decision_id="d-1",
        timestamp=0.0,
        decision_path="authz/gateway/decision",
        document=doc if doc is not None else document(),
        evaluation=evaluation,
        decision=decision,
        error=error,
        duration_s=0.0123456,
    )


ADMIN = MappingProxyType({"key_id": "key-admin", "role": "admin"})


@pytest.mark.parametrize(
    ("decision", "allowed", "reason", "status", "identity"),
    [
        (
            Decision(allowed=True, form="object", reason="role_allowed", identity=ADMIN),
            True,
            "role_allowed",
            200,
            dict(ADMIN),
        ),
        (Decision(allowed=True, form="object"), True, "allowed", 200, {}),
        (Decision(allowed=True, form="object", http_status=401), True, "allowed", 200, {}),
        (Decision(allowed=True), True, "allowed", 200, {}),
        (Decision(allowed=False), False, "denied", 403, {}),
        (
            Decision(allowed=False, form="object", http_status=401, reason="missing_api_key"),
            False,
            "missing_api_key",
            401,
            {},
        ),
        (
            Decision(allowed=False, form="object", http_status=429, identity=ADMIN),
            False,
            "denied",
            429,
            dict(ADMIN),
        ),
    ],
    ids=[
        "allow-object-reason-identity",
        "allow-object-no-reason",
        "allow-ignores-http-status",
        "allow-boolean",
        "deny-boolean",
        "deny-with-status-and-reason",
        "deny-with-status-no-reason",
    ],
)
def test_build_from_decision(
    decision: Decision, allowed: bool, reason: str, status: int, identity: dict[str, str]
) -> None:
    record = build(decision=decision)
    assert (record.allowed, record.reason, record.http_status) == (allowed, reason, status)
    assert dict(record.identity) == identity
    assert (record.revision, record.opa_duration_s, record.duration_s) == ("r7", 0.0025, 0.0123456)
    assert (record.method, record.path, record.request_id) == ("POST", "/api/v1/items", "req-123")
    assert (record.decision_id, record.decision_path) == ("d-1", "authz/gateway/decision")
    assert record.error is None


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RequestError("bad percent-encoding"), 400),
        (UndefinedDecision("nothing at path"), 403),
        (InvalidDecision("expected allowed to be of type 'boolean'"), 500),
        (DecisionPathError("bad path"), 500),
        (OpaResponseError("OPA answered HTTP 500"), 500),
        (PolicyError("policy failed"), 500),
        (AuthzError("internal"), 500),
        (ConfigError("unexpected"), 500),
        (OpaUnavailable("refused"), 503),
        (OpaTimeout("no answer within 300 ms"), 503),
        (DeadlineExceeded("budget spent"), 503),
        (CredentialError("secret missing"), 503),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_build_from_error(error: AuthzError, status: int) -> None:
    record = build(error=error, evaluation=None)
    assert (record.allowed, record.reason, record.http_status) == (False, error.code, status)
    assert record.http_status == FAILURE_STATUS.get(error.code, 500)
    assert record.error == str(error)
    assert (record.revision, record.opa_duration_s) == ("", 0.0)
    assert dict(record.identity) == {}


def test_error_wins_over_decision() -> None:
    # e.g. the policy allowed, then the credential to inject was missing
    record = build(
        decision=Decision(allowed=True, form="object", reason="role_allowed", identity=ADMIN),
        error=CredentialError("secret 'svc' not loaded"),
    )
    assert (record.allowed, record.reason, record.http_status) == (
        False,
        "credential_unavailable",
        503,
    )
    assert record.error == "secret 'svc' not loaded"
    assert record.revision == "r7"


def test_no_decision_and_no_error_is_internal_error() -> None:
    record = build()
    assert (record.allowed, record.reason, record.http_status, record.error) == (
        False,
        "internal_error",
        500,
        None,
    )


def test_no_document() -> None:
    record = DecisionRecord.build(
        decision_id="d-2",
        timestamp=0.0,
        decision_path="authz/gateway/decision",
        document=None,
        evaluation=None,
        decision=None,
        error=RequestError("unparseable"),
        duration_s=0.0,
    )
    assert (record.request_id, record.method, record.path, record.document) == ("", "", "", None)
    assert record.log_fields()["reason"] == "invalid_request"


@pytest.mark.parametrize(
    ("headers", "http_id", "expected"),
    [
        ({"x-request-id": "req-9"}, "envoy-id", "req-9"),
        ({"x-request-id": "req-9"}, None, "req-9"),
        ({}, "envoy-id", "envoy-id"),
        ({"x-request-id": ""}, "envoy-id", "envoy-id"),
        ({}, None, ""),
    ],
    ids=["header-wins", "header-only", "envoy-id", "empty-header-falls-back", "neither"],
)
def test_request_id(headers: dict[str, str], http_id: str | None, expected: str) -> None:
    record = build(decision=Decision(allowed=True), doc=document(headers, http_id=http_id))
    assert record.request_id == expected
    assert record.log_fields()["request_id"] == expected


@pytest.mark.parametrize(
    ("raw_path", "expected"),
    [
        ("/a/b?token=x", "/a/b"),
        ("/a/b", "/a/b"),
        ("/a?b?c", "/a"),
        ("", ""),
    ],
    ids=["query-dropped", "no-query", "second-question-mark", "empty"],
)
def test_path_has_no_query(raw_path: str, expected: str) -> None:
    record = build(decision=Decision(allowed=True), doc=document(path=raw_path))
    assert record.path == expected


CORE_FIELDS = {
    "type",
    "decision_id",
    "time",
    "decision_path",
    "revision",
    "result",
    "reason",
    "http_status",
    "request_id",
    "method",
    "path",
    "duration_ms",
    "opa_ms",
}


@pytest.mark.parametrize(
    ("decision", "error", "extra_fields"),
    [
        (Decision(allowed=True, form="object", identity=ADMIN), None, {"key_id", "role"}),
        (Decision(allowed=False), None, set()),
        (None, OpaTimeout("no answer within 300 ms"), {"error"}),
    ],
    ids=["allow-with-identity", "deny", "error"],
)
def test_log_fields_keys(
    decision: Decision | None, error: AuthzError | None, extra_fields: set[str]
) -> None:
    assert set(build(decision=decision, error=error).log_fields()) == CORE_FIELDS | extra_fields


@pytest.mark.parametrize(
    ("decision", "error"),
    [
        (Decision(allowed=True, form="object", identity=ADMIN), None),
        (Decision(allowed=False, form="object", http_status=401), None),
        (None, OpaUnavailable("refused")),
    ],
    ids=["allow", "deny", "error"],
)
def test_log_fields_hold_no_input_headers_or_query(
    decision: Decision | None, error: AuthzError | None
) -> None:
    record = build(decision=decision, error=error)
    assert record.document is not None  # the record keeps it; the log line must not
    line = json.dumps(record.log_fields())
    for leaked in (QUERY_SECRET, HEADER_SECRET, DIGEST, "api_key", "cookie", "page=2"):
        assert leaked not in line
    assert record.log_fields()["path"] == "/api/v1/items"


def test_log_fields_values() -> None:
    fields = build(decision=Decision(allowed=True, form="object", identity=ADMIN)).log_fields()
    assert fields == {
        "type": "decision",
        "decision_id": "d-1",
        "time": "1970-01-01T00:00:00.000+00:00",
        "decision_path": "authz/gateway/decision",
        "revision": "r7",
        "result": "allow",
        "reason": "allowed",
        "http_status": 200,
        "request_id": "req-123",
        "method": "POST",
        "path": "/api/v1/items",
        "duration_ms": 12.346,
        "opa_ms": 2.5,
        "key_id": "key-admin",
        "role": "admin",
    }


def test_identity_cannot_overwrite_core_fields() -> None:
    forged = {field: "forged" for field in CORE_FIELDS} | {"key_id": "key-1"}
    record = build(
        decision=Decision(allowed=False, form="object", reason="missing_api_key", identity=forged)
    )
    fields = record.log_fields()
    assert fields["key_id"] == "key-1"
    assert {
        key: fields[key] for key in ("type", "decision_id", "result", "reason", "http_status")
    } == {
        "type": "decision",
        "decision_id": "d-1",
        "result": "deny",
        "reason": "missing_api_key",
        "http_status": 403,
    }
    assert "forged" not in fields.values()


def test_identity_cannot_overwrite_error() -> None:
    # build() drops identity on errors; the record type itself must still keep error last
    record = DecisionRecord(
        decision_id="d-3",
        timestamp=0.0,
        decision_path="authz/gateway/decision",
        allowed=False,
        reason="opa_timeout",
        http_status=503,
        identity={"error": "forged", "key_id": "key-1"},
        error="real",
    )
    assert (record.log_fields()["error"], record.log_fields()["key_id"]) == ("real", "key-1")
