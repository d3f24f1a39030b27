"""``authz.v1.Decisions/BatchCheck``'s edge (:mod:`authz.runtime.decisions`): each action
becomes the CheckRequest Envoy would send; a hostile request is refused as a whole with a
precise gRPC status, never decided, never quoting a header value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import pytest

from authz.core.authorizer import Authorizer
from authz.core.errors import BatchRequestError, BatchTooLarge, OpaUnavailable
from authz.runtime.decisions import DecisionsServicer, request_deserializer
from authz.v1 import decisions_pb2
from tests.helpers.fakes import FakeBatchEngine, ListSink

SECRET = "ak_do_not_echo_me"


def allow_gets(path: str, document: Mapping[str, Any]) -> Any:
    http = document["attributes"]["request"]["http"]
    return {
        "allowed": http["method"] == "GET" and "x-api-key" in document["credentials"],
        "http_status": 403,
        "authz": {"reason": "by_method", "identity": {"key_id": "k"}},
    }


def servicer(
    engine: FakeBatchEngine | None = None,
    sink: ListSink | None = None,
    calls: list[tuple[str, int]] | None = None,
) -> DecisionsServicer:
    authorizer = Authorizer(
        engine or FakeBatchEngine(allow_gets),
        default_decision_path="authz/gateway/decision",
        credential_headers=("x-api-key",),
        timeout_s=1.0,
        sinks=[sink] if sink else [],
    )
    return DecisionsServicer(
        authorizer,
        max_actions=5,
        max_bytes=4096,
        on_call=(lambda r, n: calls.append((r, n))) if calls is not None else None,
    )


def action(**fields: Any) -> decisions_pb2.Action:
    return decisions_pb2.Action(**{"method": "GET", "path": "/a", "host": "api", **fields})


def batch(
    *actions: decisions_pb2.Action, principal: Mapping[str, str] | None = None
) -> decisions_pb2.BatchCheckRequest:
    return decisions_pb2.BatchCheckRequest(
        principal=decisions_pb2.Principal(headers=principal or {"x-api-key": SECRET}),
        actions=actions,
    )


class Aborted(Exception):
    pass


class FakeContext:
    """The grpc.aio context BatchCheck uses: its deadline, peer and abort."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def time_remaining(self) -> float:
        return 5.0

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted


def test_an_action_becomes_the_check_request_envoy_would_send() -> None:
    checks = servicer().check_requests(
        batch(
            action(
                method="POST",
                path="/v1/x?q=1",
                host="api.example",
                headers={"content-type": "application/json"},
                context_extensions={"service": "openai"},
            )
        )
    )
    http = checks[0].attributes.request.http
    assert (http.method, http.path, http.host) == ("POST", "/v1/x?q=1", "api.example")
    assert dict(http.headers) == {
        ":method": "POST",
        ":path": "/v1/x?q=1",
        ":authority": "api.example",
        "x-api-key": SECRET,
        "content-type": "application/json",
    }
    assert dict(checks[0].attributes.context_extensions) == {"service": "openai"}


HOSTILE = [
    (batch(), BatchRequestError, "no actions"),
    (batch(*[action()] * 6), BatchTooLarge, "6 actions, at most 5"),
    (batch(action(method="")), BatchRequestError, "actions[0].method"),
    (batch(action(method="GET /x")), BatchRequestError, "actions[0].method"),
    (batch(action(), action(path="a")), BatchRequestError, "actions[1].path"),
    (batch(action(path="/a\r\nx-injected: 1")), BatchRequestError, "actions[0].path"),
    (batch(action(path="/" + "a" * 9000)), BatchRequestError, "actions[0].path"),
    (batch(action(host="a b")), BatchRequestError, "actions[0].host"),
    (batch(action(id="x" * 129)), BatchRequestError, "actions[0].id"),
    (batch(action(headers={"X-Upper": "1"})), BatchRequestError, "lowercase header name"),
    (batch(action(headers={":path": "/admin"})), BatchRequestError, "lowercase header name"),
    (batch(action(headers={"x-a": "1\r\nx-b: 2"})), BatchRequestError, "CR, LF or NUL"),
    (batch(action(headers={"x-api-key": SECRET})), BatchRequestError, "the principal's"),
    (batch(action(headers={"x-forwarded-for": "10.0.0.1"})), BatchRequestError, "caller"),
    (batch(action(headers={"x-authz-key-id": "admin"})), BatchRequestError, "caller"),
    (batch(action(), principal={"host": "evil"}), BatchRequestError, "caller"),
    (
        batch(action(headers={f"x-h{i}": "v" for i in range(101)})),
        BatchRequestError,
        "more than 100 headers",
    ),
    (
        batch(action(context_extensions={"decision_path": "authz/egress/decision"})),
        BatchRequestError,
        "decision_path",
    ),
]
HOSTILE_IDS = [
    "empty",
    "too-many-actions",
    "no-method",
    "method-not-a-token",
    "relative-path",
    "crlf-in-path",
    "long-path",
    "space-in-host",
    "long-id",
    "uppercase-header",
    "pseudo-header",
    "crlf-in-header-value",
    "credential-in-action",
    "forwarding-header",
    "own-namespace-header",
    "host-header",
    "too-many-headers",
    "decision-path",
]


