"""The decision pipeline, with OPA replaced by a fake engine."""

from __future__ import annotations

import gc
import json
from collections.abc import Mapping
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from authz.core.authorizer import Authorizer
from authz.core.cache import DecisionCache
from authz.core.errors import (
    CredentialError,
    InvalidDecision,
    OpaResponseError,
    OpaTimeout,
    OpaUnavailable,
    RateLimitUnavailable,
    UndefinedDecision,
)
from authz.core.mode import Control, Mode
from authz.core.ratelimit import MemoryLimiter, Quota, RateLimitResult
from authz.core.secret import Secret
from tests.unit.fakes import FakeEngine, ListSink, check_request

DEFAULT_PATH = "authz/gateway/decision"
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def make(engine: FakeEngine, sink: ListSink | None = None, **kwargs: Any) -> Authorizer:
    options: dict[str, Any] = {
        "default_decision_path": DEFAULT_PATH,
        "credential_headers": ("x-api-key", "authorization"),
        "timeout_s": 0.3,
        "sinks": [sink] if sink else [],
        "new_id": lambda: "00000000-0000-4000-8000-000000000001",
    }
    options.update(kwargs)
    return Authorizer(engine, **options)


def status_of(response: external_auth_pb2.CheckResponse) -> int:
    if response.HasField("ok_response"):
        return 200
    return int(response.denied_response.status.code)


def error_of(response: external_auth_pb2.CheckResponse) -> str:
    return str(json.loads(response.denied_response.body)["error"])


ALLOW = {"allowed": True, "reason": "allowed", "identity": {"key_id": "k1"}}


@pytest.mark.parametrize(
    ("answer", "status", "reason"),
    [
        (True, 200, "allowed"),
        (False, 403, "denied"),
        (ALLOW, 200, "allowed"),
        (
            {"allowed": False, "http_status": 401, "reason": "missing_api_key"},
            401,
            "missing_api_key",
        ),
        (UndefinedDecision("nothing at path"), 403, "undefined_decision"),
        ("yes", 500, "invalid_decision"),
        ({"allowed": "true"}, 500, "invalid_decision"),
        ({"allowed": True, "headers": {"x-a": 1}}, 500, "invalid_decision"),
        (OpaUnavailable("refused"), 503, "opa_unavailable"),
        (OpaTimeout("slow"), 503, "opa_timeout"),
        (OpaResponseError("HTTP 500"), 500, "opa_error"),
        (InvalidDecision("bad"), 500, "invalid_decision"),
    ],
    ids=[
        "bool-true",
        "bool-false",
        "object-allow",
        "object-deny",
        "undefined",
        "string-result",
        "allowed-not-bool",
        "header-not-string",
        "opa-down",
        "opa-timeout",
        "opa-500",
        "invalid",
    ],
)
async def test_outcomes(answer: Any, status: int, reason: str) -> None:
    sink = ListSink()
    outcome = await make(FakeEngine(answer), sink).check(check_request())
    assert status_of(outcome.response) == status
    assert outcome.record.reason == reason
    assert outcome.record.http_status == status
    assert outcome.record.allowed is (status == 200)
    assert sink.records == [outcome.record]
    if status != 200:
        assert outcome.response.status.code == code_pb2.PERMISSION_DENIED
        assert error_of(outcome.response) == reason
    assert outcome.response.dynamic_metadata["decision_id"] == outcome.record.decision_id


async def test_error_record_keeps_detail_but_body_does_not() -> None:
    engine = FakeEngine(OpaResponseError("OPA answered HTTP 500: secret-ish detail"))
    outcome = await make(engine).check(check_request())
    assert outcome.record.error is not None
    assert "secret-ish detail" in outcome.record.error
    assert "secret-ish detail" not in outcome.response.denied_response.body


@pytest.mark.parametrize(
    ("extensions", "expected_path"),
    [
        ({}, DEFAULT_PATH),
        ({"decision_path": "authz/egress/decision"}, "authz/egress/decision"),
        ({"other": "x"}, DEFAULT_PATH),
    ],
    ids=["default", "per-route", "unrelated-extension"],
)
async def test_decision_path_from_context_extensions(
    extensions: Mapping[str, str], expected_path: str
) -> None:
    engine = FakeEngine(True)
    outcome = await make(engine).check(check_request(context_extensions=extensions))
    assert engine.calls[0][0] == expected_path
    assert outcome.record.decision_path == expected_path


