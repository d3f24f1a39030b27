"""A circuit breaker in front of OPA: stop hammering an unhealthy OPA, probe it back.

States (``closed`` -> ``open`` -> ``half_open`` -> ``closed``), after the classic pattern
(Nygard, *Release It!*): after ``failure_threshold`` consecutive connection failures
(:class:`~authz.core.errors.OpaUnavailable`: refused, reset, unreachable) the circuit opens and
every query fails at once with :class:`~authz.core.errors.CircuitOpen` for
``reset_timeout_s`` seconds; then one query is let through as a probe (``half_open``):
success closes the circuit, failure opens it again. OPA answering at all (even with an
undefined or invalid decision, or a policy error) counts as healthy.

Timeouts (:class:`~authz.core.errors.OpaTimeout`) do not count: under overload they come from
queueing (in authz as much as in OPA), each is already bounded by the decision budget,
and opening the circuit then would turn a slow period into seconds of denying every
request.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from authz.core.errors import CircuitOpen, OpaTimeout, OpaUnavailable
from authz.core.opa import BatchEvaluation, BatchPolicyEngine, Evaluation, PolicyEngine

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker"]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

_T = TypeVar("_T")


class CircuitBreaker:
    """A :class:`~authz.core.opa.PolicyEngine` wrapping ``engine``. ``clock`` is monotonic
    seconds; ``on_state_change(state)`` is called on every transition (metrics, logs)."""

    def __init__(
        self,
        engine: PolicyEngine,
        *,
        failure_threshold: int = 5,
        reset_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: Callable[[str], None] | None = None,
    ) -> None:
        self._engine = engine
        self._threshold = failure_threshold
        self._reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._on_state_change = on_state_change
        self.state = CLOSED
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

    async def evaluate(
        self, path: str, document: Mapping[str, Any], timeout_s: float
    ) -> Evaluation:
        """Evaluate through the breaker; raises CircuitOpen while open (and for queries
        other than the probe while half open), else whatever ``engine`` raises."""
        return await self._guarded(lambda: self._engine.evaluate(path, document, timeout_s))

    async def query_batch(
        self, path: str, documents: Sequence[Any], timeout_s: float
    ) -> BatchEvaluation:
        """A batch query through the breaker (as :meth:`evaluate`); an engine that cannot
        batch answers "no batch rule" (``results`` None), so the caller decides one by
        one."""
        engine = self._engine
        if not isinstance(engine, BatchPolicyEngine):
            return BatchEvaluation(None)
        return await self._guarded(lambda: engine.query_batch(path, documents, timeout_s))

    async def _guarded(self, query: Callable[[], Awaitable[_T]]) -> _T:
        if self.state == OPEN:
            if self._clock() < self._open_until:
                raise CircuitOpen("OPA circuit is open after repeated failures")
            self._transition(HALF_OPEN)
        probe = self.state == HALF_OPEN
        if probe:
            if self._probing:
                raise CircuitOpen("OPA circuit is half open; a probe is in flight")
            self._probing = True
        try:
            answer = await query()
        except OpaUnavailable:
            self._failed()
            raise
        except OpaTimeout:
            raise  # neither healthy nor down: no change
        except Exception:
            self._succeeded()  # OPA answered; the answer is someone else's problem
            raise
        finally:
            # Whatever ended the probe (an answer, an error, or the caller cancelling the
            # Check), the next query may probe again: never a probe "in flight" forever.
            if probe:
                self._probing = False
        self._succeeded()
        return answer

    def _failed(self) -> None:
        self._failures += 1
        if self.state == HALF_OPEN or self._failures >= self._threshold:
            self._open_until = self._clock() + self._reset_timeout_s
            self._transition(OPEN)

    def _succeeded(self) -> None:
        self._failures = 0
        if self.state != CLOSED:
            self._transition(CLOSED)

    def _transition(self, state: str) -> None:
        self.state = state
        if self._on_state_change is not None:
            self._on_state_change(state)

    async def close(self) -> None:
        """Close the wrapped engine."""
        await self._engine.close()
