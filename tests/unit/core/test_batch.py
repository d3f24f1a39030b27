"""The coalescer (:mod:`authz.core.batch`): concurrent misses gathered into bounded batch
queries, each input's outcome exactly its single query's, never an allow on an error."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from authz.core.batch import Coalescer
from authz.core.errors import (
    OpaResponseError,
    OpaTimeout,
    OpaUnavailable,
    PolicyError,
    UndefinedDecision,
)
from authz.core.opa import BatchEvaluation
from tests.helpers.fakes import UNDEFINED, FakeBatchEngine, ManualClock

PATH = "authz/gateway/decision"


def echo(path: str, document: Mapping[str, Any]) -> Any:
    """Allow with the input's own number: a decision that shows whose it is."""
    return {"allowed": True, "n": document["n"]}


async def decide(engine: Coalescer, documents: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Each document's result (or its error's class), deciding them all concurrently while
    the fake holds the first query in flight, so the rest queue."""

    async def one(document: Mapping[str, Any]) -> Any:
        try:
            return (await engine.evaluate(PATH, document, 5.0)).result
        except PolicyError as exc:
            return type(exc)

    return list(await asyncio.gather(*(one(d) for d in documents)))


async def held(fake: FakeBatchEngine, engine: Coalescer, count: int) -> list[Any]:
    """``count`` concurrent decisions of inputs ``{"n": i}`` queued behind a held query."""
    fake.gate.clear()
    task = asyncio.ensure_future(decide(engine, [{"n": n} for n in range(count)]))
    await asyncio.sleep(0.01)  # every decision has reached the coalescer
    fake.gate.set()
    return await task


async def test_alone_while_there_is_room_in_flight() -> None:
    """One decision at a time goes to OPA alone: no batch query, no wait."""
    fake = FakeBatchEngine(echo)
    engine = Coalescer(fake, max_in_flight=1)
    for n in range(3):
        assert (await engine.evaluate(PATH, {"n": n}, 1.0)).result == {"allowed": True, "n": n}
    assert fake.batches == []
    assert len(fake.singles) == 3


async def test_queued_misses_go_as_one_batch_each_getting_its_own_decision() -> None:
    """Nine decisions queued behind one in flight: one batch query of nine, and each
    input gets the decision for itself."""
    fake = FakeBatchEngine(echo)
    sizes: list[tuple[str, int]] = []
    engine = Coalescer(fake, max_in_flight=1, on_batch=lambda o, n: sizes.append((o, n)))
    results = await held(fake, engine, 10)
    assert results == [{"allowed": True, "n": n} for n in range(10)]
    assert [len(b) for b in fake.batches] == [9]
    assert sizes == [("decided", 9)]
    assert engine.in_flight == 0
    assert engine.queued == 0


@pytest.mark.parametrize(
    ("max_batch", "max_bytes", "expected"),
    [
        (4, 1 << 20, [4, 4, 4, 4, 3]),  # count bound: full batches leave at once
        (64, 3 * len(b'{"n":10}'), [3, 3, 3, 3, 3, 3, 1]),  # byte bound (inputs 1-9: 7 bytes)
    ],
    ids=["count", "bytes"],
)
async def test_batches_are_bounded_in_count_and_bytes(
    max_batch: int, max_bytes: int, expected: list[int]
) -> None:
    fake = FakeBatchEngine(echo)
    engine = Coalescer(fake, max_in_flight=1, max_batch=max_batch, max_bytes=max_bytes)
    results = await held(fake, engine, 20)
    assert results == [{"allowed": True, "n": n} for n in range(20)]
    assert sorted((len(b) for b in fake.batches), reverse=True) == sorted(expected, reverse=True)
    assert max(len(b) for b in fake.batches) <= max_batch


async def test_an_input_larger_than_the_byte_bound_is_never_queued() -> None:
    fake = FakeBatchEngine(echo)
    engine = Coalescer(fake, max_in_flight=1, max_bytes=8)
    fake.gate.clear()
    task = asyncio.ensure_future(decide(engine, [{"n": 1}, {"n": 2, "pad": "x" * 100}]))
    await asyncio.sleep(0.01)
    fake.gate.set()
    assert await task == [{"allowed": True, "n": 1}, {"allowed": True, "n": 2}]
    assert fake.batches == []
    assert len(fake.singles) == 2


@pytest.mark.parametrize(
    "error",
    [
        OpaUnavailable("refused"),
        OpaResponseError("HTTP 500 eval_conflict_error"),
        RuntimeError("x"),
    ],
    ids=["opa-unavailable", "runtime-error-in-one-input", "unexpected"],
)
async def test_a_failed_batch_falls_back_to_one_query_per_input(error: Exception) -> None:
    """Whatever fails the batch query, each input is decided alone and gets its own
    decision."""
    fake = FakeBatchEngine(echo)
    fake.batch_error = error
    outcomes: list[str] = []
    engine = Coalescer(fake, max_in_flight=1, on_batch=lambda o, n: outcomes.append(o))
    results = await held(fake, engine, 6)
    assert results == [{"allowed": True, "n": n} for n in range(6)]
    assert len(fake.batches) == 1
    assert len(fake.singles) == 6
    assert outcomes == ["failed"]


async def test_one_faulty_input_fails_only_itself_and_never_allows() -> None:
    """Input 3 fails to evaluate (the whole batch fails with it) and input 5 is
    undefined: after the fallback each has exactly its single query's error, every other
    input its decision."""

    def answer(path: str, document: Mapping[str, Any]) -> Any:
        if document["n"] == 3:
            return OpaResponseError("eval_conflict_error")
        if document["n"] == 5:
            return UNDEFINED
        return echo(path, document)

    fake = FakeBatchEngine(answer)
    engine = Coalescer(fake, max_in_flight=1)
    results = await held(fake, engine, 8)
    expected: list[Any] = [{"allowed": True, "n": n} for n in range(8)]
    expected[3], expected[5] = OpaResponseError, UndefinedDecision
    assert results == expected


async def test_an_undefined_input_alone_is_asked_again_singly() -> None:
    """A batch that answers but leaves one input undefined: only that input is asked
    again (and gets UndefinedDecision, as a single query would)."""
    fake = FakeBatchEngine(lambda p, d: UNDEFINED if d["n"] == 2 else echo(p, d))
    engine = Coalescer(fake, max_in_flight=1)
    results = await held(fake, engine, 4)
    assert results[2] is UndefinedDecision
    assert [d["n"] for d in fake.singles] == [0, 2]


async def test_every_input_fails_when_opa_fails_singly_too() -> None:
    """OPA down: the batch fails, and so does each fallback: an error for every input,
    never an allow."""
    fake = FakeBatchEngine(lambda p, d: OpaUnavailable("refused"))
    fake.batch_error = OpaUnavailable("refused")
    engine = Coalescer(fake, max_in_flight=1)
    assert await held(fake, engine, 5) == [OpaUnavailable] * 5


async def test_a_bundle_without_the_batch_rule_is_learnt_once_per_revision() -> None:
    """The first batch finds no rule: from then on, no batch query for that revision;
    a new revision (seen in any answer) is tried again."""
    fake = FakeBatchEngine(echo, revision="r1")
    fake.supported = False
    engine = Coalescer(fake, max_in_flight=1)
    assert await held(fake, engine, 5) == [{"allowed": True, "n": n} for n in range(5)]
    assert len(fake.batches) == 1
    await held(fake, engine, 5)
    assert len(fake.batches) == 1  # r1 has no batch rule: not asked again
    fake.revision, fake.supported = "r2", True
    await engine.evaluate(PATH, {"n": 0}, 1.0)  # an answer from the new revision
    await held(fake, engine, 5)
    assert len(fake.batches) == 2


async def test_a_waiter_past_its_budget_times_out_alone() -> None:
    """A queued decision whose budget runs out fails with OpaTimeout; the batch goes on
    for the others."""
    fake = FakeBatchEngine(echo)
    engine = Coalescer(fake, max_in_flight=1)
    fake.gate.clear()
    first = asyncio.ensure_future(engine.evaluate(PATH, {"n": 0}, 5.0))
    await asyncio.sleep(0)
    short = asyncio.ensure_future(engine.evaluate(PATH, {"n": 1}, 0.02))
    long = asyncio.ensure_future(engine.evaluate(PATH, {"n": 2}, 5.0))
    with pytest.raises(OpaTimeout):
        await short
    fake.gate.set()
    assert (await first).result["n"] == 0
    assert (await long).result == {"allowed": True, "n": 2}
    assert fake.batches == [[{"n": 2}]]  # the timed-out input was not sent


async def test_a_batch_answer_of_the_wrong_length_falls_back() -> None:
    class Short(FakeBatchEngine):
        async def query_batch(self, path: str, documents: Sequence[Any], timeout_s: float) -> Any:
            answer = await super().query_batch(path, documents, timeout_s)
            assert answer.results is not None
            return type(answer)(answer.results[:1], answer.revisions)

    fake = Short(echo)
    engine = Coalescer(fake, max_in_flight=1)
    assert await held(fake, engine, 4) == [{"allowed": True, "n": n} for n in range(4)]
    assert len(fake.singles) == 4


@pytest.mark.parametrize(
    ("max_batch", "max_bytes", "max_in_flight"),
    [(0, 1, 1), (1, 0, 1), (1, 1, 0)],
    ids=["max_batch", "max_bytes", "max_in_flight"],
)
def test_bounds_must_be_positive(max_batch: int, max_bytes: int, max_in_flight: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Coalescer(
            FakeBatchEngine(echo),
            max_batch=max_batch,
            max_bytes=max_bytes,
            max_in_flight=max_in_flight,
        )


async def test_close_closes_the_engine() -> None:
    fake = FakeBatchEngine(echo)
    await Coalescer(fake).close()
    assert fake.closed


PROBE: contextvars.ContextVar[str] = contextvars.ContextVar("probe")


async def test_a_batch_query_carries_no_single_requests_context() -> None:
    """The batch runs in a context of its own: the trace context the OPA client would
    propagate is no one request's (it was the launching decision's)."""
    seen: list[str | None] = []

    class Seeing(FakeBatchEngine):
        async def query_batch(self, path: str, documents: Sequence[Any], timeout_s: float) -> Any:
            seen.append(PROBE.get(None))
            return await super().query_batch(path, documents, timeout_s)

    PROBE.set("request-trace")
    fake = Seeing(echo)
    await held(fake, Coalescer(fake, max_in_flight=1), 4)
    assert seen == [None]


async def test_a_batch_holds_no_more_than_opa_decides_in_half_the_budget() -> None:
    """At 0.125 s per input and 1.25 s of budget, a batch holds 5 inputs (0.625 s); the
    rest wait for the next query, oldest first, and every input still gets its own
    decision. Before any pace is known the whole queue goes."""
    fake = FakeBatchEngine(echo)
    fake.seconds_per_input = 0.125
    engine = Coalescer(fake, max_in_flight=1, clock=ManualClock(0.0))

    async def round_(first: int) -> list[Any]:
        fake.gate.clear()
        docs = [{"n": first + n} for n in range(10)]
        task = asyncio.gather(*(engine.evaluate(PATH, d, 1.25) for d in docs))
        await asyncio.sleep(0.01)
        fake.gate.set()
        return [e.result["n"] for e in await task]

    assert await round_(0) == list(range(10))
    assert [len(b) for b in fake.batches] == [9]  # no pace known yet
    assert await round_(100) == list(range(100, 110))
    assert [[d["n"] for d in b] for b in fake.batches[1:]] == [
        [101, 102, 103, 104, 105],
        [106, 107, 108, 109],
    ]


@pytest.mark.parametrize(
    ("supported", "error", "outcome"),
    [(True, None, "decided"), (False, None, "unsupported"), (True, OpaUnavailable("x"), "failed")],
    ids=["decided", "unsupported", "failed"],
)
async def test_a_direct_batch_query_is_reported_like_a_coalesced_one(
    supported: bool, error: Exception | None, outcome: str
) -> None:
    fake = FakeBatchEngine(echo)
    fake.supported, fake.batch_error = supported, error
    reports: list[tuple[str, int]] = []
    engine = Coalescer(fake, on_batch=lambda o, n: reports.append((o, n)))
    with contextlib.suppress(OpaUnavailable):
        await engine.query_batch(PATH, [{"n": 1}, {"n": 2}], 1.0)
    assert reports == [(outcome, 2)]
    assert engine.in_flight == 0


async def test_a_refused_batch_query_without_provenance_is_learnt_for_the_active_revision() -> None:
    """OPA refusing the batch query (401/403: its answer names no revision) is kept for
    the revision the single answers report: no batch query again until it changes."""

    class Refused(FakeBatchEngine):
        async def query_batch(self, path: str, documents: Sequence[Any], timeout_s: float) -> Any:
            self.batches.append(list(documents))
            return BatchEvaluation(None)

    fake = Refused(echo, revision="r1")
    engine = Coalescer(fake, max_in_flight=1)
    for _ in range(3):
        assert await held(fake, engine, 4) == [{"allowed": True, "n": n} for n in range(4)]
    assert len(fake.batches) == 1
    fake.revision = "r2"
    await engine.evaluate(PATH, {"n": 0}, 1.0)
    await held(fake, engine, 4)
    assert len(fake.batches) == 2