@pytest.mark.parametrize(
    "bad_path",
    ["/authz/gateway", "authz//x", "authz/gateway/../secrets", "a b", "", "authz.gateway"],
    ids=["leading-slash", "empty-segment", "dotdot", "space", "empty", "dots"],
)
async def test_invalid_decision_path_denies_without_asking_opa(bad_path: str) -> None:
    engine = FakeEngine(True)
    outcome = await make(engine).check(
        check_request(context_extensions={"decision_path": bad_path})
    )
    assert engine.calls == []
    assert status_of(outcome.response) == 500
    assert error_of(outcome.response) == "invalid_decision_path"


async def test_credentials_reach_opa_only_as_digests() -> None:
    engine = FakeEngine(True)
    await make(engine).check(
        check_request(headers={"x-api-key": "ak_secret_value", "authorization": "Bearer tok_1"})
    )
    document = engine.calls[0][1]
    dumped = json.dumps(document)
    assert "ak_secret_value" not in dumped
    assert "tok_1" not in dumped
    assert set(document["credentials"]) == {"x-api-key", "authorization"}


async def test_malformed_request_denied_400_without_asking_opa() -> None:
    engine = FakeEngine(True)
    outcome = await make(engine).check(check_request(path="/api/v1/items%zz"))
    assert engine.calls == []
    assert status_of(outcome.response) == 400
    assert error_of(outcome.response) == "invalid_request"


@pytest.mark.parametrize(
    ("remaining", "expected_budget"),
    [(None, 0.3), (10.0, 0.3), (0.2, 0.19)],
    ids=["no-deadline", "far-deadline", "near-deadline"],
)
async def test_budget_stays_inside_the_callers_deadline(
    remaining: float | None, expected_budget: float
) -> None:
    engine = FakeEngine(True)
    await make(engine).check(check_request(), remaining)
    # What is left of the budget when OPA is asked: a little less than the whole.
    assert expected_budget - 0.05 < engine.calls[0][2] <= expected_budget


async def test_deadline_already_spent_denies_503() -> None:
    engine = FakeEngine(True)
    outcome = await make(engine).check(check_request(), 0.005)
    assert engine.calls == []
    assert status_of(outcome.response) == 503
    assert error_of(outcome.response) == "deadline_exceeded"


async def test_late_answer_is_a_deny() -> None:
    ticks = iter([0.0, 1.0, 1.0])
    engine = FakeEngine(True)
    authorizer = make(engine, clock=lambda: next(ticks))
    outcome = await authorizer.check(check_request())
    assert status_of(outcome.response) == 503
    assert outcome.record.reason == "deadline_exceeded"


async def test_failing_sink_never_fails_the_request() -> None:
    class Broken:
        def record(self, record: object) -> None:
            raise RuntimeError("disk on fire")

    sink = ListSink()
    authorizer = Authorizer(
        FakeEngine(True),
        default_decision_path=DEFAULT_PATH,
        credential_headers=(),
        timeout_s=0.3,
        sinks=[Broken(), sink],
    )
    outcome = await authorizer.check(check_request())
    assert status_of(outcome.response) == 200
    assert len(sink.records) == 1


async def test_record_carries_revision_identity_and_request() -> None:
    outcome = await make(FakeEngine(ALLOW, revision="r-9")).check(
        check_request(
            method="POST", path="/api/v1/items?api_key=zzz", headers={"x-request-id": "req-1"}
        )
    )
    record = outcome.record
    assert record.revision == "r-9"
    assert record.identity == {"key_id": "k1"}
    assert (record.method, record.path, record.request_id) == ("POST", "/api/v1/items", "req-1")


class _Secrets:
    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values

    def get(self, ref: str) -> Secret:
        if ref not in self._values:
            raise CredentialError(f"credential {ref!r} is absent")
        return Secret(self._values[ref])


