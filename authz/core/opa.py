"""The OPA query: POST an input document to OPA's REST data API and get its result back.

Follows OPA's REST API (https://www.openpolicyagent.org/docs/rest-api#get-a-document-with-input):
``POST /v1/data/<path>?provenance`` with body ``{"input": ...}`` answers
``{"result": ..., "provenance": {"bundles": {<name>: {"revision": ...}}}}``; no ``result``
means nothing is defined at the path. Provenance gives the exact bundle revision that
produced each decision, for the decision log.

Transport and protocol failures become typed :mod:`authz.core.errors`, so the caller can fail
closed with a precise code:

- connection refused/reset, DNS, TLS          -> :class:`OpaUnavailable`
- no answer within the budget                 -> :class:`OpaTimeout`
- non-200 answer, or a body that is not JSON  -> :class:`OpaResponseError`
- a body over :data:`MAX_ANSWER_BYTES` (as sent or once inflated), an undecodable gzip
  body, or an unknown ``Content-Encoding``    -> :class:`OpaResponseError`
- a 200 answer without ``result``             -> :class:`UndefinedDecision`

The hot-path client is :mod:`authz.core.http1`: kept-alive HTTP/1.1 connections, each
request written in one piece and its answer parsed by httptools. The query runs on every
cache miss, and that costs about a quarter of aiohttp's client CPU per query (and less
of OPA's: the request arrives in one segment); httpx costs about 5x aiohttp's
(``docs/decisions.md``, ``docs/performance.md`` "Cost of a miss"). ``unix:///path`` URLs
talk to an OPA listening on a unix socket (``opa run --addr unix:///path``).

Answers are asked for uncompressed (``Accept-Encoding: identity``): OPA gzips a body of
``server.encoding.gzip.min_length`` bytes or more (default 1024) when the client accepts
gzip (https://www.openpolicyagent.org/docs/configuration#server), which buys nothing on
loopback and costs CPU on both sides (``docs/performance.md``, "OPA answers"). A gzip body
sent anyway (a proxy, another OPA setup) is still inflated, never beyond the cap.

With ``propagate_trace``, a query carries the current OpenTelemetry context as W3C
``traceparent``/``tracestate`` headers (the configured propagators), so an OPA run with
distributed tracing (https://www.openpolicyagent.org/docs/configuration#distributed-tracing)
joins its span to authz's ``authz.opa.query`` span.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import urlsplit

import orjson
from opentelemetry import propagate

from authz.core.errors import (
    ConfigError,
    OpaResponseError,
    OpaTimeout,
    OpaUnavailable,
    UndefinedDecision,
)
from authz.core.http1 import Answer, AnswerTooLarge, Http1Pool, TransportError
from authz.core.secret import Secret

__all__ = [
    "BATCH_QUERY_PATH",
    "MAX_ANSWER_BYTES",
    "BatchEvaluation",
    "BatchPolicyEngine",
    "Evaluation",
    "OpaClient",
    "PolicyEngine",
]

# The largest OPA answer read, in bytes, as sent and once inflated: a decision is a few
# hundred bytes; one echoing a whole 64 KiB request body fits many times over.
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024
_JSON_HEADERS: Final = (
    ("Content-Type", "application/json"),
    ("Accept", "application/json"),
)
_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})

# The batch rule's entrypoint (``authz generate batch-rule`` writes its package,
# ``policy/batch/batch.rego``): input ``{"path": <decision path>, "inputs": [...]}``,
# result ``{"decisions": {"<index>": <decision>}}``, undefined when the bundle has no batch
# rule for the path.
BATCH_QUERY_PATH: Final = "authz/batch/result"

_DECISION_PATH_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_decision_path(key: str, value: str) -> str:
    """Validate an OPA data path such as ``authz/gateway/decision`` (no leading slash,
    identifier segments). Returns it unchanged; raises ConfigError naming ``key``."""
    if not _DECISION_PATH_RE.fullmatch(value):
        raise ConfigError(
            f"{key}={value!r}: expected an OPA data path like 'authz/gateway/decision'"
        )
    return value


@dataclass(frozen=True, slots=True)
class Evaluation:
    """OPA's answer for one query.

    ``result`` is the decoded JSON ``result`` (any JSON type; :mod:`authz.core.decision` checks
    its shape). ``revisions`` maps bundle name to revision, from OPA's provenance.
    ``duration_s`` is the wall time of the OPA round trip, in seconds.
    """

    result: Any
    revisions: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    duration_s: float = 0.0

    @property
    def revision(self) -> str:
        """One string for logs: the revision of the only bundle, or ``name=rev`` pairs
        joined by ``,`` when several bundles are active; ``""`` when none."""
        if len(self.revisions) == 1:
            return next(iter(self.revisions.values()))
        return ",".join(f"{k}={v}" for k, v in sorted(self.revisions.items()))


@dataclass(frozen=True, slots=True)
class BatchEvaluation:
    """OPA's answer for one batch query: every input decided on one store snapshot.

    ``results`` holds, per input in order, its :class:`Evaluation` (sharing the batch's
    ``revisions`` and ``duration_s``) or None where the decision is undefined for that
    input; ``results`` is None when the active bundle has no batch rule for the path
    (a bundle built without ``policy/batch/``, or for other decision paths).
    """

    results: tuple[Evaluation | None, ...] | None
    revisions: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    duration_s: float = 0.0

    @property
    def revision(self) -> str:
        """The bundle revision, as :attr:`Evaluation.revision`."""
        return Evaluation(None, self.revisions).revision


class PolicyEngine(Protocol):
    """Evaluates a decision path against an input document (OPA, or a fake in tests)."""

    async def evaluate(
        self, path: str, document: Mapping[str, Any], timeout_s: float
    ) -> Evaluation:
        """Evaluate ``data.<path with / as .>`` with ``input = document`` within
        ``timeout_s`` seconds. Raises the :class:`~authz.core.errors.PolicyError` subclasses
        listed in this module's docstring."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class BatchPolicyEngine(PolicyEngine, Protocol):
    """A :class:`PolicyEngine` that can also decide many inputs in one query."""

    async def query_batch(
        self, path: str, documents: Sequence[Any], timeout_s: float
    ) -> BatchEvaluation:
        """Evaluate ``data.<path>`` for each of ``documents`` (input documents, or
        ``orjson.Fragment`` holding one already encoded) in one OPA query on one store
        snapshot, within ``timeout_s`` seconds. Raises the errors of
        :meth:`PolicyEngine.evaluate` for the query as a whole (a runtime error in any
        input's evaluation fails the whole query: Rego has no way to catch it)."""
        ...


