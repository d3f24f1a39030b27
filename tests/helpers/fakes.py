"""Test doubles for the I/O the core takes as parameters."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from authz.core.errors import OpaUnavailable, PolicyError, UndefinedDecision
from authz.core.opa import BatchEvaluation, Evaluation
from authz.core.record import DecisionRecord

if TYPE_CHECKING:
    from authz.core.authorizer import Authorizer

# A 63 KB JSON body (under the gateway's max_request_bytes, 65536) that parses into
# 21,000 objects: the costliest body an anonymous client can send.
LARGE_JSON_BODY = "[" + ",".join(["{}"] * 21000) + "]"


class ManualClock:
    """A clock the test moves by setting ``now`` (seconds; monotonic or Unix, as the code
    under test expects)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """A PolicyEngine answering from ``answer(path, document)``: a JSON result, or a
    PolicyError instance to raise. Records every call."""

    def __init__(
        self,
        answer: Callable[[str, Mapping[str, Any]], Any] | Any,
        *,
        delay_s: float = 0.0,
        revision: str = "rev-test",
        record: bool = True,
    ) -> None:
        self._answer = answer
        self._delay_s = delay_s
        self._revision = revision
        self.calls: list[tuple[str, Mapping[str, Any], float]] = []
        self._record = record  # False: keep no documents (memory measurements)
        self.closed = False

    async def evaluate(
        self, path: str, document: Mapping[str, Any], timeout_s: float
    ) -> Evaluation:
        if self._record:
            self.calls.append((path, document, timeout_s))
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        result = self._answer(path, document) if callable(self._answer) else self._answer
        if isinstance(result, PolicyError):
            raise result
        return Evaluation(result, {"authz": self._revision}, 0.001)

    async def close(self) -> None:
        self.closed = True


class FlakyEngine:
    """A PolicyEngine that fails (OpaUnavailable) while ``down`` and, while ``hang`` is
    set, blocks until cancelled; otherwise it allows. Starts down."""

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


class ListSink:
    """A DecisionSink keeping every record."""

    def __init__(self) -> None:
        self.records: list[DecisionRecord] = []

    def record(self, record: DecisionRecord) -> None:
        self.records.append(record)


def check_request(
    *,
    method: str = "GET",
    path: str = "/api/v1/status",
    headers: Mapping[str, str] | None = None,
    body: str = "",
    context_extensions: Mapping[str, str] | None = None,
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy sends it for one HTTP request."""
    all_headers = {":method": method, ":path": path, ":authority": "gateway"}
    all_headers.update(headers or {})
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=attribute_context_pb2.AttributeContext.Peer(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address="10.0.0.1", port_value=5555)
                )
            ),
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    id="42",
                    method=method,
                    path=path,
                    host="gateway",
                    scheme="http",
                    protocol="HTTP/1.1",
                    headers=all_headers,
                    body=body,
                    size=len(body),
                )
            ),
            context_extensions=dict(context_extensions or {}),
        )
    )


async def bytes_retained_per_check(authorizer: Authorizer, n: int = 100) -> float:
    """Bytes still allocated (tracemalloc) per anonymous POST of :data:`LARGE_JSON_BODY`
    after ``n`` checks through ``authorizer``, each to a distinct path."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            await authorizer.check(
                check_request(
                    method="POST",
                    path=f"/api/v1/items/{i}",
                    body=LARGE_JSON_BODY,
                    headers={"content-type": "application/json"},
                )
            )
        return (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()


def multipart_body(boundary: str, *, parts: int) -> str:
    """A ``multipart/form-data`` body (RFC 7578) with ``boundary`` and ``parts`` small
    text fields: the costliest body shape to parse per byte, at any size."""
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="f{{i}}"\r\n\r\nv\r\n'
    return "".join(part.format(i=i) for i in range(parts)) + f"--{boundary}--\r\n"


def upstream_headers(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    """The request headers an allow sets for the upstream (``ok_response.headers``)."""
    assert response.HasField("ok_response"), "expected an allow"
    return {o.header.key: o.header.value for o in response.ok_response.headers}


# --- issue #19, batch queries: a BatchPolicyEngine double -----------------------------


class FakeBatchEngine:
    """A BatchPolicyEngine answering each input from ``answer(path, document)`` (a JSON
    result; :data:`UNDEFINED` for no decision; a PolicyError instance to raise, which in
    a batch fails the whole query as an OPA runtime error does). While ``gate`` is
    cleared every query waits for it. ``batch_error`` fails every batch query;
    ``supported`` False answers a batch as a bundle without the batch rule;
    ``seconds_per_input`` sets the pace a batch answer reports (``duration_s``). Records
    ``singles`` (documents) and ``batches`` (lists of documents)."""

    def __init__(
        self, answer: Callable[[str, Mapping[str, Any]], Any], *, revision: str = "rev-test"
    ) -> None:
        self._answer = answer
        self.revision = revision
        self.gate = asyncio.Event()
        self.gate.set()
        self.batch_error: Exception | None = None
        self.supported = True
        self.seconds_per_input = 0.001  # the batch answers' duration_s, per input
        self.singles: list[Mapping[str, Any]] = []
        self.batches: list[list[Any]] = []
        self.closed = False

    async def evaluate(
        self, path: str, document: Mapping[str, Any], timeout_s: float
    ) -> Evaluation:
        self.singles.append(document)
        await self.gate.wait()
        result = self._answer(path, document)
        if isinstance(result, PolicyError):
            raise result
        if result is UNDEFINED:
            raise UndefinedDecision("undefined")
        return Evaluation(result, {"authz": self.revision}, 0.001)

    async def query_batch(
        self, path: str, documents: Sequence[Any], timeout_s: float
    ) -> BatchEvaluation:
        decoded = [orjson.loads(orjson.dumps(d)) for d in documents]  # Fragments too
        self.batches.append(decoded)
        await self.gate.wait()
        revisions = {"authz": self.revision}
        if self.batch_error is not None:
            raise self.batch_error
        if not self.supported:
            return BatchEvaluation(None, revisions, 0.001)
        results: list[Evaluation | None] = []
        for document in decoded:
            result = self._answer(path, document)
            if isinstance(result, PolicyError):
                raise result
            results.append(None if result is UNDEFINED else Evaluation(result, revisions, 0.001))
        return BatchEvaluation(tuple(results), revisions, self.seconds_per_input * len(decoded))

    async def close(self) -> None:
        self.closed = True


# What FakeBatchEngine's ``answer`` returns for "no decision for this input".
UNDEFINED: Final = object()
