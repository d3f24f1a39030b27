"""authz.core.authorizer: the decision pipeline, with OPA replaced by a fake engine.

Outcomes and their records, the budget, credentials, rate limits, modes; fail-open only
for an OPA that could not be asked, capped and loud; allows no policy decided (dry-run,
bypass, fail-open) strip what enforced allows strip."""

from __future__ import annotations

import gc
import inspect
import itertools
import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from authz.core import authorizer as authorizer_module
from authz.core.authorizer import (
    CACHE_SPAN,
    CHECK_SPAN,
    FAIL_OPEN_CODES,
    FAIL_OPEN_HEADER,
    OPA_SPAN,
    RATE_LIMIT_SPAN,
    Authorizer,
)
from authz.core.cache import DecisionCache
from authz.core.errors import (
    AddressNotAllowed,
    AuthzError,
    BatchRevisionError,
    ConfigError,
    CredentialError,
    DestinationUnresolved,
    InvalidDecision,
    OpaResponseError,
    OpaTimeout,
    OpaUnavailable,
    PolicyError,
    RateLimitUnavailable,
    UndefinedDecision,
)
from authz.core.headers import CREDENTIAL_HEADERS, UNENFORCED_REMOVALS
from authz.core.input import build_input
from authz.core.mode import Control, Mode
from authz.core.opa import Evaluation
from authz.core.ratelimit import MemoryLimiter, Quota, RateLimitResult
from authz.core.record import FIELD_NAMES, DecisionRecord
from authz.core.secret import Secret
from authz.runtime.audit import AuditTrail, connect, read_entries
from authz.runtime.config import DEFAULT_FAIL_OPEN_MAX_PER_S, Settings, load
from authz.runtime.metrics import Metrics, MetricsSink
from authz.runtime.server import build_authorizer
from tests.helpers.fakes import (
    UNDEFINED,
    FakeBatchEngine,
    FakeEngine,
    ListSink,
    ManualClock,
    check_request,
    multipart_body,
    upstream_headers,
)

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


ALLOW: dict[str, Any] = {
    "allowed": True,
    "authz": {"reason": "allowed", "identity": {"key_id": "k1"}},
}