EGRESS_ALLOW = {
    "allowed": True,
    "reason": "allowed",
    "headers": {"authorization": "Bearer policy-set-value", "x-keep": "1"},
    "request_headers_to_remove": ["authorization", "x-sandbox-token"],
    "credential": {"ref": "openai", "header": "authorization", "format": "Bearer {secret}"},
    "identity": {"sandbox_id": "sb-1", "service": "openai"},
}


def _upstream_headers(response: external_auth_pb2.CheckResponse) -> list[tuple[str, str, int]]:
    return [(o.header.key, o.header.value, o.append_action) for o in response.ok_response.headers]


async def test_credential_is_injected_by_reference() -> None:
    secret = "sekrit-openai-value"
    outcome = await make(FakeEngine(EGRESS_ALLOW), credentials=_Secrets({"openai": secret})).check(
        check_request(headers={"authorization": "Bearer sandbox-sent"})
    )
    headers = _upstream_headers(outcome.response)
    auth = [h for h in headers if h[0] == "authorization"]
    assert auth == [("authorization", f"Bearer {secret}", OVERWRITE)]
    assert ("x-keep", "1", OVERWRITE) in headers
    # Never removed after being set, never in metadata, the record or the log line.
    assert "authorization" not in outcome.response.ok_response.headers_to_remove
    assert "x-sandbox-token" in outcome.response.ok_response.headers_to_remove
    assert secret not in str(outcome.response.dynamic_metadata)
    assert secret not in repr(outcome.record)
    assert secret not in json.dumps(outcome.record.log_fields())


@pytest.mark.parametrize(
    "credentials",
    [None, _Secrets({})],
    ids=["no-secrets-file", "absent-reference"],
)
async def test_unresolvable_credential_denies_503(credentials: _Secrets | None) -> None:
    outcome = await make(FakeEngine(EGRESS_ALLOW), credentials=credentials).check(check_request())
    assert status_of(outcome.response) == 503
    assert error_of(outcome.response) == "credential_unavailable"
    assert outcome.record.reason == "credential_unavailable"


async def test_denied_decision_never_resolves_a_credential() -> None:
    class Exploding:
        def get(self, ref: str) -> Secret:
            raise AssertionError("must not be called")

    deny = {**EGRESS_ALLOW, "allowed": False, "reason": "path_not_allowed"}
    outcome = await make(FakeEngine(deny), credentials=Exploding()).check(check_request())
    assert status_of(outcome.response) == 403


def _limited(rpm: int, burst: int | None = None) -> dict[str, Any]:
    rate_limit: dict[str, Any] = {"tier": "t", "key": "key:k1", "requests_per_minute": rpm}
    if burst is not None:
        rate_limit["burst"] = burst
    return {**ALLOW, "rate_limit": rate_limit}


async def test_rate_limit_allows_the_burst_then_429() -> None:
    authorizer = make(FakeEngine(_limited(60, 2)), limiter=MemoryLimiter())
    first = await authorizer.check(check_request())
    added = {
        o.header.key: o.header.value for o in first.response.ok_response.response_headers_to_add
    }
    assert added["ratelimit-limit"] == "60"
    assert added["ratelimit-remaining"] == "1"
    await authorizer.check(check_request())
    third = await authorizer.check(check_request())
    assert status_of(third.response) == 429
    assert error_of(third.response) == "rate_limited"
    assert third.record.reason == "rate_limited"
    assert third.record.identity == {"key_id": "k1"}
    denied = {o.header.key: o.header.value for o in third.response.denied_response.headers}
    assert denied["retry-after"] == "1"


