"""Circuit breaker: a cancelled half-open probe must not wedge it (found in review)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from authz.core.errors import OpaUnavailable
from authz.core.opa import Evaluation
from authz.runtime.circuit import CircuitBreaker
from tests.unit.fakes import ManualClock


class Engine:
    """Fails while ``down``; while ``hang`` is set, blocks until cancelled."""

    def __init__(self) -> None:
        self.down = True
        self.hang = False

    async def evaluate(
        self, path: str, document: Mapping[str, Any], timeout_s: float
    ) -> Evaluation:
        if self.hang:
            await asyncio.sleep(3600)
        if self.down:
            raise OpaUnavailable("refused")
        return Evaluation(True)

    async def close(self) -> None:
        return None


async def breaker_after_a_cancelled_probe() -> CircuitBreaker:
    """A breaker whose half-open probe was cancelled mid-flight, OPA healthy again and an
    hour gone by: it must ask OPA again."""
    engine, clock = Engine(), ManualClock()
    breaker = CircuitBreaker(engine, failure_threshold=1, reset_timeout_s=5, clock=clock)
    with contextlib.suppress(OpaUnavailable):
        await breaker.evaluate("p", {}, 1)
    clock.now = 5.0  # reset timeout passed: the next query is the probe
    engine.hang = True
    probe = asyncio.create_task(breaker.evaluate("p", {}, 1))
    await asyncio.sleep(0.01)
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)
    engine.hang, engine.down = False, False  # OPA is back
    clock.now = 3600.0
    return breaker


async def test_cancelled_probe_does_not_leave_the_circuit_half_open_forever() -> None:
    # grpc.aio cancels the Check coroutine when Envoy resets the stream (the downstream
    # client went away). If that happens to the half-open probe, CancelledError
    # (a BaseException) skips every handler in CircuitBreaker.evaluate, `_probing` stays
    # True and every later query raises CircuitOpen("a probe is in flight") forever,
    # although OPA is healthy again.
    breaker = await breaker_after_a_cancelled_probe()
    result = await breaker.evaluate("p", {}, 1)
    assert result.result is True


async def test_client_cancelling_the_grpc_probe_call_wedges_the_breaker() -> None:
    # The same through the real gRPC server: the client (Envoy, when its downstream
    # disconnects) cancels the Check that carries the probe; afterwards every Check is
    # denied opa_circuit_open although OPA answers again.
    import json

    import grpc
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    from authz.core.authorizer import Authorizer
    from authz.runtime.server import create_server
    from tests.unit.fakes import check_request

    engine, clock = Engine(), ManualClock()
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


async def test_readyz_reports_a_wedged_breaker_as_not_ready() -> None:
    # While the breaker is stuck half open (above), /readyz's opa check only fails for
    # OPEN, so the pod stays ready while every Check is denied opa_circuit_open.
    from authz.runtime.server import _opa_check

    breaker = await breaker_after_a_cancelled_probe()

    async def opa_healthy() -> tuple[bool, str]:
        return True, "bundles activated"

    ok, detail = await _opa_check(opa_healthy, breaker)()
    wedged = True
    try:
        await breaker.evaluate("p", {}, 1)
        wedged = False
    except OpaUnavailable:
        pass
    assert not (ok and wedged), f"ready ({detail}) while every query fails fast"