class OpaClient:
    """HTTP/1.1 client for one OPA server (:class:`authz.core.http1.Http1Pool`). Create
    inside a running event loop.

    ``url`` is ``http(s)://host:port[/prefix]`` or ``unix:///path/to/socket``; ``token``
    is sent as ``Authorization: Bearer`` when OPA's API requires token authentication;
    ``pool_size`` bounds concurrent connections (each kept alive for ``keepalive_s``
    seconds); ``propagate_trace`` sends the current trace context on each query (off: no
    header is computed); ``accept_encoding`` is the ``Accept-Encoding`` sent (``identity``;
    ``bench.opa_encoding`` compares ``gzip``). Raises ValueError for a URL it cannot use.
    """

    def __init__(
        self,
        url: str,
        *,
        token: Secret | None = None,
        pool_size: int = 64,
        keepalive_s: float = 60.0,
        propagate_trace: bool = False,
        accept_encoding: str = "identity",
    ) -> None:
        self._propagate_trace = propagate_trace
        headers = [*_JSON_HEADERS, ("Accept-Encoding", accept_encoding)]
        if token:
            headers.append(("Authorization", f"Bearer {token.reveal()}"))
        if url.startswith("unix://"):
            self._prefix = ""
            self._pool = Http1Pool(
                unix_path=url.removeprefix("unix://"),
                host_header="opa",
                default_headers=headers,
                limit=pool_size,
                keepalive_s=keepalive_s,
                max_body=MAX_ANSWER_BYTES,
            )
            return
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) or unix:// URL: {url!r}")
        self._prefix = parts.path.rstrip("/")
        self._pool = Http1Pool(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl_context=ssl.create_default_context() if parts.scheme == "https" else None,
            host_header=parts.netloc.rpartition("@")[2],
            default_headers=headers,
            limit=pool_size,
            keepalive_s=keepalive_s,
            max_body=MAX_ANSWER_BYTES,
        )

    async def _send(
        self,
        method: str,
        path: str,
        timeout_s: float,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """One request to OPA -> (HTTP status, body, inflated). The one place transport
        failures become typed errors: OpaTimeout past ``timeout_s``, OpaResponseError for
        an answer over MAX_ANSWER_BYTES or in an unknown encoding, OpaUnavailable
        otherwise."""
        try:
            async with asyncio.timeout(timeout_s):
                answer = await self._pool.request(
                    method, f"{self._prefix}{path}", body, headers.items() if headers else ()
                )
        except TimeoutError:
            raise OpaTimeout(f"OPA gave no answer within {timeout_s * 1000:.0f} ms") from None
        except AnswerTooLarge as exc:
            raise OpaResponseError(str(exc)) from None
        except TransportError as exc:
            raise OpaUnavailable(f"OPA unreachable: {exc}") from None
        return answer.status, _read_answer(answer)

    async def evaluate(
        self, path: str, document: Mapping[str, Any], timeout_s: float
    ) -> Evaluation:
        """POST ``{"input": document}`` to ``/v1/data/<path>?provenance``; see
        :meth:`PolicyEngine.evaluate` for the errors raised."""
        started = time.perf_counter()
        headers: dict[str, str] | None = None
        if self._propagate_trace:
            headers = {}
            propagate.inject(headers)  # traceparent/tracestate of the current span
        status, payload = await self._send(
            "POST",
            f"/v1/data/{path}?provenance",
            timeout_s,
            orjson.dumps({"input": document}),
            headers,
        )
        return _parse_answer(status, payload, time.perf_counter() - started)

    async def query_batch(
        self, path: str, documents: Sequence[Any], timeout_s: float
    ) -> BatchEvaluation:
        """POST ``{"input": {"path": path, "inputs": documents}}`` to the batch rule
        (:data:`BATCH_QUERY_PATH`); see :meth:`BatchPolicyEngine.query_batch`. An answer
        401 or 403 (OPA's API authorization, ``infra/opa/system/authz.rego``, does not
        list the batch rule) is "no batch rule" too: decide one by one. Raises
        OpaResponseError as well for a result that is not the batch rule's shape."""
        started = time.perf_counter()
        headers: dict[str, str] | None = None
        if self._propagate_trace:
            headers = {}
            propagate.inject(headers)
        body = orjson.dumps({"input": {"path": path, "inputs": documents}})
        status, payload = await self._send(
            "POST", f"/v1/data/{BATCH_QUERY_PATH}?provenance", timeout_s, body, headers
        )
        duration_s = time.perf_counter() - started
        if status in (401, 403):  # OPA's API authorization does not allow the batch rule
            return BatchEvaluation(None, _EMPTY, duration_s)
        try:
            answer = _parse_answer(status, payload, duration_s)
        except UndefinedDecision:  # no batch rule for this path in the active bundle
            return BatchEvaluation(None, _provenance_of(payload), duration_s)
        return _batch_results(answer, len(documents))

    async def get(self, path: str, timeout_s: float) -> tuple[int, Any]:
        """GET an OPA endpoint (``/health?bundles``, ...) -> (HTTP status, decoded JSON or
        None). Raises OpaUnavailable or OpaTimeout like :meth:`evaluate`."""
        status, payload = await self._send("GET", path, timeout_s)
        try:
            return status, orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            return status, None

    async def put_data(self, path: str, value: Any, timeout_s: float) -> None:
        """``PUT /v1/data/<path>`` with ``value`` (OPA's data API: create or replace a
        document outside the bundle roots). Raises OpaUnavailable, OpaTimeout, or
        OpaResponseError for any answer but 204."""
        status, payload = await self._send(
            "PUT", f"/v1/data/{path}", timeout_s, orjson.dumps(value)
        )
        _expect(status, (204,), f"PUT {path}", payload)

    async def delete_data(self, path: str, timeout_s: float) -> None:
        """``DELETE /v1/data/<path>``; an absent document (404) is fine. Raises
        OpaUnavailable, OpaTimeout, or OpaResponseError for any other answer but 204."""
        status, payload = await self._send("DELETE", f"/v1/data/{path}", timeout_s)
        _expect(status, (204, 404), f"DELETE {path}", payload)

    async def close(self) -> None:
        """Close the pool."""
        await self._pool.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._pool.closed


def _read_answer(answer: Answer) -> bytes:
    """The body of ``answer``, inflated when gzip'd (at most MAX_ANSWER_BYTES; the pool
    already capped it as sent). Raises OpaResponseError for a gzip body that does not
    inflate (corrupt, truncated, trailing bytes, over the cap) or a Content-Encoding
    other than gzip or identity."""
    encoding = answer.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", ""):
        raise OpaResponseError(f"OPA answered with an unsupported Content-Encoding {encoding!r}")
    return _gunzip(answer.body) if encoding == "gzip" else answer.body


def _gunzip(raw: bytes) -> bytes:
    """Inflate one gzip member (RFC 1952), stopping past MAX_ANSWER_BYTES of output so a
    small body that inflates to gigabytes costs no more than the cap."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer
    try:
        data = inflater.decompress(raw, MAX_ANSWER_BYTES + 1)
    except zlib.error as exc:
        raise OpaResponseError(f"OPA's gzip answer does not inflate: {exc}") from None
    if len(data) > MAX_ANSWER_BYTES or inflater.unconsumed_tail:
        raise OpaResponseError(f"OPA's answer is larger than {MAX_ANSWER_BYTES} bytes inflated")
    if not inflater.eof or inflater.unused_data:
        raise OpaResponseError("OPA's gzip answer is truncated or has trailing bytes")
    return data


def _expect(status: int, ok: tuple[int, ...], what: str, payload: bytes) -> None:
    if status not in ok:
        detail = payload[:200].decode(errors="replace")
        raise OpaResponseError(f"OPA answered HTTP {status} to {what}: {detail}")


def _parse_answer(status: int, payload: bytes, duration_s: float) -> Evaluation:
    """OPA's HTTP answer -> Evaluation; raises OpaResponseError / UndefinedDecision."""
    try:
        answer = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise OpaResponseError(f"OPA answered HTTP {status} with a body that is not JSON") from None
    if status != 200:
        code = answer.get("code") if isinstance(answer, dict) else None
        message = answer.get("message") if isinstance(answer, dict) else None
        raise OpaResponseError(f"OPA answered HTTP {status}: {code}: {message}")
    if not isinstance(answer, dict):
        raise OpaResponseError("OPA answered with a JSON value that is not an object")
    if "result" not in answer:
        raise UndefinedDecision("no decision is defined at this path (result is undefined)")
    return Evaluation(answer["result"], _revisions(answer.get("provenance")), duration_s)


def _provenance_of(payload: bytes) -> Mapping[str, str]:
    """The revisions in an answer already known to be a JSON object."""
    answer = orjson.loads(payload)
    return _revisions(answer.get("provenance") if isinstance(answer, dict) else None)


def _batch_results(answer: Evaluation, count: int) -> BatchEvaluation:
    """The batch rule's result ``{"decisions": {"<index>": decision}}`` -> one
    Evaluation per input (None: undefined for it). Raises OpaResponseError for another
    shape or an index outside ``range(count)``."""
    result = answer.result
    decisions = result.get("decisions") if isinstance(result, dict) else None
    if not isinstance(decisions, dict):
        raise OpaResponseError("the batch rule answered without a decisions object")
    results: list[Evaluation | None] = [None] * count
    for index, value in decisions.items():
        try:
            position = int(index)
        except ValueError:
            position = -1
        if not 0 <= position < count:
            raise OpaResponseError(f"the batch rule answered for input {index!r} of {count}")
        results[position] = Evaluation(value, answer.revisions, answer.duration_s)
    return BatchEvaluation(tuple(results), answer.revisions, answer.duration_s)


def _revisions(provenance: Any) -> Mapping[str, str]:
    if not isinstance(provenance, dict):
        return _EMPTY
    bundles = provenance.get("bundles")
    if not isinstance(bundles, dict):
        return _EMPTY
    return MappingProxyType(
        {
            str(name): str(info.get("revision", ""))
            for name, info in bundles.items()
            if isinstance(info, dict)
        }
    )