async def test_burst_defaults_to_configured_seconds() -> None:
    authorizer = make(FakeEngine(_limited(60)), limiter=MemoryLimiter(), burst_s=3.0)
    statuses = [status_of((await authorizer.check(check_request())).response) for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


async def test_unlimited_has_no_headers_and_no_limit() -> None:
    authorizer = make(FakeEngine(_limited(-1)), limiter=MemoryLimiter())
    for _ in range(50):
        outcome = await authorizer.check(check_request())
        assert status_of(outcome.response) == 200
        assert list(outcome.response.ok_response.response_headers_to_add) == []


async def test_rate_limit_backend_down_in_strict_mode_denies_503() -> None:
    class Down:
        async def check(self, key: str, quota: Quota) -> RateLimitResult:
            raise RateLimitUnavailable("redis down")

        async def close(self) -> None:
            return None

    outcome = await make(FakeEngine(_limited(60)), limiter=Down()).check(check_request())
    assert status_of(outcome.response) == 503
    assert error_of(outcome.response) == "rate_limit_unavailable"


async def test_rate_limited_request_never_resolves_a_credential() -> None:
    class Exploding:
        def get(self, ref: str) -> Secret:
            raise AssertionError("must not be called")

    answer = {**EGRESS_ALLOW, "rate_limit": {"tier": "t", "key": "s", "requests_per_minute": 0}}
    outcome = await make(
        FakeEngine(answer), limiter=MemoryLimiter(), credentials=Exploding()
    ).check(check_request())
    assert status_of(outcome.response) == 429


# -- modes and failure policy ----------------------------------------------------------


def _response_headers(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    return {o.header.key: o.header.value for o in response.ok_response.response_headers_to_add}


def _request_headers(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    return {o.header.key: o.header.value for o in response.ok_response.headers}


DENY = {"allowed": False, "http_status": 403, "reason": "role_not_allowed"}


@pytest.mark.parametrize(
    ("answer", "reason", "status"),
    [
        (DENY, "role_not_allowed", 403),
        (OpaUnavailable("down"), "opa_unavailable", 503),
        ({"allowed": "nope"}, "invalid_decision", 500),
    ],
    ids=["policy-deny", "opa-down", "bad-decision"],
)
async def test_dry_run_allows_and_marks_what_would_have_been_denied(
    answer: Any, reason: str, status: int
) -> None:
    control = Control(Mode.DRY_RUN)
    outcome = await make(FakeEngine(answer), control=control).check(check_request())
    assert status_of(outcome.response) == 200
    marker = _response_headers(outcome.response)["x-authz-dry-run"]
    assert marker == f"would-deny; reason={reason}; status={status}"
    record = outcome.record
    assert (record.allowed, record.decision_allowed, record.mode) == (True, False, "dry-run")
    assert (record.reason, record.http_status) == (reason, status)
    assert record.suppressed


async def test_dry_run_leaves_allows_alone() -> None:
    outcome = await make(FakeEngine(ALLOW), control=Control(Mode.DRY_RUN)).check(check_request())
    assert "x-authz-dry-run" not in _response_headers(outcome.response)
    assert not outcome.record.suppressed


async def test_bypass_never_asks_opa() -> None:
    engine = FakeEngine(DENY)
    control = Control(Mode.BYPASS, allow_bypass=True)
    outcome = await make(engine, control=control).check(check_request())
    assert engine.calls == []
    assert status_of(outcome.response) == 200
    assert _request_headers(outcome.response)["x-authz-mode"] == "bypass"
    assert (outcome.record.mode, outcome.record.reason) == ("bypass", "bypass")


async def test_mode_switch_applies_to_the_next_request() -> None:
    control = Control()
    authorizer = make(FakeEngine(DENY), control=control)
    assert status_of((await authorizer.check(check_request())).response) == 403
    control.set_mode(Mode.DRY_RUN, actor="test", reason="rollout")
    assert status_of((await authorizer.check(check_request())).response) == 200
    control.set_mode(Mode.ENFORCE, actor="test", reason="done")
    assert status_of((await authorizer.check(check_request())).response) == 403


@pytest.mark.parametrize(
    ("answer", "fail_open"),
    [
        (OpaUnavailable("down"), True),
        (OpaTimeout("slow"), False),  # authz's own slowness spends the same budget
        (OpaResponseError("HTTP 500"), False),  # OPA answered: a policy error stays closed
        (UndefinedDecision("nothing"), False),
        ({"allowed": 1}, False),
        (DENY, False),
    ],
    ids=["unavailable", "timeout", "opa-error", "undefined", "invalid", "deny"],
)
async def test_fail_open_only_for_opa_failures_on_listed_paths(
    answer: Any, fail_open: bool
) -> None:
    authorizer = make(FakeEngine(answer), fail_open_paths=[DEFAULT_PATH])
    outcome = await authorizer.check(check_request())
    assert (status_of(outcome.response) == 200) is fail_open
    assert outcome.record.fail_open is fail_open
    if fail_open:
        assert _request_headers(outcome.response)["x-authz-fail-open"] == outcome.record.reason
        assert outcome.record.decision_allowed is False


async def test_fail_open_is_per_path() -> None:
    authorizer = make(FakeEngine(OpaUnavailable("down")), fail_open_paths=["authz/egress/decision"])
    outcome = await authorizer.check(check_request())
    assert status_of(outcome.response) == 503


async def test_record_keeps_policy_decision_apart_from_rate_limit() -> None:
    authorizer = make(FakeEngine(_limited(60, 1)), limiter=MemoryLimiter())
    await authorizer.check(check_request())
    limited = (await authorizer.check(check_request())).record
    assert (limited.policy_allowed, limited.policy_reason) == (True, "allowed")
    assert (limited.decision_allowed, limited.reason, limited.tier) == (False, "rate_limited", "t")


@pytest.mark.parametrize(
    ("control", "fail_open_paths", "answer"),
    [
        (Control(Mode.DRY_RUN), (), DENY),
        (Control(), (DEFAULT_PATH,), OpaUnavailable("down")),
    ],
    ids=["dry-run", "fail-open"],
)
async def test_unenforced_allows_keep_credentials_from_the_upstream(
    control: Control, fail_open_paths: tuple[str, ...], answer: Any
) -> None:
    authorizer = make(FakeEngine(answer), control=control, fail_open_paths=fail_open_paths)
    outcome = await authorizer.check(check_request(headers={"x-api-key": "ak_x"}))
    assert status_of(outcome.response) == 200
    removed = set(outcome.response.ok_response.headers_to_remove)
    assert {"x-api-key", "authorization"} <= removed


# -- decision cache ----------------------------------------------------------------------


async def test_cache_skips_opa_for_identical_requests_but_not_rate_limits() -> None:
    engine = FakeEngine(_limited(60, 2))
    authorizer = make(engine, limiter=MemoryLimiter(), cache=DecisionCache())
    request = check_request(headers={"x-api-key": "k", "x-request-id": "a"})
    first = await authorizer.check(request)
    again = await authorizer.check(check_request(headers={"x-api-key": "k", "x-request-id": "b"}))
    assert len(engine.calls) == 1
    assert again.record.cached_from == first.record.decision_id
    assert again.record.request_id == "b"  # the record is this request's, not the cached one
    assert again.record.opa_duration_s == 0
    third = await authorizer.check(check_request(headers={"x-api-key": "k", "x-request-id": "c"}))
    assert status_of(third.response) == 429  # rate limits still count every request
    await authorizer.check(check_request(headers={"x-api-key": "other"}))
    assert len(engine.calls) == 2


async def test_cache_never_holds_failures() -> None:
    engine = FakeEngine(OpaUnavailable("down"))
    authorizer = make(engine, cache=DecisionCache())
    await authorizer.check(check_request())
    await authorizer.check(check_request())
    assert len(engine.calls) == 2


@pytest.mark.parametrize(
    ("engine", "request_kwargs"),
    [
        (FakeEngine({"allowed": True}), {"path": "/api/v1/items?a=%zz"}),
        (FakeEngine(OpaUnavailable("refused")), {}),
        (FakeEngine({"allowed": "yes"}), {}),
        (FakeEngine(lambda path, doc: 1 / 0), {}),
    ],
    ids=["malformed-request", "opa-unavailable", "invalid-decision", "unexpected-error"],
)
async def test_a_refused_check_leaves_no_reference_cycle(
    engine: FakeEngine, request_kwargs: dict[str, Any]
) -> None:
    # A refused request must be freed when its check returns, not at the next full
    # collection: the server raises the GC thresholds, so anything a cycle pins (the
    # error's traceback -> frames -> the CheckRequest) stays until then, and a keyless
    # flood of refused requests grows memory by their size (issue #13, finding 3).
    authorizer = make(engine)
    await authorizer.check(check_request(**request_kwargs))  # warm lazy imports, plans
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            outcome = await authorizer.check(check_request(**request_kwargs))
            assert not outcome.response.HasField("ok_response")
        del outcome
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0
