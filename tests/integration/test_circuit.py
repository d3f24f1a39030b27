"""The OPA circuit breaker behind the real gRPC server: a Check the client cancels while
it carries the half-open probe leaves the breaker able to close again."""

from __future__ import annotations

import asyncio
import json

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.core.authorizer import Authorizer
from authz.runtime.circuit import CircuitBreaker
from authz.runtime.server import create_server
from tests.helpers.fakes import FlakyEngine, ManualClock, check_request


async def test_a_probe_call_cancelled_by_the_client_does_not_wedge_the_breaker() -> None:
    # Envoy cancels the Check when its downstream disconnects. When that Check carries
    # the half-open probe, the breaker must still close once OPA answers again, rather
    # than deny every later Check opa_circuit_open.
    engine, clock = FlakyEngine(), ManualClock()
    breaker = CircuitBreaker(engine, failure_threshold=1, reset_timeout_s=5, clock=clock)
    authorizer = Authorizer(
        breaker, default_decision_path="a/b", credential_headers=(), timeout_s=5.0
    )
    server = await create_server(authorizer, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            first = await stub.Check(check_request(), timeout=2)
            assert json.loads(first.denied_response.body)["error"] == "opa_unavailable"
            clock.now = 5.0
            engine.hang = True
            call = stub.Check(check_request(), timeout=2)
            await asyncio.sleep(0.2)
            call.cancel()
            await asyncio.sleep(0.2)
            engine.hang, engine.down = False, False
            clock.now = 3600.0
            later = await stub.Check(check_request(), timeout=2)
            assert later.HasField("ok_response"), later.denied_response.body
    finally:
        await server.stop(0)