@pytest.mark.parametrize(("request_", "error", "detail"), HOSTILE, ids=HOSTILE_IDS)
def test_a_hostile_request_is_refused_naming_the_field_never_the_value(
    request_: decisions_pb2.BatchCheckRequest, error: type[Exception], detail: str
) -> None:
    with pytest.raises(error) as refused:
        servicer().check_requests(request_)
    assert detail in str(refused.value)
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize(("request_", "error", "detail"), HOSTILE, ids=HOSTILE_IDS)
async def test_a_hostile_batch_check_aborts_and_decides_nothing(
    request_: decisions_pb2.BatchCheckRequest, error: type[Exception], detail: str
) -> None:
    engine, sink = FakeBatchEngine(allow_gets), ListSink()
    calls: list[tuple[str, int]] = []
    context = FakeContext()
    with pytest.raises(Aborted):
        await servicer(engine, sink, calls).BatchCheck(request_, context)  # type: ignore[arg-type]
    expected = (
        grpc.StatusCode.RESOURCE_EXHAUSTED
        if error is BatchTooLarge
        else grpc.StatusCode.INVALID_ARGUMENT
    )
    assert context.code == expected
    assert detail in context.details
    assert SECRET not in context.details
    assert engine.batches == []
    assert engine.singles == []
    assert sink.records == []
    assert calls == [(expected.name, len(request_.actions))]


@pytest.mark.parametrize(
    ("data", "error", "detail"),
    [
        (b"\xff\xff\xff", BatchRequestError, "not a BatchCheckRequest"),
        (b"\x12" * 5000, BatchTooLarge, "5000 bytes, at most 4096"),
    ],
    ids=["not-protobuf", "too-large"],
)
async def test_bytes_that_are_not_a_bounded_request_are_refused_unparsed(
    data: bytes, error: type[Exception], detail: str
) -> None:
    decoded = request_deserializer(4096)(data)
    context = FakeContext()
    with pytest.raises(Aborted):
        await servicer().BatchCheck(decoded, context)  # type: ignore[arg-type]
    expected = (
        grpc.StatusCode.RESOURCE_EXHAUSTED
        if error is BatchTooLarge
        else grpc.StatusCode.INVALID_ARGUMENT
    )
    assert context.code == expected
    assert detail in context.details


async def test_batch_check_answers_each_action_in_order_with_its_decision() -> None:
    sink = ListSink()
    calls: list[tuple[str, int]] = []
    request = batch(action(id="read"), action(id="write", method="DELETE"), action(id="again"))
    response = await servicer(sink=sink, calls=calls).BatchCheck(
        request,
        FakeContext(),  # type: ignore[arg-type]
    )
    assert [(r.id, r.allowed, r.http_status, r.reason) for r in response.results] == [
        ("read", True, 200, "by_method"),
        ("write", False, 403, "by_method"),
        ("again", True, 200, "by_method"),
    ]
    assert response.revision == "rev-test"
    assert [r.decision_id for r in response.results] == [r.decision_id for r in sink.records]
    assert all(r.peer == "ipv4:127.0.0.1:5000" for r in sink.records)
    assert calls == [("ok", 3)]


async def test_batch_check_when_opa_is_down_answers_denies_never_allows() -> None:
    engine = FakeBatchEngine(lambda p, d: OpaUnavailable("refused"))
    engine.batch_error = OpaUnavailable("refused")
    response = await servicer(engine).BatchCheck(
        batch(action(), action()),
        FakeContext(),  # type: ignore[arg-type]
    )
    assert [(r.allowed, r.http_status, r.reason) for r in response.results] == [
        (False, 503, "opa_unavailable")
    ] * 2
