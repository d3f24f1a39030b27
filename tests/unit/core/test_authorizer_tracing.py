"""The Authorizer's OpenTelemetry spans (authz.core.authorizer with a tracer), recorded by
the SDK's in-memory exporter: the span tree, its parent from the CheckRequest's W3C
``traceparent``, the attributes, and no header value or credential anywhere in a span."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from authz.core.authorizer import (
    CACHE_SPAN,
    CHECK_SPAN,
    OPA_SPAN,
    RATE_LIMIT_SPAN,
    Authorizer,
)
from authz.core.cache import DecisionCache
from authz.core.errors import OpaUnavailable
from authz.core.headers import CREDENTIAL_HEADERS
from authz.core.ratelimit import MemoryLimiter
from tests.helpers.fakes import FakeEngine, check_request

DEFAULT_PATH = "authz/gateway/decision"
DECISION_ID = "00000000-0000-4000-8000-000000000001"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
# An identified allow (the cache keeps only decisions naming an identity).
ALLOW: dict[str, Any] = {
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
    await traced(FakeEngine(ALLOW), exporter).check(check_request(headers=trace_headers))
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
    await traced(FakeEngine(ALLOW), exporter).check(request)
    check = by_name(exporter.get_finished_spans())[CHECK_SPAN]
    assert f"{check.context.trace_id:032x}" == TRACE_ID


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            ALLOW,
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
    authorizer = traced(FakeEngine(ALLOW), exporter, cache=DecisionCache())
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
    await traced(FakeEngine(ALLOW), exporter).check(request, metadata=lambda: metadata)
    check = by_name(exporter.get_finished_spans())[CHECK_SPAN]
    assert check.parent is not None
    assert f"{check.parent.span_id:016x}" == parent
    assert f"{check.context.trace_id:032x}" == TRACE_ID
