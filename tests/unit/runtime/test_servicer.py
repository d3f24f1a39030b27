"""The gRPC edge: Check always answers with a CheckResponse, even when the core breaks."""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.message import DecodeError

from authz.core.authorizer import Authorizer
from authz.runtime.servicer import AuthorizationServicer, add_to_server
from tests.helpers.fakes import FakeEngine, check_request


class _Context:
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def time_remaining(self) -> float:
        return 0.5


class _Exploding(Authorizer):
    async def check(self, *_: Any, **__: Any) -> Any:
        raise ZeroDivisionError("a bug")


async def test_unexpected_error_is_a_500_deny_not_a_grpc_error() -> None:
    servicer = AuthorizationServicer(
        _Exploding(
            FakeEngine(True), default_decision_path="a/b", credential_headers=(), timeout_s=0.3
        )
    )
    context: Any = _Context()
    response = await servicer.Check(check_request(), context)
    assert isinstance(response, external_auth_pb2.CheckResponse)
    assert response.denied_response.status.code == 500
    body = json.loads(response.denied_response.body)
    assert body["error"] == "internal_error"
    assert "a bug" not in response.denied_response.body
    assert response.dynamic_metadata["decision_id"] == body["decision_id"]


async def test_passes_the_grpc_deadline_to_the_authorizer() -> None:
    engine = FakeEngine(True)
    servicer = AuthorizationServicer(
        Authorizer(engine, default_decision_path="a/b", credential_headers=(), timeout_s=5.0)
    )
    context: Any = _Context()
    await servicer.Check(check_request(), context)
    assert engine.calls[0][2] < 0.5


def _with_invalid_utf8_path() -> bytes:
    """A serialized CheckRequest whose ``path`` string field holds invalid UTF-8, as a
    client other than Envoy may send: protobuf (Python's and Go's) refuses to parse it."""
    wire: bytes = check_request(path="/PLACEHOLDER").SerializeToString()
    return wire.replace(b"PLACEHOLDER", b"\xff\xfe" + b"x" * 9)


class _Server:
    def __init__(self) -> None:
        self.handlers: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, *_: Any) -> None:
        pass


class _CallDetails:
    method = "/envoy.service.auth.v3.Authorization/Check"


def test_request_with_invalid_utf8_does_not_parse_as_protobuf() -> None:
    # The premise: the stock deserializer raises, and grpc then answers a gRPC error.
    with pytest.raises(DecodeError):
        external_auth_pb2.CheckRequest.FromString(_with_invalid_utf8_path())


async def test_undecodable_request_is_a_400_deny_not_a_grpc_error() -> None:
    engine = FakeEngine(True)
    servicer = AuthorizationServicer(
        Authorizer(engine, default_decision_path="a/b", credential_headers=(), timeout_s=5.0)
    )
    server = _Server()
    add_to_server(servicer, server)
    handler = server.handlers[0].service(_CallDetails())
    request = handler.request_deserializer(_with_invalid_utf8_path())  # never raises
    context: Any = _Context()
    response = await handler.unary_unary(request, context)
    assert isinstance(response, external_auth_pb2.CheckResponse)
    assert response.denied_response.status.code == 400
    body = json.loads(response.denied_response.body)
    assert body["error"] == "invalid_request"
    assert response.dynamic_metadata["decision_id"] == body["decision_id"]
    assert engine.calls == []  # OPA is never asked about a request it cannot read
    good = handler.request_deserializer(check_request().SerializeToString())
    assert (await handler.unary_unary(good, context)).HasField("ok_response")
