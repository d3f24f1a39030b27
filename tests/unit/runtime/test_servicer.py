"""The gRPC edge: Check always answers with a CheckResponse, even when the core breaks."""

from __future__ import annotations

import json
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2

from authz.core.authorizer import Authorizer
from authz.runtime.servicer import AuthorizationServicer
from tests.helpers.fakes import FakeEngine, check_request


class _Context:
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
