"""The OPA circuit breaker: opens after repeated failures, probes, closes; a cancelled
half-open probe never leaves it stuck, and readiness sees a breaker that fails fast."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import pytest

from authz.core.errors import CircuitOpen, OpaTimeout, OpaUnavailable, UndefinedDecision
from authz.core.opa import Evaluation
from authz.runtime.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from tests.helpers.fakes import FlakyEngine, ManualClock


async def breaker_after_a_cancelled_probe() -> CircuitBreaker:
    """A breaker whose half-open probe was cancelled mid-flight, OPA healthy again and an
    hour gone by: it must ask OPA again."""
    engine, clock = FlakyEngine(), ManualClock()
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
    # client went away). CancelledError is a BaseException: the probe flag must be
    # cleared for it too, or every later query is CircuitOpen("a probe is in flight")
    # although OPA is healthy again.
    breaker = await breaker_after_a_cancelled_probe()
    result = await breaker.evaluate("p", {}, 1)
    assert result.result is True


async def test_readyz_is_not_ready_while_the_breaker_fails_every_query() -> None:
    # Readiness and the breaker agree: the pod is never ready while every query through
    # the breaker fails fast (a breaker stuck half open would be such a case).
    from authz.runtime.readiness import opa_check

    breaker = await breaker_after_a_cancelled_probe()

    async def opa_healthy() -> tuple[bool, str]:
        return True, "bundles activated"

    ok, detail = await opa_check(opa_healthy, breaker)()
    wedged = True
    try:
        await breaker.evaluate("p", {}, 1)
        wedged = False
    except OpaUnavailable:
        pass
    assert not (ok and wedged), f"ready ({detail}) while every query fails fast"


# ----------------------------------------------------------------------------------------
# Opens after repeated failures, probes, closes.


class Switch:
    """An engine whose next answers are set by the test."""

    def __init__(self) -> None:
        self.failure: Exception | None = None
        self.calls = 0

    async def evaluate(
        self, path: str, document: Mapping[str, Any], timeout_s: float
    ) -> Evaluation:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return Evaluation(True)

    async def close(self) -> None:
        return None


async def test_opens_after_threshold_fails_fast_then_probes_and_closes() -> None:
    engine, clock = Switch(), ManualClock()
    states: list[str] = []
    breaker = CircuitBreaker(
        engine, failure_threshold=3, reset_timeout_s=5, clock=clock, on_state_change=states.append
    )
    engine.failure = OpaUnavailable("refused")
    for _ in range(3):
        with pytest.raises(OpaUnavailable):
            await breaker.evaluate("p", {}, 1)
    assert breaker.state == OPEN
    with pytest.raises(CircuitOpen):
        await breaker.evaluate("p", {}, 1)
    assert engine.calls == 3  # OPA not hammered while open
    clock.now = 5.0
    engine.failure = None
    assert (await breaker.evaluate("p", {}, 1)).result is True
    assert breaker.state == CLOSED
    assert states == [OPEN, HALF_OPEN, CLOSED]


async def test_failed_probe_reopens() -> None:
    engine, clock = Switch(), ManualClock()
    breaker = CircuitBreaker(engine, failure_threshold=1, reset_timeout_s=5, clock=clock)
    engine.failure = OpaUnavailable("refused")
    with pytest.raises(OpaUnavailable):
        await breaker.evaluate("p", {}, 1)
    clock.now = 5.0
    with pytest.raises(OpaUnavailable):
        await breaker.evaluate("p", {}, 1)
    assert breaker.state == OPEN
    clock.now = 9.0
    with pytest.raises(CircuitOpen):
        await breaker.evaluate("p", {}, 1)


async def test_policy_answers_count_as_healthy() -> None:
    engine = Switch()
    breaker = CircuitBreaker(engine, failure_threshold=2)
    engine.failure = OpaUnavailable("x")
    with pytest.raises(OpaUnavailable):
        await breaker.evaluate("p", {}, 1)
    engine.failure = UndefinedDecision("nothing here")
    with pytest.raises(UndefinedDecision):
        await breaker.evaluate("p", {}, 1)
    engine.failure = OpaUnavailable("x")
    with pytest.raises(OpaUnavailable):
        await breaker.evaluate("p", {}, 1)
    assert breaker.state == CLOSED  # the undefined answer reset the count


async def test_timeouts_never_open_the_circuit() -> None:
    engine = Switch()
    breaker = CircuitBreaker(engine, failure_threshold=2)
    engine.failure = OpaTimeout("slow under load")
    for _ in range(10):
        with pytest.raises(OpaTimeout):
            await breaker.evaluate("p", {}, 1)
    assert breaker.state == CLOSED
    assert engine.calls == 10
