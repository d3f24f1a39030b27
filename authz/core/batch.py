"""Coalescing concurrent cache misses into one OPA query.

:class:`Coalescer` is a :class:`~authz.core.opa.PolicyEngine` in front of the OPA client.
While fewer than ``max_in_flight`` queries are in flight, a decision goes to OPA at once,
alone, exactly as without it (an idle or lightly loaded authz adds no wait). Decisions
arriving while that many are in flight queue per decision path, and when a query ends the
oldest queue goes to OPA as one batch query (:meth:`BatchPolicyEngine.query_batch`, the
bundle's batch rule, ``authz generate batch-rule``): one HTTP round trip, one JSON
document each way and one OPA transaction for the whole queue, every input decided on
one store snapshot. Nothing waits for company: a batch holds what queued while OPA was
busy anyway, so its size follows the load (group commit).

Bounds: a queue holds at most ``max_batch`` inputs and ``max_bytes`` bytes of encoded
input (a full queue is sent at once, even past ``max_in_flight``); an input larger than
``max_bytes`` is never queued. A batch query also holds no more inputs than OPA decides,
at the pace of the recent batches, in half the tightest budget among them (the rest
go back to the front of the queue for the next query, so a queue holds at most twice its
bounds), so a slow OPA (a busy machine) never times out a whole queue at once.

Each waiting decision keeps its own budget: past it, it fails with
:class:`~authz.core.errors.OpaTimeout` as a single query would, and the batch goes on for
the others.

Falling back, never guessing: an input whose decision the batch left undefined, every
input of a batch query that failed (any error: OPA down, a runtime error in one input's
evaluation, which fails the whole query since Rego cannot catch it, an answer of the
wrong shape), and every input while the active bundle has no batch rule for the path (or
OPA's API authorization refuses the batch query), is decided again by its own single
query, within what is left of its budget, so its outcome (decision or error) is exactly
the single query's. Whether a bundle lacks the rule is learnt from the first batch's
answer and kept for that bundle revision (every answer's provenance tells the active
one), so such a bundle costs one batch query per revision, then none.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from authz.core.errors import OpaResponseError, OpaTimeout, PolicyError
from authz.core.opa import BatchEvaluation, BatchPolicyEngine, Evaluation

__all__ = [
    "BATCH_OUTCOMES",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_IN_FLIGHT",
    "Coalescer",
]

# Most inputs in one batch query (AUTHZ_OPA_BATCH_MAX): OPA decides them one after the
# other, so a larger batch only lengthens the wait of its first input.
DEFAULT_MAX_BATCH: Final = 64
# Most bytes of encoded input in one batch query: a queue a client can fill is bounded.
DEFAULT_MAX_BATCH_BYTES: Final = 1024 * 1024
# Queries in flight before decisions queue (AUTHZ_OPA_BATCH_IN_FLIGHT). One: every miss
# that arrives while OPA is busy joins the next batch, the least CPU per decision
# (bench/coalesce.py, docs/performance.md); an OPA with cores to spare may take more.
DEFAULT_MAX_IN_FLIGHT: Final = 1
# What ``on_batch(outcome, size)`` reports for each batch query.
BATCH_OUTCOMES: Final = ("decided", "failed", "unsupported")

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Waiter:
    """One queued decision: its input (as sent), its deadline (``clock`` seconds) and the
    future its batch sets: the Evaluation, or None for "decide it alone"."""

    encoded: bytes
    deadline: float
    future: asyncio.Future[Evaluation | None]


@dataclass(slots=True)
class _Queue:
    waiters: list[_Waiter] = field(default_factory=list)
    size: int = 0  # bytes of encoded input


class Coalescer:
    """A :class:`~authz.core.opa.BatchPolicyEngine` over ``engine`` that coalesces
    concurrent queries (module docstring). ``max_batch`` (inputs, >= 1; 1 turns coalescing
    off), ``max_bytes`` (encoded input bytes per batch) and ``max_in_flight`` (queries)
    bound it; ``on_batch(outcome, size)`` is told of each batch query (outcome one of
    :data:`BATCH_OUTCOMES`, size its inputs); ``clock`` is monotonic seconds. Create
    inside a running event loop."""

    def __init__(
        self,
        engine: BatchPolicyEngine,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        on_batch: Callable[[str, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1 or max_bytes < 1 or max_in_flight < 1:
            raise ValueError("max_batch, max_bytes and max_in_flight must be at least 1")
        self._engine = engine
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        self._max_in_flight = max_in_flight
        self._on_batch = on_batch
        self._clock = clock
        self._in_flight = 0
        self._queues: dict[str, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._revision: str | None = None  # the active bundle's, from the last answer
        self._no_batch: dict[str, str] = {}  # path -> revision without a batch rule for it
        # Seconds per input of recent batch queries (a moving average; 0: none yet).
        self._per_input_s = 0.0

    @property
    def in_flight(self) -> int:
        """Queries to OPA in flight now (single and batch)."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Decisions waiting for a batch now."""
        return sum(len(queue.waiters) for queue in self._queues.values())

    async def evaluate(
        self, path: str, document: Mapping[str, Any], timeout_s: float
    ) -> Evaluation:
        """Decide one input, alone or in a batch; raises what a single query raises
        (:meth:`~authz.core.opa.PolicyEngine.evaluate`)."""
        if (
            self._in_flight < self._max_in_flight
            or self._max_batch == 1
            or (path in self._no_batch and self._no_batch[path] == self._revision)
        ):
            return await self._single(path, document, timeout_s)
        encoded = orjson.dumps(document)
        if len(encoded) > self._max_bytes:
            return await self._single(path, document, timeout_s)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(encoded, self._clock() + timeout_s, loop.create_future())
        self._enqueue(path, waiter)
        try:
            async with asyncio.timeout(timeout_s):
                evaluation = await waiter.future
        except TimeoutError:
            raise OpaTimeout(f"OPA gave no answer within {timeout_s * 1000:.0f} ms") from None
        if evaluation is not None:
            return evaluation
        # Decide it alone: the batch failed, left it undefined, or the bundle has no rule.
        remaining = waiter.deadline - self._clock()
        if remaining <= 0:
            raise OpaTimeout(f"OPA gave no answer within {timeout_s * 1000:.0f} ms")
        return await self._single(path, document, remaining)

    async def query_batch(
        self, path: str, documents: Sequence[Any], timeout_s: float
    ) -> BatchEvaluation:
        """One batch query for ``documents`` now, not queued (the batch decision API),
        reported to ``on_batch`` like a coalesced one; see
        :meth:`~authz.core.opa.BatchPolicyEngine.query_batch`."""
        self._in_flight += 1
        try:
            answer = await self._engine.query_batch(path, documents, timeout_s)
        except Exception:
            self._report("failed", len(documents))
            raise
        finally:
            self._in_flight -= 1
            self._drain()
        if answer.revision:
            self._revision = answer.revision
        self._report("decided" if answer.results is not None else "unsupported", len(documents))
        return answer

    async def close(self) -> None:
        """Cancel the batch queries in flight (their waiters fail at their deadline, as
        the closed engine would fail them) and close ``engine``."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._engine.close()

    async def _single(self, path: str, document: Mapping[str, Any], timeout_s: float) -> Evaluation:
        self._in_flight += 1
        try:
            evaluation = await self._engine.evaluate(path, document, timeout_s)
        finally:
            self._in_flight -= 1
            self._drain()
        self._revision = evaluation.revision
        return evaluation

    def _enqueue(self, path: str, waiter: _Waiter) -> None:
        queue = self._queues.get(path)
        if queue is not None and queue.size + len(waiter.encoded) > self._max_bytes:
            self._launch(path)  # full in bytes: send it now, start another
            queue = None
        if queue is None:
            queue = self._queues[path] = _Queue()
        queue.waiters.append(waiter)
        queue.size += len(waiter.encoded)
        if len(queue.waiters) >= self._max_batch:
            self._launch(path)  # full in count: nothing gains from waiting

    def _drain(self) -> None:
        """A query ended: send the oldest queues while there is room in flight."""
        while self._queues and self._in_flight < self._max_in_flight:
            self._launch(next(iter(self._queues)))

    def _launch(self, path: str) -> None:
        queue = self._queues.pop(path)
        self._in_flight += 1  # counted now, so _drain never over-launches
        # An empty context: the batch belongs to no one request's trace (the OPA client
        # would otherwise send the trace of whichever decision happened to launch it).
        task = asyncio.create_task(
            self._run(path, queue.waiters), name="authz-opa-batch", context=contextvars.Context()
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, path: str, waiters: list[_Waiter]) -> None:
        try:
            live = [w for w in waiters if not w.future.done()]  # the rest gave up
            fits = self._fitting(live)
            if fits < len(live):  # the rest wait for the next query, oldest first
                self._requeue(path, live[fits:])
                live = live[:fits]
            if live:
                await self._decide(path, live)
        finally:
            self._in_flight -= 1
            self._drain()

    def _fitting(self, waiters: Sequence[_Waiter]) -> int:
        """How many of ``waiters`` (oldest first) one batch query may hold: as many as
        OPA decides, at the pace of the recent batches, within half the tightest budget
        among them, so a batch's answer comes while its inputs still want it (one slow
        batch never times out a whole queue). All of them while no pace is known."""
        if not waiters or self._per_input_s <= 0:
            return len(waiters)
        slack = min(w.deadline for w in waiters) - self._clock()
        return max(1, min(len(waiters), int(slack / 2 / self._per_input_s)))

    def _requeue(self, path: str, waiters: list[_Waiter]) -> None:
        queue = self._queues.get(path)
        if queue is None:
            queue = self._queues[path] = _Queue()
        queue.waiters[:0] = waiters
        queue.size += sum(len(w.encoded) for w in waiters)

    async def _decide(self, path: str, waiters: list[_Waiter]) -> None:
        timeout_s = max(w.deadline for w in waiters) - self._clock()
        try:
            if timeout_s <= 0:
                raise OpaTimeout("the batch's budget was spent while it queued")
            answer = await self._engine.query_batch(
                path, [orjson.Fragment(w.encoded) for w in waiters], timeout_s
            )
            if answer.results is not None and len(answer.results) != len(waiters):
                raise OpaResponseError(f"{len(answer.results)} results for {len(waiters)} inputs")
        except Exception as exc:  # every input is decided alone, with its own outcome
            if not isinstance(exc, PolicyError):
                log.exception("batch query failed unexpectedly; deciding one by one")
            self._report("failed", len(waiters))
            _settle(waiters, None)
            return
        if answer.revision:
            self._revision = answer.revision
        if answer.results is None:
            # An answer without provenance (OPA refused the query) stands for the
            # revision the other answers report.
            revision = answer.revision or self._revision or ""
            self._revision = self._no_batch[path] = revision
            log.info(
                "no batch rule for this decision path in the bundle, or OPA refuses the "
                "batch query; deciding one by one",
                extra={"decision_path": path, "revision": revision},
            )
            self._report("unsupported", len(waiters))
            _settle(waiters, None)
            return
        self._report("decided", len(waiters))
        per_input = answer.duration_s / len(waiters)
        self._per_input_s = (
            per_input if self._per_input_s <= 0 else (0.8 * self._per_input_s + 0.2 * per_input)
        )
        for waiter, evaluation in zip(waiters, answer.results, strict=True):
            if not waiter.future.done():
                waiter.future.set_result(evaluation)

    def _report(self, outcome: str, size: int) -> None:
        if self._on_batch is not None:
            try:
                self._on_batch(outcome, size)
            except Exception:  # a metrics hook must never fail a decision
                log.exception("batch metrics hook failed")


def _settle(waiters: Sequence[_Waiter], value: Evaluation | None) -> None:
    for waiter in waiters:
        if not waiter.future.done():
            waiter.future.set_result(value)