@pytest.mark.parametrize(
    ("answer", "status", "reason"),
    [
        (True, 200, "allowed"),
        (False, 403, "denied"),
        (ALLOW, 200, "allowed"),
        (
            {"allowed": False, "http_status": 401, "authz": {"reason": "missing_api_key"}},
            401,
            "missing_api_key",
        ),
        (UndefinedDecision("nothing at path"), 403, "undefined_decision"),
        ("yes", 500, "invalid_decision"),
        ({"allowed": "true"}, 500, "invalid_decision"),
        ({"allowed": True, "headers": {"x-a": 1}}, 500, "invalid_decision"),
        ({"allowed": False, "headers": {"x-a": "v\r\nx-b: 1"}}, 500, "unsafe_header_mutation"),
        ({"allowed": True, "headers": {":path": "/admin"}}, 500, "unsafe_header_mutation"),
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
        "deny-header-crlf",
        "allow-pseudo-header",
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


async def test_an_answer_after_the_deadline_is_a_503_deny() -> None:
    # OPA is asked within the 0.3 s budget and allows, but its answer arrives 1 s later:
    # Envoy has given up on the call by then, so the outcome is deadline_exceeded.
    clock = ManualClock()

    def late_allow(path: str, document: Mapping[str, Any]) -> bool:
        clock.now += 1.0
        return True

    engine = FakeEngine(late_allow)
    outcome = await make(engine, clock=clock).check(check_request())
    assert len(engine.calls) == 1, "OPA was not asked"
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


# Plugin policies (issue #15): one object for both outcomes, free-text reasons, an identity
# of the policy's own shape. The plugin answers each with the status below; so must authz,
# and the fields the outcome does not use are recorded (for the ignored-fields metric).
PLUGIN_DECISIONS: list[tuple[dict[str, Any], int, tuple[str, ...]]] = [
    (
        {"allowed": True, "http_status": 403, "body": "denied", "headers": {"x-u": "a"}},
        200,
        ("body", "http_status"),
    ),
    (
        {
            "allowed": False,
            "http_status": 401,
            "body": "who are you?",
            "request_headers_to_remove": ["authorization"],
            "response_headers_to_add": {"x-r": "1"},
        },
        401,
        ("request_headers_to_remove", "response_headers_to_add"),
    ),
    (
        {"allowed": False, "reason": "User is not allowed to access this resource"},
        403,
        (),
    ),
    ({"allowed": True, "identity": {"user": {"name": "alice"}}, "source": "ldap"}, 200, ()),
    ({"allowed": True, "rate_limit": 5, "credential": "basic", "cache_ttl_s": "1h"}, 200, ()),
]


@pytest.mark.parametrize(
    ("answer", "status", "ignored"),
    PLUGIN_DECISIONS,
    ids=["one-object-allow", "one-object-deny", "free-text-reason", "own-identity", "own-keys"],
)
async def test_decision_the_plugin_accepts_never_fails(
    answer: dict[str, Any], status: int, ignored: tuple[str, ...]
) -> None:
    outcome = await make(FakeEngine(answer)).check(check_request())
    assert status_of(outcome.response) == status
    assert outcome.record.ignored_fields == ignored
    assert outcome.record.error is None


class _Secrets:
    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values

    def get(self, ref: str) -> Secret:
        if ref not in self._values:
            raise CredentialError(f"credential {ref!r} is absent")
        return Secret(self._values[ref])


EGRESS_ALLOW: dict[str, Any] = {
    "allowed": True,
    "headers": {"authorization": "Bearer policy-set-value", "x-keep": "1"},
    "request_headers_to_remove": ["authorization", "x-sandbox-token"],
    "authz": {
        "reason": "allowed",
        "credential": {"ref": "openai", "header": "authorization", "format": "Bearer {secret}"},
        "identity": {"sandbox_id": "sb-1", "service": "openai"},
    },
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

    deny = {**EGRESS_ALLOW, "allowed": False, "authz": {"reason": "path_not_allowed"}}
    outcome = await make(FakeEngine(deny), credentials=Exploding()).check(check_request())
    assert status_of(outcome.response) == 403


def _limited(rpm: int, burst: int | None = None) -> dict[str, Any]:
    rate_limit: dict[str, Any] = {"tier": "t", "key": "key:k1", "requests_per_minute": rpm}
    if burst is not None:
        rate_limit["burst"] = burst
    return {**ALLOW, "authz": {**ALLOW["authz"], "rate_limit": rate_limit}}


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

    answer = {
        **EGRESS_ALLOW,
        "authz": {
            **EGRESS_ALLOW["authz"],
            "rate_limit": {"tier": "t", "key": "s", "requests_per_minute": 0},
        },
    }
    outcome = await make(
        FakeEngine(answer), limiter=MemoryLimiter(), credentials=Exploding()
    ).check(check_request())
    assert status_of(outcome.response) == 429


# -- modes and failure policy ----------------------------------------------------------


def _response_headers(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    return {o.header.key: o.header.value for o in response.ok_response.response_headers_to_add}


def _request_headers(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    return {o.header.key: o.header.value for o in response.ok_response.headers}


DENY = {"allowed": False, "http_status": 403, "authz": {"reason": "role_not_allowed"}}


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


async def test_cache_hits_answer_from_the_entrys_prototype_byte_for_byte() -> None:
    """A hit's response comes from its cache entry's prototype, and is byte for byte what
    an authorizer without a cache builds for the same requests: each request's own
    decision id and rate-limit headers, never the prototype's."""
    answer = {
        **_limited(600, 10),
        "headers": {"x-authz-key-id": "k1"},
        "request_headers_to_remove": ["x-api-key"],
        "dynamic_metadata": {"key_id": "k1"},
    }

    def build(cache: DecisionCache | None) -> Authorizer:
        ids = (f"id-{i}" for i in itertools.count())
        return make(
            FakeEngine(answer),
            limiter=MemoryLimiter(clock=lambda: 1000.0),
            cache=cache,
            new_id=lambda: next(ids),
        )

    cache = DecisionCache()
    cached, uncached = build(cache), build(None)
    for i in range(4):
        request = check_request(headers={"x-api-key": "k", "x-request-id": str(i)})
        hit = (await cached.check(request)).response
        built = (await uncached.check(request)).response
        assert hit.SerializeToString(deterministic=True) == built.SerializeToString(
            deterministic=True
        )
    (entry,) = cache._entries.values()
    assert entry.prototype is not None  # the hits did go through the prototype


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
    # flood of refused requests grows memory by their size.
    authorizer = make(engine)
    await authorizer.check(check_request(**request_kwargs))  # warm lazy imports, plans
    # Start from no garbage at all: what earlier tests left (matplotlib's, for one) can
    # take more than one collection to free, and would be counted below otherwise.
    while gc.collect():
        pass
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


# ----------------------------------------------------------------------------------------
# Fail-open covers only an OPA that could not be asked: never authz's own deadline, a
# malformed request or a decision OPA gave.


EGRESS = "authz/egress/decision"
# No credential at all, to an admin route, with a body: what fail-open must never let by.
ADMIN_POST: dict[str, Any] = {
    "method": "POST",
    "path": "/api/v1/admin/users",
    "headers": {"content-type": "multipart/form-data; boundary=b"},
    "body": multipart_body("b", parts=200),
}


def make_fail_open(engine: Any, **kwargs: Any) -> Authorizer:
    options: dict[str, Any] = {
        "default_decision_path": DEFAULT_PATH,
        "credential_headers": ("x-api-key", "authorization"),
        "timeout_s": 0.3,
        "fail_open_paths": (DEFAULT_PATH, EGRESS),
    }
    options.update(kwargs)
    return Authorizer(engine, **options)


def _subclasses(cls: type[AuthzError]) -> Iterator[type[AuthzError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


POLICY_ERRORS: list[type[AuthzError]] = sorted(
    {PolicyError, *_subclasses(PolicyError)}, key=lambda c: c.code
)


@pytest.fixture
def slow_parse(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """A clock on which building the input document (parsing the body) takes 0.5 s."""
    clock = ManualClock()

    def slow_build(*args: Any, **kwargs: Any) -> Any:
        clock.now += 0.5
        return build_input(*args, **kwargs)

    monkeypatch.setattr("authz.core.authorizer.build_input", slow_build)
    return clock


async def test_fail_open_never_covers_a_body_that_burns_the_budget(
    slow_parse: ManualClock,
) -> None:
    # The parse spends the request's own 300 ms budget before OPA is asked: that is
    # authz's deadline, not OPA failing, so the anonymous admin POST is denied.
    engine = FakeEngine(ALLOW)
    outcome = await make_fail_open(engine, clock=slow_parse).check(check_request(**ADMIN_POST))
    assert engine.calls == []
    assert outcome.record.reason == "deadline_exceeded"
    assert not outcome.record.fail_open
    assert not outcome.response.HasField("ok_response"), "authz's own deadline failed open"


async def test_fail_open_never_covers_a_budget_spent_on_arrival() -> None:
    # Queueing: the request waited so long in authz that Envoy's deadline is past.
    engine = FakeEngine(ALLOW)
    outcome = await make_fail_open(engine).check(check_request(**ADMIN_POST), 0.005)
    assert outcome.record.reason == "deadline_exceeded"
    assert not outcome.response.HasField("ok_response"), "a queueing delay failed open"


@pytest.mark.parametrize("error", POLICY_ERRORS, ids=[c.code for c in POLICY_ERRORS])
async def test_fail_open_only_when_opa_is_unreachable_or_its_circuit_open(
    error: type[AuthzError],
) -> None:
    # README, Failures: fail open when OPA could not be asked (unreachable, circuit
    # open). An OPA timeout fails closed: authz's own slowness (a parse, a queue, a full
    # connection pool) spends the same budget, so a timeout does not prove OPA failed.
    outcome = await make_fail_open(FakeEngine(error("boom"))).check(check_request(**ADMIN_POST))
    expected = issubclass(error, OpaUnavailable)
    assert outcome.response.HasField("ok_response") is expected
    assert outcome.record.fail_open is expected
    if expected:
        assert upstream_headers(outcome.response)[FAIL_OPEN_HEADER] == error.code


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"path": "/api/v1/items%zz"},
        {"headers": {"content-type": "application/json"}, "body": "{"},
        {"context_extensions": {"decision_path": "../x"}},
    ],
    ids=["bad-percent-encoding", "bad-json-body", "bad-decision-path"],
)
async def test_fail_open_never_covers_a_malformed_request(request_kwargs: Any) -> None:
    # The route asks for its body (parse_body), so a malformed one is refused before OPA.
    engine = FakeEngine(OpaUnavailable("down"))
    outcome = await make_fail_open(engine, parse_body=True).check(check_request(**request_kwargs))
    assert not outcome.response.HasField("ok_response")
    assert not outcome.record.fail_open


def test_fail_open_codes_come_from_the_error_tree() -> None:
    eligible = {c.code for c in _subclasses(AuthzError) if c.fail_open_eligible}
    assert eligible == FAIL_OPEN_CODES
    assert {"opa_unavailable", "opa_circuit_open"} == FAIL_OPEN_CODES

    class Refused(OpaUnavailable):  # a new kind of "OPA unreachable" inherits it
        code = "opa_refused"

    assert Refused("x").fail_open_eligible


# -- the route's decision path is read before anything else ------------------------------


async def test_budget_spent_on_arrival_is_decided_on_the_routes_path() -> None:
    # The record (decision log, metrics, audit) and the fail-open check name the route's
    # path even when the budget is spent before anything else is done.
    outcome = await make_fail_open(FakeEngine(ALLOW), fail_open_paths=(DEFAULT_PATH,)).check(
        check_request(context_extensions={"decision_path": EGRESS}), 0.005
    )
    assert outcome.record.decision_path == EGRESS
    assert not outcome.response.HasField("ok_response")


async def test_bypass_records_the_routes_path() -> None:
    control = Control(Mode.BYPASS, allow_bypass=True)
    outcome = await make_fail_open(FakeEngine(ALLOW), control=control).check(
        check_request(context_extensions={"decision_path": EGRESS})
    )
    assert outcome.response.HasField("ok_response")
    assert outcome.record.decision_path == EGRESS


async def test_bypass_with_an_invalid_route_path_records_the_default_path() -> None:
    # A label value must be a valid path; bypass still allows (it decides nothing).
    control = Control(Mode.BYPASS, allow_bypass=True)
    outcome = await make_fail_open(FakeEngine(ALLOW), control=control).check(
        check_request(context_extensions={"decision_path": "../x"})
    )
    assert outcome.response.HasField("ok_response")
    assert outcome.record.decision_path == DEFAULT_PATH


# -- every fail-open allow is capped and loud ---------------------------------------------


def _capped(clock: ManualClock, max_per_s: int = 3, **kwargs: Any) -> Authorizer:
    return make_fail_open(
        FakeEngine(OpaUnavailable("refused")), clock=clock, fail_open_max_per_s=max_per_s, **kwargs
    )


async def _allowed(authorizer: Authorizer, n: int, path: str = DEFAULT_PATH) -> list[bool]:
    request = check_request(context_extensions={"decision_path": path})
    return [(await authorizer.check(request)).record.fail_open for _ in range(n)]


async def test_fail_open_allows_are_capped_per_path_per_second() -> None:
    # OPA down and a fail-open path: without a cap, every request an attacker sends
    # while OPA is down is allowed unchecked.
    clock = ManualClock(100.0)
    authorizer = _capped(clock)
    assert await _allowed(authorizer, 5) == [True, True, True, False, False]
    assert await _allowed(authorizer, 2, EGRESS) == [True, True]  # its own budget
    clock.now = 100.9
    assert await _allowed(authorizer, 1) == [False]
    clock.now = 101.0
    assert await _allowed(authorizer, 4) == [True, True, True, False]


async def test_fail_open_over_the_cap_fails_closed_with_the_original_error() -> None:
    clock = ManualClock(100.0)
    authorizer = _capped(clock, max_per_s=1)
    await authorizer.check(check_request())
    outcome = await authorizer.check(check_request())
    assert not outcome.response.HasField("ok_response")
    assert outcome.response.denied_response.status.code == 503
    assert (outcome.record.reason, outcome.record.fail_open) == ("opa_unavailable", False)
    assert outcome.record.error is not None
    assert "fail-open cap" in outcome.record.error


async def test_every_fail_open_allow_is_counted_and_audited(tmp_path: Path) -> None:
    metrics = Metrics()
    trail = AuditTrail(tmp_path / "audit.db")
    authorizer = _capped(ManualClock(100.0), sinks=[MetricsSink(metrics), trail])
    try:
        await _allowed(authorizer, 5, EGRESS)
    finally:
        trail.close()
    counted = metrics.registry.get_sample_value(
        "authz_fail_open_total", {"path": EGRESS, "code": "opa_unavailable"}
    )
    assert counted == 3
    conn = connect(tmp_path / "audit.db")
    try:
        audited = [e.body.get("fail_open", False) for e in read_entries(conn, kind="decision")]
    finally:
        conn.close()
    assert audited == [True, True, True, False, False]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "fail-open" in r.msg]


def _extra(record: logging.LogRecord, *names: str) -> tuple[Any, ...]:
    """The ``extra`` fields ``names`` of a log record."""
    return tuple(getattr(record, name) for name in names)


async def test_fail_open_warnings_are_rate_limited_per_path_and_count_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock(100.0)
    authorizer = _capped(clock, max_per_s=50)
    with caplog.at_level(logging.WARNING, logger="authz.core.authorizer"):
        await _allowed(authorizer, 5)
        await _allowed(authorizer, 2, EGRESS)
        first = _warnings(caplog)
        clock.now = 101.5
        await _allowed(authorizer, 1)
    assert [_extra(r, "decision_path", "suppressed") for r in first] == [
        (DEFAULT_PATH, 0),
        (EGRESS, 0),
    ]
    last = _warnings(caplog)[-1]
    assert _extra(last, "decision_path", "suppressed", "code") == (
        DEFAULT_PATH,
        4,
        "opa_unavailable",
    )


async def test_fail_open_cap_reached_is_logged_once_per_path_per_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock(100.0)
    authorizer = _capped(clock, max_per_s=1)
    with caplog.at_level(logging.WARNING, logger="authz.core.authorizer"):
        await _allowed(authorizer, 10)
    capped = [r for r in _warnings(caplog) if "cap" in r.msg]
    assert len(capped) == 1
    assert _extra(capped[0], "decision_path", "refused") == (DEFAULT_PATH, 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, DEFAULT_FAIL_OPEN_MAX_PER_S), ("7", 7), ("0", ConfigError), ("x", ConfigError)],
    ids=["default", "seven", "zero", "not-a-number"],
)
def test_fail_open_max_per_s_setting(value: str | None, expected: int | type[ConfigError]) -> None:
    environ = {} if value is None else {"AUTHZ_FAIL_OPEN_MAX_PER_S": value}
    if isinstance(expected, int):
        assert load(environ).fail_open_max_per_s == expected
    else:
        with pytest.raises(ConfigError, match="AUTHZ_FAIL_OPEN_MAX_PER_S"):
            load(environ)


async def test_build_authorizer_applies_the_fail_open_cap() -> None:
    settings = Settings(fail_open_paths=(DEFAULT_PATH,), fail_open_max_per_s=1)
    authorizer = build_authorizer(settings, FakeEngine(OpaUnavailable("refused")), [])
    assert await _allowed(authorizer, 2) == [True, False]


# ----------------------------------------------------------------------------------------
# Allows no policy decided (dry-run, bypass, fail-open) forward nothing an enforced allow
# strips; a decision OPA gave late is still enforced.


CONFIGURED_CREDENTIALS = ("x-api-key", "authorization", "proxy-authorization", "x-sandbox-token")
DENY_INVALID_KEY = {"allowed": False, "http_status": 401, "authz": {"reason": "invalid_api_key"}}


def make_unenforced(engine: Any, **kwargs: Any) -> Authorizer:
    options: dict[str, Any] = {
        "default_decision_path": DEFAULT_PATH,
        "credential_headers": CONFIGURED_CREDENTIALS,
        "timeout_s": 0.3,
    }
    options.update(kwargs)
    return Authorizer(engine, **options)


def upstream_sees(
    response: external_auth_pb2.CheckResponse, sent: dict[str, str]
) -> dict[str, str]:
    """The request headers the upstream receives: what the client sent, minus
    headers_to_remove, with the OkHttpResponse headers set on top."""
    assert response.HasField("ok_response")
    ok = response.ok_response
    removed = set(ok.headers_to_remove)
    seen = {k: v for k, v in sent.items() if k not in removed}
    seen.update({o.header.key: o.header.value for o in ok.headers})
    return seen


FORGED = {
    "x-api-key": "wrong",
    "x-authz-key-id": "key-demo-admin",
    "x-authz-role": "admin",
    "x-authz-tier": "unlimited",
}


@pytest.mark.parametrize(
    ("control", "fail_open_paths", "answer"),
    [
        (Control(Mode.DRY_RUN), (), DENY_INVALID_KEY),
        (Control(), (DEFAULT_PATH,), OpaUnavailable("down")),
        (Control(Mode.BYPASS, allow_bypass=True), (), DENY_INVALID_KEY),
    ],
    ids=["dry-run", "fail-open", "bypass"],
)
async def test_unenforced_allows_never_forward_forged_identity_headers(
    control: Control, fail_open_paths: tuple[str, ...], answer: Any
) -> None:
    # README (Gateway): "client-sent values of these [x-authz-key-id, -role, -tier], and
    # any other x-authz-* header, are overwritten or removed". That holds for an allow no
    # policy decided (dry-run suppressing a deny, fail-open, bypass) too: an
    # unauthenticated client's forged x-authz-role: admin never reaches the upstream.
    authorizer = make_unenforced(
        FakeEngine(answer), control=control, fail_open_paths=fail_open_paths
    )
    outcome = await authorizer.check(check_request(headers=FORGED))
    seen = upstream_sees(outcome.response, {**FORGED})
    forged = {k: v for k, v in seen.items() if k in FORGED and k != "x-api-key"}
    assert forged == {}, f"forged identity headers reach the upstream: {forged}"


async def test_bypass_never_forwards_the_client_credentials() -> None:
    # Credential headers are "for authz, never for the upstream", in bypass as in
    # dry-run and fail-open: on egress a sandbox token must not reach the third-party
    # API, on the gateway the API key must not reach the upstream (README).
    control = Control(Mode.BYPASS, allow_bypass=True)
    sent = {"x-api-key": "ak_live_secret", "x-sandbox-token": "sbt_secret"}
    outcome = await make_unenforced(FakeEngine(DENY_INVALID_KEY), control=control).check(
        check_request(headers=sent)
    )
    seen = upstream_sees(outcome.response, {**sent})
    assert "x-api-key" not in seen
    assert "x-sandbox-token" not in seen


class _SlowDeny(FakeEngine):
    """OPA answers a deny, 0.35 s after being asked (budget: 0.3 s)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(DENY_INVALID_KEY)
        self._clock = clock

    async def evaluate(self, path: str, document: Any, timeout_s: float) -> Any:
        self._clock.now += 0.35
        return await super().evaluate(path, document, timeout_s)


async def test_a_late_policy_deny_never_fails_open() -> None:
    # OPA answered: this sandbox/key is denied, just past the budget (a busy OPA, or an
    # attacker loading it). On a fail-open path the late deny stays a deny: fail-open is
    # for an OPA that could not be asked (README, Failures); a decision OPA actually gave
    # is enforced.
    clock = ManualClock()
    authorizer = make_unenforced(_SlowDeny(clock), fail_open_paths=(DEFAULT_PATH,), clock=clock)
    outcome = await authorizer.check(check_request(headers={"x-api-key": "wrong"}))
    assert outcome.record.policy_allowed is False
    assert not outcome.response.HasField("ok_response"), (
        f"policy deny turned into a fail-open allow ({outcome.record.reason})"
    )


# Every header an enforced allow strips, sent by a client.
HOSTILE = {
    **{name: "client-value" for name in UNENFORCED_REMOVALS},
    "x-my-credential": "configured-credential",
    "x-authz-anything": "forged",
}
UNENFORCED = [
    (Control(Mode.DRY_RUN), (), DENY_INVALID_KEY),
    (Control(), (EGRESS,), OpaUnavailable("down")),
    (Control(Mode.BYPASS, allow_bypass=True), (), DENY_INVALID_KEY),
]
UNENFORCED_IDS = ["dry-run", "fail-open", "bypass"]


@pytest.mark.parametrize(("control", "fail_open_paths", "answer"), UNENFORCED, ids=UNENFORCED_IDS)
async def test_unenforced_allows_strip_what_enforced_ones_strip(
    control: Control, fail_open_paths: tuple[str, ...], answer: Any
) -> None:
    # Dry-run, bypass and fail-open egress allows strip x-sandbox-id, cookie, api-key,
    # x-forwarded-for and x-http-method-override as an enforced allow does.
    authorizer = make_unenforced(
        FakeEngine(answer),
        control=control,
        fail_open_paths=fail_open_paths,
        credential_headers=(*CONFIGURED_CREDENTIALS, "x-my-credential"),
    )
    request = check_request(headers=HOSTILE, context_extensions={"decision_path": EGRESS})
    outcome = await authorizer.check(request)
    seen = upstream_sees(outcome.response, {**HOSTILE})
    leaked = sorted(name for name in HOSTILE if seen.get(name) == HOSTILE[name])
    assert leaked == [], f"an unenforced allow forwards {leaked}"


@pytest.mark.parametrize(("control", "fail_open_paths", "answer"), UNENFORCED, ids=UNENFORCED_IDS)
async def test_unenforced_allows_strip_raw_header_map_names_too(
    control: Control, fail_open_paths: tuple[str, ...], answer: Any
) -> None:
    # With encode_raw_headers, Envoy sends the headers only in header_map (any case).
    request = check_request(context_extensions={"decision_path": EGRESS})
    request.attributes.request.http.headers.clear()
    request.attributes.request.http.header_map.CopyFrom(
        base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key="X-Authz-Role", raw_value=b"admin"),
                base_pb2.HeaderValue(key="x-sandbox-id", raw_value=b"sb-1"),
            ]
        )
    )
    authorizer = make_unenforced(
        FakeEngine(answer), control=control, fail_open_paths=fail_open_paths
    )
    outcome = await authorizer.check(request)
    removed = set(outcome.response.ok_response.headers_to_remove)
    assert {"x-authz-role", "x-sandbox-id"} <= removed


async def test_record_carries_opas_answer_its_bundles_and_the_caller_for_the_decision_log() -> None:
    # The OPA-schema decision log writes result, bundles and requested_by from these.
    answer = {"allowed": True}
    outcome = await make(FakeEngine(answer, revision="rev-7")).check(
        check_request(), time_remaining_s=1.0, peer="ipv4:127.0.0.1:5555"
    )
    record = outcome.record
    assert (record.opa_result, dict(record.revisions), record.peer) == (
        answer,
        {"authz": "rev-7"},
        "ipv4:127.0.0.1:5555",
    )


async def test_record_of_a_check_opa_never_answered_has_no_result() -> None:
    outcome = await make(FakeEngine(OpaUnavailable("down"))).check(check_request())
    assert (outcome.record.opa_result, dict(outcome.record.revisions)) == (None, {})


# --- tracing -----------------------------------------------------------------------------


DECISION_ID = "00000000-0000-4000-8000-000000000001"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
# An identified allow (the cache keeps only decisions naming an identity).
TRACED_ALLOW: dict[str, Any] = {
    "allowed": True,
    "authz": {"reason": "allowed", "identity": {"key_id": "k1"}},
}
LIMITED: dict[str, Any] = {
    "allowed": True,
    "authz": {
        "reason": "allowed",
        "identity": {"key_id": "k1"},
        "rate_limit": {"tier": "t", "key": "key:k1", "requests_per_minute": 60},
    },
}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    spans.clear()


def traced(engine: FakeEngine, exporter: InMemorySpanExporter, **kwargs: Any) -> Authorizer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Authorizer(
        engine,
        default_decision_path=DEFAULT_PATH,
        credential_headers=("x-api-key", "authorization"),
        timeout_s=0.3,
        new_id=lambda: DECISION_ID,
        tracer=provider.get_tracer("test"),
        **kwargs,
    )


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]
    return named


async def test_check_span_is_a_server_span_under_envoys_traceparent(
    exporter: InMemorySpanExporter,
) -> None:
    authorizer = traced(
        FakeEngine(LIMITED), exporter, cache=DecisionCache(), limiter=MemoryLimiter()
    )
    await authorizer.check(check_request(headers={"traceparent": TRACEPARENT}))
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {CHECK_SPAN, CACHE_SPAN, OPA_SPAN, RATE_LIMIT_SPAN}
    check = spans[CHECK_SPAN]
    assert check.kind is SpanKind.SERVER
    assert f"{check.context.trace_id:032x}" == TRACE_ID
    assert check.parent is not None
    assert f"{check.parent.span_id:016x}" == PARENT_ID
    assert check.parent.is_remote
    for name in (CACHE_SPAN, OPA_SPAN, RATE_LIMIT_SPAN):
        child = spans[name]
        assert child.parent is not None
        assert child.parent.span_id == check.context.span_id, name
        assert child.context.trace_id == check.context.trace_id, name
    assert spans[OPA_SPAN].kind is SpanKind.CLIENT


@pytest.mark.parametrize(
    "trace_headers",
    [{}, {"traceparent": "00-zz-bad-01"}],
    ids=["no-traceparent", "malformed-traceparent"],
)
async def test_check_span_without_a_valid_traceparent_starts_a_new_trace(
    exporter: InMemorySpanExporter, trace_headers: dict[str, str]
) -> None:
    await traced(FakeEngine(TRACED_ALLOW), exporter).check(check_request(headers=trace_headers))
    check = by_name(exporter.get_finished_spans())[CHECK_SPAN]
    assert check.parent is None
    assert check.context.trace_id != 0


async def test_check_span_reads_traceparent_from_raw_header_map(
    exporter: InMemorySpanExporter,
) -> None:
    request = check_request()
    http = request.attributes.request.http
    http.headers.clear()
    http.header_map.headers.append(
        base_pb2.HeaderValue(key="traceparent", raw_value=TRACEPARENT.encode())
    )
    await traced(FakeEngine(TRACED_ALLOW), exporter).check(request)
    check = by_name(exporter.get_finished_spans())[CHECK_SPAN]
    assert f"{check.context.trace_id:032x}" == TRACE_ID


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            TRACED_ALLOW,
            {"authz.allowed": True, "authz.reason": "allowed", "http.response.status_code": 200},
        ),
        (
            {"allowed": False, "http_status": 401, "authz": {"reason": "missing_api_key"}},
            {
                "authz.allowed": False,
                "authz.reason": "missing_api_key",
                "http.response.status_code": 401,
            },
        ),
        (
            OpaUnavailable("refused"),
            {
                "authz.allowed": False,
                "authz.reason": "opa_unavailable",
                "http.response.status_code": 503,
            },
        ),
    ],
    ids=["allow", "deny", "opa-down"],
)
async def test_check_span_attributes_are_the_decisions_outcome(
    exporter: InMemorySpanExporter, answer: Any, expected: dict[str, Any]
) -> None:
    await traced(FakeEngine(answer), exporter).check(check_request())
    spans = by_name(exporter.get_finished_spans())
    attributes = dict(spans[CHECK_SPAN].attributes or {})
    assert attributes["authz.decision_id"] == DECISION_ID
    assert attributes["authz.decision_path"] == DEFAULT_PATH
    assert attributes["authz.cached"] is False
    assert {key: attributes[key] for key in expected} == expected
    failed = isinstance(answer, OpaUnavailable)
    assert spans[CHECK_SPAN].status.status_code is (
        StatusCode.ERROR if failed else StatusCode.UNSET
    )
    opa = spans[OPA_SPAN].status
    assert opa.status_code is (StatusCode.ERROR if failed else StatusCode.UNSET)
    assert opa.description == ("opa_unavailable" if failed else None)  # the code, not the text


async def test_cached_decision_is_marked_on_the_check_and_skips_the_opa_span(
    exporter: InMemorySpanExporter,
) -> None:
    authorizer = traced(FakeEngine(TRACED_ALLOW), exporter, cache=DecisionCache())
    await authorizer.check(check_request(headers={"x-api-key": "k"}))
    exporter.clear()
    await authorizer.check(check_request(headers={"x-api-key": "k"}))
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {CHECK_SPAN, CACHE_SPAN}
    assert (spans[CHECK_SPAN].attributes or {})["authz.cached"] is True
    assert (spans[CACHE_SPAN].attributes or {})["authz.cached"] is True


async def test_no_header_value_or_credential_in_any_span(
    exporter: InMemorySpanExporter,
) -> None:
    secrets = {name: f"secret-{i}-{name}" for i, name in enumerate(CREDENTIAL_HEADERS)}
    secrets["x-request-id"] = "request-id-value"
    secrets["tracestate"] = "vendor=tracestate-value"
    answer = {
        "allowed": False,
        "http_status": 401,
        "authz": {"reason": "invalid_api_key", "identity": {"key_id": "identity-value"}},
    }
    authorizer = traced(FakeEngine(answer), exporter, cache=DecisionCache())
    await authorizer.check(check_request(headers={"traceparent": TRACEPARENT, **secrets}))
    spans = exporter.get_finished_spans()
    assert len(spans) == 3
    forbidden = [*secrets.values(), "identity-value"]
    for span in spans:
        texts = [str(value) for value in (span.attributes or {}).values()]
        texts += [span.name, str(span.status.description)]
        for event in span.events:
            texts += [event.name, *(str(v) for v in (event.attributes or {}).values())]
        leaked = [value for value in forbidden if any(value in text for text in texts)]
        assert leaked == [], span.name


async def test_no_tracer_reads_no_trace_context(monkeypatch: pytest.MonkeyPatch) -> None:
    def extract(*_: Any, **__: Any) -> Any:
        raise AssertionError("trace context extracted with tracing off")

    monkeypatch.setattr("authz.core.authorizer.propagate.extract", extract)
    untraced = Authorizer(
        FakeEngine(LIMITED),
        default_decision_path=DEFAULT_PATH,
        credential_headers=(),
        timeout_s=0.3,
        cache=DecisionCache(),
        limiter=MemoryLimiter(),
    )
    outcome = await untraced.check(check_request(headers={"traceparent": TRACEPARENT}))
    assert outcome.record.allowed


@pytest.mark.parametrize(
    ("metadata", "parent"),
    [
        ((("traceparent", f"00-{TRACE_ID}-{'ab' * 8}-01"),), "ab" * 8),
        ((("traceparent", f"00-{TRACE_ID}-{'cd' * 8}-01".encode()),), "cd" * 8),
        ((("x-request-id", "r"),), PARENT_ID),
        (None, PARENT_ID),
    ],
    ids=["metadata-traceparent", "metadata-bytes", "metadata-without-traceparent", "no-metadata"],
)
async def test_check_span_parent_is_the_grpc_calls_trace_context_before_the_requests(
    exporter: InMemorySpanExporter,
    metadata: tuple[tuple[str, str | bytes], ...] | None,
    parent: str,
) -> None:
    request = check_request(headers={"traceparent": TRACEPARENT})
    await traced(FakeEngine(TRACED_ALLOW), exporter).check(request, metadata=lambda: metadata)
    check = by_name(exporter.get_finished_spans())[CHECK_SPAN]
    assert check.parent is not None
    assert f"{check.parent.span_id:016x}" == parent
    assert f"{check.context.trace_id:032x}" == TRACE_ID


# -- egress tunnels (issue 18) -----------------------------------------------------------

TUNNEL_ALLOW: dict[str, Any] = {
    "allowed": True,
    "headers": {"x-authz-tunnel-address": "10.0.0.1:22"},  # a policy's value never wins
    "authz": {
        "reason": "allowed",
        "identity": {"sandbox_id": "sb-1"},
        "tunnel": {"host": "pypi.org", "port": 443},
    },
}


class _Tunnels:
    """A TunnelResolver stand-in answering ``address`` or raising ``error``."""

    def __init__(self, address: str = "", error: Exception | None = None) -> None:
        self.address_value, self.error = address, error
        self.asked: list[tuple[str, int]] = []

    async def address(self, host: str, port: int, budget_s: float) -> str:
        self.asked.append((host, port))
        if self.error is not None:
            raise self.error
        return self.address_value


async def test_a_tunnel_allow_pins_the_checked_address_for_envoy() -> None:
    tunnels = _Tunnels("151.101.0.223:443")
    outcome = await make(FakeEngine(TUNNEL_ALLOW), tunnels=tunnels).check(check_request())
    assert tunnels.asked == [("pypi.org", 443)]
    pinned = [h for h in _upstream_headers(outcome.response) if h[0] == "x-authz-tunnel-address"]
    assert pinned == [("x-authz-tunnel-address", "151.101.0.223:443", OVERWRITE)]


@pytest.mark.parametrize(
    ("tunnels", "status", "reason"),
    [
        (None, 403, "address_not_allowed"),
        (_Tunnels(error=AddressNotAllowed("private")), 403, "address_not_allowed"),
        (_Tunnels(error=DestinationUnresolved("nxdomain")), 502, "destination_unresolved"),
    ],
    ids=["no-resolver", "private-answer", "unresolved"],
)
async def test_a_tunnel_that_cannot_be_pinned_is_denied(
    tunnels: _Tunnels | None, status: int, reason: str
) -> None:
    outcome = await make(FakeEngine(TUNNEL_ALLOW), tunnels=tunnels).check(check_request())
    assert status_of(outcome.response) == status
    assert error_of(outcome.response) == reason
    assert outcome.record.reason == reason


async def test_a_denied_tunnel_is_never_resolved() -> None:
    tunnels = _Tunnels("151.101.0.223:443")
    deny = {**TUNNEL_ALLOW, "allowed": False, "authz": {**TUNNEL_ALLOW["authz"], "reason": "x"}}
    outcome = await make(FakeEngine(deny), tunnels=tunnels).check(check_request())
    assert status_of(outcome.response) == 403
    assert tunnels.asked == []


# --- check_batch (issue #19): the batch decision API's pipeline ------------------------


def make_batch(
    engine: FakeBatchEngine | FakeEngine, sink: ListSink | None = None, **kwargs: Any
) -> Authorizer:
    """An Authorizer with a fresh decision id per decision."""
    ids = iter(range(1, 1_000_000))
    options: dict[str, Any] = {
        "default_decision_path": DEFAULT_PATH,
        "credential_headers": ("x-api-key", "authorization"),
        "timeout_s": 0.3,
        "sinks": [sink] if sink else [],
        "new_id": lambda: f"00000000-0000-4000-8000-{next(ids):012d}",
    }
    options.update(kwargs)
    return Authorizer(engine, **options)


def by_path(path: str, document: Mapping[str, Any]) -> Any:
    """Allow GETs of the key's own paths: a decision that shows which input it is for."""
    http = document["attributes"]["request"]["http"]
    if http["path"].startswith("/undefined"):
        return UNDEFINED
    if http["path"].startswith("/faulty"):
        return OpaResponseError("eval_conflict_error")
    allowed = http["method"] == "GET" and "x-api-key" in document["credentials"]
    reason = "allowed" if allowed else "forbidden"
    return {
        "allowed": allowed,
        "http_status": 403,
        "authz": {"reason": reason, "identity": {"key_id": "k1"}, "path": http["path"]},
    }


def planning(count: int = 20) -> list[external_auth_pb2.CheckRequest]:
    """A planning agent's actions: alternating GET and DELETE on its paths, one key."""
    return [
        check_request(
            method="GET" if i % 2 == 0 else "DELETE",
            path=f"/api/v1/items/{i}",
            headers={"x-api-key": "ak_secret"},
        )
        for i in range(count)
    ]


async def test_batch_of_20_is_decided_by_one_query_on_one_revision_each_audited() -> None:
    """20 actions: one batch query, 20 outcomes in order with 20 distinct decision ids,
    each recorded (the audit trail's input) with the one revision; the decisions are
    what check() gives for each request alone."""
    engine, sink = FakeBatchEngine(by_path, revision="rev-7"), ListSink()
    batch = await make_batch(engine, sink).check_batch(planning())
    assert len(engine.batches) == 1
    assert len(engine.batches[0]) == 20
    assert engine.singles == []
    assert batch.revision == "rev-7"
    assert [o.record.allowed for o in batch.outcomes] == [i % 2 == 0 for i in range(20)]
    ids = [o.record.decision_id for o in batch.outcomes]
    assert len(set(ids)) == 20
    assert [r.decision_id for r in sink.records] == ids
    assert all(r.revision == "rev-7" for r in sink.records)
    assert all("ak_secret" not in json.dumps(r.document) for r in sink.records)
    alone = make_batch(FakeBatchEngine(by_path, revision="rev-7"))
    for request, outcome in zip(planning(), batch.outcomes, strict=True):
        single = await alone.check(request)
        assert single.record.allowed == outcome.record.allowed
        assert single.record.reason == outcome.record.reason
        assert status_of(single.response) == status_of(outcome.response)


async def test_batch_undefined_action_is_its_own_deny() -> None:
    engine = FakeBatchEngine(by_path)
    requests = [*planning(2), check_request(path="/undefined", headers={"x-api-key": "k"})]
    batch = await make_batch(engine).check_batch(requests)
    assert [o.record.reason for o in batch.outcomes] == [
        "allowed",
        "forbidden",
        "undefined_decision",
    ]
    assert not batch.outcomes[2].record.allowed


async def test_batch_with_a_faulty_input_asks_each_alone_and_only_it_fails() -> None:
    """A runtime error in one input fails the batch query: each action is asked alone,
    the faulty one gets opa_error (a deny), the rest their decisions."""
    engine = FakeBatchEngine(by_path)
    requests = [*planning(3), check_request(path="/faulty", headers={"x-api-key": "k"})]
    batch = await make_batch(engine).check_batch(requests)
    assert len(engine.batches) == 1
    assert len(engine.singles) == 4
    assert [o.record.reason for o in batch.outcomes] == [
        "allowed",
        "forbidden",
        "allowed",
        "opa_error",
    ]
    assert [o.record.allowed for o in batch.outcomes] == [True, False, True, False]


async def test_batch_when_opa_is_down_denies_every_action() -> None:
    engine = FakeBatchEngine(lambda p, d: OpaUnavailable("refused"))
    engine.batch_error = OpaUnavailable("refused")
    batch = await make_batch(engine).check_batch(planning(5))
    assert [o.record.reason for o in batch.outcomes] == ["opa_unavailable"] * 5
    assert not any(o.record.allowed for o in batch.outcomes)
    assert not any(o.response.HasField("ok_response") for o in batch.outcomes)
    assert batch.revision == ""


async def test_batch_without_a_batch_rule_or_engine_asks_each_alone() -> None:
    unsupported = FakeBatchEngine(by_path)
    unsupported.supported = False
    plain = FakeEngine(lambda p, d: by_path(p, d))
    for engine in (unsupported, plain):
        batch = await make_batch(engine).check_batch(planning(4))
        assert [o.record.allowed for o in batch.outcomes] == [True, False, True, False]


async def test_batch_answers_spanning_revisions_are_asked_again_then_refused() -> None:
    """Singles that come back from two revisions are asked once more; if they still
    span revisions, the batch is refused (never answered from a mix)."""

    class Flipping(FakeBatchEngine):
        async def evaluate(
            self, path: str, document: Mapping[str, Any], timeout_s: float
        ) -> Evaluation:
            self.revision = f"r{len(self.singles) % 2}"
            return await super().evaluate(path, document, timeout_s)

    engine = Flipping(by_path)
    engine.supported = False
    with pytest.raises(BatchRevisionError):
        await make_batch(engine).check_batch(planning(3))
    assert len(engine.singles) == 6  # asked twice


async def test_batch_request_errors_stay_with_their_action() -> None:
    """A malformed action (bad percent-encoding) and a bad decision path are that
    action's deny, as in Check; the others are decided."""
    bad_path = check_request(path="/a%zz", headers={"x-api-key": "k"})
    bad_route = check_request(context_extensions={"decision_path": "no/-dash"})
    batch = await make_batch(FakeBatchEngine(by_path)).check_batch(
        [planning(1)[0], bad_path, bad_route]
    )
    assert [o.record.reason for o in batch.outcomes] == [
        "allowed",
        "invalid_request",
        "invalid_decision_path",
    ]


@pytest.mark.parametrize(
    ("mode", "allowed", "queries"),
    [(Mode.BYPASS, [True, True], 0), (Mode.DRY_RUN, [True, True], 1)],
    ids=["bypass", "dry-run"],
)
async def test_batch_follows_the_enforcement_mode(
    mode: Mode, allowed: list[bool], queries: int
) -> None:
    engine = FakeBatchEngine(by_path)
    control = Control(allow_bypass=True)
    control.set_mode(mode, actor="test", reason="test")
    batch = await make_batch(engine, control=control).check_batch(planning(2))
    assert [o.record.allowed for o in batch.outcomes] == allowed
    assert len(engine.batches) == queries
    assert batch.outcomes[1].record.policy_allowed is (False if queries else None)


async def test_batch_rate_limits_each_allowed_action_like_check() -> None:
    def limited(path: str, document: Mapping[str, Any]) -> Any:
        decision = by_path(path, document)
        decision["authz"]["rate_limit"] = {"tier": "t", "key": "k1", "requests_per_minute": 3}
        return decision

    gets = [check_request(path=f"/g/{i}", headers={"x-api-key": "k"}) for i in range(5)]
    batch = await make_batch(
        FakeBatchEngine(limited), limiter=MemoryLimiter(), burst_s=0.0
    ).check_batch(gets)
    reasons = [o.record.reason for o in batch.outcomes]
    assert reasons.count("rate_limited") >= 2
    assert all(not o.record.allowed for o in batch.outcomes if o.record.reason == "rate_limited")


async def test_default_decision_ids_are_distinct_canonical_version_4_uuids() -> None:
    """What ``str(uuid.uuid4())`` gives: RFC 9562 version 4, variant 10xx, lowercase
    canonical text (the decision log, audit trail and x-authz-decision-id carry it)."""
    authorizer = make(FakeEngine(True), new_id=_default_new_id())
    ids = [(await authorizer.check(check_request())).record.decision_id for _ in range(500)]
    assert len(set(ids)) == len(ids)
    for decision_id in ids:
        parsed = uuid.UUID(decision_id)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == decision_id
    # Every random bit varies: none stuck at 0 or 1 over 500 ids (each would be by
    # chance with probability 2 * 2**-500).
    ors = ands = uuid.UUID(ids[0]).int
    for decision_id in ids:
        ors |= uuid.UUID(decision_id).int
        ands &= uuid.UUID(decision_id).int
    fixed = (0xF << 76) | (0x3 << 62)  # version and variant bits
    assert ors | fixed == (1 << 128) - 1
    assert ands & ~fixed == 0


def _default_new_id() -> Any:
    """The Authorizer's own ``new_id`` default."""
    return inspect.signature(Authorizer).parameters["new_id"].default


# --- the record: built field by field, equal to the keyword construction it replaced -------


def _previous_record(
    authorizer: Authorizer,
    request: external_auth_pb2.CheckRequest,
    trace: Any,
    mode: Mode,
    started: float,
    decision_id: str,
    allowed: bool,
    fail_open: bool,
) -> DecisionRecord:
    """Authorizer._record as it was: DecisionRecord's keyword __init__."""
    reason, status = authorizer_module._reason_and_status(trace)
    decision, policy, evaluation = trace.decision, trace.policy, trace.evaluation
    request_id, method, path = authorizer_module._request_fields(request)
    if mode is Mode.BYPASS:
        reason, status, decided = "bypass", 200, True
    else:
        decided = decision.allowed if decision is not None and trace.error is None else False
    rate_limit = decision.rate_limit if decision is not None else None
    return DecisionRecord(
        decision_id=decision_id,
        timestamp=authorizer._wall_clock(),
        decision_path=trace.path,
        allowed=allowed,
        reason=reason,
        http_status=status,
        decision_allowed=decided,
        mode=mode.value,
        fail_open=fail_open,
        policy_allowed=policy.allowed if policy is not None else None,
        policy_reason=policy.reason_code if policy is not None else None,
        tier=rate_limit.tier if rate_limit is not None else None,
        override_id=decision.override_id if decision is not None else None,
        source=decision.source if decision is not None else None,
        cached_from=trace.cached_from,
        revision=evaluation.revision if evaluation is not None else "",
        identity=decision.identity if decision is not None else {},
        request_id=request_id,
        method=method,
        path=path,
        duration_s=authorizer._clock() - started,
        opa_duration_s=evaluation.duration_s if evaluation is not None else 0.0,
        error=str(trace.error) if trace.error is not None else None,
        document=trace.document,
        ignored_fields=policy.ignored if policy is not None else (),
        opa_result=evaluation.result if evaluation is not None else None,
        revisions=evaluation.revisions if evaluation is not None else {},
        peer=trace.peer,
    )


_RECORDS_COMPARED: list[int] = [0]


@pytest.fixture(autouse=True)
def _records_equal_the_keyword_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every record any test of this module makes (every scenario: allows, denies, errors,
    # modes, fail-open, cache hits, batches) is also built the previous way, with the
    # clocks read once for both, and must be equal field by field, types included.
    build = Authorizer._record

    def compared(self: Authorizer, *args: Any) -> DecisionRecord:
        wall_clock, clock = self._wall_clock, self._clock
        now, tick = wall_clock(), clock()
        self._wall_clock, self._clock = (lambda: now), (lambda: tick)
        try:
            record = build(self, *args)
            expected = _previous_record(self, *args)
        finally:
            self._wall_clock, self._clock = wall_clock, clock
        assert [(type(getattr(record, n)), getattr(record, n)) for n in FIELD_NAMES] == [
            (type(getattr(expected, n)), getattr(expected, n)) for n in FIELD_NAMES
        ]
        _RECORDS_COMPARED[0] += 1
        return record

    monkeypatch.setattr(Authorizer, "_record", compared)


async def test_records_are_compared_with_the_keyword_construction() -> None:
    # The fixture above wraps _record for every test here: a check goes through it.
    before = _RECORDS_COMPARED[0]
    sink = ListSink()
    await make(FakeEngine(lambda path, document: {"allowed": True}), sink).check(check_request())
    assert _RECORDS_COMPARED[0] == before + 1
    assert len(sink.records) == 1
