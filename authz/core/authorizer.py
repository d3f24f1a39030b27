"""The decision pipeline: CheckRequest -> input -> OPA -> Decision -> CheckResponse.

:meth:`Authorizer.check` reads like the flow it implements, one comment per phase; every
step lives in its own module (``input``, ``policy``, ``decision``, ``ratelimit``,
``secrets``, ``response``). Each call returns an :class:`Outcome`: the CheckResponse for
Envoy and a :class:`~authz.core.record.DecisionRecord` for the decision log, metrics and
audit trail.

It fails closed: any :class:`~authz.core.errors.AuthzError` becomes a deny through
:func:`~authz.core.response.error_response`, unless the decision path is configured to fail
open and OPA could not be reached (the error's ``fail_open_eligible``: OPA unavailable or
its circuit open; never a timeout or authz's own deadline), then an allow marked
``x-authz-fail-open``: at most ``fail_open_max_per_s`` per decision path per second
(beyond it the request fails closed with the original error), each one counted
(``authz_fail_open_total``), audited (``fail_open``) and logged (a WARNING line at most
once per path per second, counting the allows it did not log). The
enforcement mode (:mod:`authz.core.mode`) applies last: ``dry-run`` turns a deny into an
allow marked ``x-authz-dry-run``, ``bypass`` skips evaluation altogether.

Tracing (OpenTelemetry API only; the SDK is set up in :mod:`authz.runtime.tracing`): with
a ``tracer``, each Check is a server span ``authz.check`` whose parent is the W3C
``traceparent``/``tracestate`` (https://www.w3.org/TR/trace-context/) of the gRPC call's
metadata (Envoy's own span for the ext_authz call, when Envoy traces), else of the
CheckRequest's HTTP headers (the caller's trace, passed through by Envoy), with
child spans ``authz.cache.lookup``, ``authz.opa.query`` (the OPA client propagates the
context to OPA) and ``authz.ratelimit``. Span attributes are the decision's id, path,
result, reason, HTTP status, mode and whether it came from the cache: never a header
value or a credential; a failed step's status carries its error code, never its message.
Without a tracer (the default) no span is created and no header is read.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from envoy.service.auth.v3 import external_auth_pb2
from opentelemetry import propagate
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, StatusCode, Tracer

from authz.core.cache import CachedDecision, DecisionCache
from authz.core.decision import CredentialRef, Decision, RateLimitRef, TunnelRef, parse_decision
from authz.core.errors import (
    FAIL_OPEN_CODES,
    AddressNotAllowed,
    AuthzError,
    BatchRevisionError,
    ConfigError,
    CredentialError,
    DeadlineExceeded,
    DecisionPathError,
    OpaResponseError,
    PolicyError,
    UndefinedDecision,
)
from authz.core.headers import OWN_PREFIX, TUNNEL_ADDRESS_HEADER, UNENFORCED_REMOVALS
from authz.core.input import BodyParsing, GrpcDescriptors, build_input
from authz.core.mode import Control, Mode
from authz.core.opa import BatchPolicyEngine, Evaluation, PolicyEngine, parse_decision_path
from authz.core.ratelimit import Limiter, Quota
from authz.core.record import DecisionRecord, DecisionSink, record_from_fields
from authz.core.response import ResponsePrototype, build_response, error_response
from authz.core.secret import Secret
from authz.core.tunnel import TunnelResolver

__all__ = [
    "DECISION_PATH_KEY",
    "DRY_RUN_HEADER",
    "FAIL_OPEN_CODES",
    "FAIL_OPEN_HEADER",
    "MODE_HEADER",
    "Authorizer",
    "BatchOutcome",
    "CredentialSource",
    "Outcome",
]

# The context_extensions key an Envoy route sets to pick its decision path.
DECISION_PATH_KEY: Final = "decision_path"
# Time kept back from Envoy's deadline so our deny reaches Envoy before it gives up.
_DEADLINE_MARGIN_S: Final = 0.010
# Most fail-open allows per decision path per second (AUTHZ_FAIL_OPEN_MAX_PER_S); over it,
# requests fail closed while OPA is unreachable.
DEFAULT_FAIL_OPEN_MAX_PER_S: Final = 50
# Response header (to the client) on a deny that dry-run suppressed.
DRY_RUN_HEADER: Final = "x-authz-dry-run"
# Request header (to the upstream) on a request allowed because OPA failed (fail-open).
FAIL_OPEN_HEADER: Final = "x-authz-fail-open"
# Request header (to the upstream) on a request allowed in bypass mode.
MODE_HEADER: Final = "x-authz-mode"

# Span names (OpenTelemetry): the Check, and its steps.
CHECK_SPAN: Final = "authz.check"
CACHE_SPAN: Final = "authz.cache.lookup"
OPA_SPAN: Final = "authz.opa.query"
BATCH_CHECK_SPAN: Final = "authz.batch_check"
RATE_LIMIT_SPAN: Final = "authz.ratelimit"
# The W3C trace context (and baggage) headers: the only ones read for tracing.
_TRACE_HEADERS: Final = frozenset({"traceparent", "tracestate", "baggage"})
# The step "span" when tracing is off: reused, so an untraced Check allocates nothing.
_NO_SPAN: Final = contextlib.nullcontext(INVALID_SPAN)

log = logging.getLogger(__name__)


class CredentialSource(Protocol):
    """Resolves a credential reference to its secret (the egress secrets file)."""

    def get(self, ref: str) -> Secret:
        """The secret for ``ref``; raises CredentialError when it cannot be resolved."""
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one Check produced: the CheckResponse and its decision record."""

    response: external_auth_pb2.CheckResponse
    record: DecisionRecord


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one :meth:`Authorizer.check_batch` produced: an :class:`Outcome` per request,
    in order, and the bundle revision every policy decision came from (``""`` when none
    was evaluated)."""

    outcomes: tuple[Outcome, ...]
    revision: str


@dataclass(slots=True)
class _Prepared:
    """A batch member's decision id, start, mode, input and OPA's answer for it (or the
    error a Check would have met up to and at OPA)."""

    decision_id: str
    started: float
    mode: Mode
    document: dict[str, Any] | None
    answer: Evaluation | AuthzError


@dataclass(slots=True)
class _Trace:
    """What the pipeline got to, for the record."""

    path: str
    document: dict[str, Any] | None = None
    evaluation: Evaluation | None = None
    policy: Decision | None = None
    decision: Decision | None = None
    error: AuthzError | None = None
    cached_from: str | None = None
    peer: str = ""


# Each mode's text (what ``mode.value`` gives, a plain str), without the enum property.
_MODE_TEXT: Final[dict[Mode, str]] = {mode: mode.value for mode in Mode}


def _new_decision_id() -> str:
    """A random (version 4) UUID in its canonical text form (RFC 9562 section 5.4), as
    ``str(uuid.uuid4())`` gives, at half its cost (it runs for every decision)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # variant 10xx (RFC 9562)
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Authorizer:
    """Runs the decision pipeline for one CheckRequest at a time (safe to share across
    concurrent calls; holds no per-request state).

    ``engine`` answers OPA queries; ``limiter`` enforces the decision's ``rate_limit``
    (None: no rate limiting) with ``burst_s`` seconds worth of burst unless the decision
    says; ``credentials`` resolves the credential a decision names for injection (None:
    no secrets file, so such decisions deny 503); ``tunnels`` resolves and checks the
    destination of an egress tunnel a decision allows (None: such decisions deny 403
    ``address_not_allowed``); ``control`` holds the enforcement mode;
    ``fail_open_paths`` are the decision paths allowed when OPA cannot be reached, at most
    ``fail_open_max_per_s`` requests per path per second; ``cache`` (None:
    none) reuses recent policy decisions for identical requests; ``sinks`` receive
    every :class:`DecisionRecord` (a sink that raises is logged and skipped, never fails
    the request); ``timeout_s`` is the decision budget in seconds; ``tracer`` (None:
    no tracing) records the spans the module docstring lists; ``clock`` (seconds,
    monotonic) and ``new_id`` (a decision id) are injectable for tests.
    """

    def __init__(
        self,
        engine: PolicyEngine,
        *,
        default_decision_path: str,
        credential_headers: Iterable[str],
        timeout_s: float,
        parse_body: BodyParsing | bool = BodyParsing.ROUTE,
        pass_jwts: bool = True,
        grpc_descriptors: GrpcDescriptors | None = None,
        limiter: Limiter | None = None,
        burst_s: float = 10.0,
        credentials: CredentialSource | None = None,
        tunnels: TunnelResolver | None = None,
        control: Control | None = None,
        fail_open_paths: Iterable[str] = (),
        fail_open_max_per_s: int = DEFAULT_FAIL_OPEN_MAX_PER_S,
        cache: DecisionCache | None = None,
        sinks: Iterable[DecisionSink] = (),
        tracer: Tracer | None = None,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = _new_decision_id,
    ) -> None:
        self._engine = engine
        self._default_path = default_decision_path
        self._credential_headers = frozenset(credential_headers)
        self._unenforced_base = UNENFORCED_REMOVALS | self._credential_headers
        self._timeout_s = timeout_s
        self._parse_body = parse_body
        self._pass_jwts = pass_jwts
        self._grpc_descriptors = grpc_descriptors
        self._limiter = limiter
        self._burst_s = burst_s
        self._credentials = credentials
        self._tunnels = tunnels
        self._control = control if control is not None else Control()
        self._fail_open_paths = frozenset(fail_open_paths)
        self._fail_open_gate = _FailOpenGate(fail_open_max_per_s)
        self._cache = cache
        self._sinks = tuple(sinks)
        self._tracer = tracer
        self._clock = clock
        self._wall_clock = wall_clock
        self._new_id = new_id
        self._valid_paths: set[str] = {default_decision_path}

    def retune(
        self,
        *,
        timeout_s: float,
        burst_s: float,
        fail_open_paths: Iterable[str],
        fail_open_max_per_s: int,
    ) -> None:
        """Swap the settings a reload may change (same units as ``__init__``). Plain
        attribute stores with no await between them: a Check on the same event loop sees
        either all the old values or all the new ones."""
        self._timeout_s = timeout_s
        self._burst_s = burst_s
        self._fail_open_paths = frozenset(fail_open_paths)
        self._fail_open_gate.max_per_s = fail_open_max_per_s

    async def check(
        self,
        request: external_auth_pb2.CheckRequest,
        time_remaining_s: float | None = None,
        *,
        peer: str = "",
        metadata: Callable[[], Iterable[tuple[str, str | bytes]] | None] | None = None,
    ) -> Outcome:
        """Decide ``request``. ``peer`` is the gRPC caller's address (``context.peer()``,
        the decision log's ``requested_by``); ``metadata`` gives the gRPC call's metadata
        (``context.invocation_metadata``; called only when tracing, for the trace
        context). ``time_remaining_s`` is the caller's deadline
        (gRPC ``context.time_remaining()``), or None for none; the budget is the smaller of it
        (minus a small margin) and the configured timeout."""
        tracer = self._tracer
        if tracer is None:
            return await self._check(request, time_remaining_s, peer)
        with tracer.start_as_current_span(
            CHECK_SPAN,
            context=propagate.extract(_trace_carrier(request, metadata)),
            kind=SpanKind.SERVER,
            record_exception=False,  # an exception's message may quote the request
            set_status_on_exception=False,
        ) as span:
            outcome = await self._check(request, time_remaining_s, peer)
            _annotate(span, outcome.record)
            return outcome

    async def check_batch(
        self,
        requests: Sequence[external_auth_pb2.CheckRequest],
        time_remaining_s: float | None = None,
        *,
        peer: str = "",
    ) -> BatchOutcome:
        """Decide ``requests`` together (the batch decision API, ``authz.v1.Decisions/
        BatchCheck``): each exactly as :meth:`check` decides it (its own decision id,
        record, audit row, rate-limit count, enforcement mode, fail-open and dry-run),
        except that every policy decision comes from one OPA query on one store snapshot
        (:meth:`~authz.core.opa.BatchPolicyEngine.query_batch`), never from the decision
        cache. Where one query cannot answer (the bundle has no batch rule, an input's
        evaluation fails the query) each input is asked alone, and if those answers come
        from different bundle revisions (a bundle activated meanwhile) they are asked
        once more. ``time_remaining_s`` and ``peer`` as for :meth:`check`.

        Returns the outcomes in request order and the one revision they were decided on.
        Raises :class:`~authz.core.errors.BatchRevisionError` when no single revision
        could answer them all."""
        tracer = self._tracer
        if tracer is None:
            return await self._check_batch(requests, time_remaining_s, peer)
        with tracer.start_as_current_span(
            BATCH_CHECK_SPAN, kind=SpanKind.SERVER, record_exception=False
        ) as span:
            span.set_attribute("authz.batch.actions", len(requests))
            batch = await self._check_batch(requests, time_remaining_s, peer)
            span.set_attribute("authz.bundle_revision", batch.revision)
            allowed = sum(1 for o in batch.outcomes if o.record.allowed)
            span.set_attribute("authz.batch.allowed", allowed)
            return batch

    async def _check_batch(
        self,
        requests: Sequence[external_auth_pb2.CheckRequest],
        time_remaining_s: float | None,
        peer: str,
    ) -> BatchOutcome:
        started = self._clock()
        mode = self._control.mode
        budget = self._timeout_s
        if time_remaining_s is not None:
            budget = min(budget, time_remaining_s - _DEADLINE_MARGIN_S)
        prepared = [
            _Prepared(self._new_id(), started, mode, None, DeadlineExceeded("not evaluated"))
            for _ in requests
        ]
        if mode is not Mode.BYPASS:
            await self._evaluate_batch(requests, prepared, budget, started)
        outcomes = [
            await self._check(request, time_remaining_s, peer, item)
            for request, item in zip(requests, prepared, strict=True)
        ]
        revisions = {o.record.revision for o in outcomes if o.record.revision}
        if len(revisions) > 1:  # _evaluate_batch retried already; never mix revisions
            raise BatchRevisionError(f"decided on {len(revisions)} bundle revisions")
        return BatchOutcome(tuple(outcomes), next(iter(revisions), ""))

    async def _evaluate_batch(
        self,
        requests: Sequence[external_auth_pb2.CheckRequest],
        prepared: list[_Prepared],
        budget: float,
        started: float,
    ) -> None:
        """Fill each ``prepared`` item's input and OPA's answer (or the error a Check
        would meet before or at OPA), grouped by decision path, one batch query each."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            item = prepared[index]
            try:
                path = self._decision_path(request.attributes.context_extensions)
                item.document = self._input(request)
            except AuthzError as exc:
                item.answer = exc
                continue
            except Exception as exc:  # a bug, or input no code path expected: as Check
                log.exception("unexpected error deciding", extra={"decision_id": item.decision_id})
                item.answer = AuthzError(f"unexpected {type(exc).__name__}")
                continue
            groups.setdefault(path, []).append(index)
        for path, indices in groups.items():
            documents = [prepared[i].document for i in indices]
            answers = await self._answers(path, documents, budget, started)
            for i, answer in zip(indices, answers, strict=True):
                prepared[i].answer = answer

    async def _answers(
        self,
        path: str,
        documents: Sequence[Mapping[str, Any] | None],
        budget: float,
        started: float,
    ) -> list[Evaluation | AuthzError]:
        """OPA's answer for each of ``documents`` on ``path``: one batch query, or (no
        batch rule, or the query failed on an input) one query each, asked twice at most
        if the answers span bundle revisions."""
        engine, tracer = self._engine, self._tracer
        remaining = budget - (self._clock() - started)
        if remaining <= 0:
            return [DeadlineExceeded("the budget was spent before OPA could be asked")] * len(
                documents
            )
        if isinstance(engine, BatchPolicyEngine):
            try:
                with _NO_SPAN if tracer is None else _step(tracer, OPA_SPAN, SpanKind.CLIENT):
                    batch = await engine.query_batch(path, documents, remaining)
            except OpaResponseError:
                pass  # an input's evaluation failed the query: ask each alone
            except PolicyError as exc:  # OPA itself failed: every action meets it
                return [exc] * len(documents)
            else:
                if batch.results is not None:
                    undefined = UndefinedDecision(
                        "no decision is defined at this path (result is undefined)"
                    )
                    return [undefined if e is None else e for e in batch.results]
        answers: list[Evaluation | AuthzError] = []
        for _ in range(2):
            answers = []
            for document in documents:
                remaining = budget - (self._clock() - started)
                try:
                    if remaining <= 0 or document is None:
                        raise DeadlineExceeded("the budget was spent before OPA could be asked")
                    answers.append(await engine.evaluate(path, document, remaining))
                except AuthzError as exc:
                    answers.append(exc)
            seen = {a.revision for a in answers if isinstance(a, Evaluation)}
            if len(seen) <= 1:
                break
        return answers

    async def _check(
        self,
        request: external_auth_pb2.CheckRequest,
        time_remaining_s: float | None,
        peer: str,
        prepared: _Prepared | None = None,
    ) -> Outcome:
        """:meth:`check` without its span; with ``prepared`` (:meth:`check_batch`), its
        input and OPA's answer are already known."""
        started = self._clock() if prepared is None else prepared.started
        decision_id = self._new_id() if prepared is None else prepared.decision_id
        mode = self._control.mode if prepared is None else prepared.mode
        # 1. Route -> decision path (Envoy's per-route context_extensions), before
        #    anything else: every outcome, bypass and a spent budget included, is
        #    recorded, counted and failed open or closed on the route's own path.
        trace = _Trace(self._default_path, peer=peer)
        path_error: DecisionPathError | None = None
        try:
            trace.path = self._decision_path(request.attributes.context_extensions)
        except DecisionPathError as exc:
            path_error = exc  # recorded on the default path (a metric label stays valid)
        if mode is Mode.BYPASS:
            response = _allow(
                decision_id,
                headers=((MODE_HEADER, "bypass"),),
                remove=self._unenforced_removals(request),
            )
            return self._finish(request, response, trace, mode, started, decision_id, allowed=True)
        budget = self._timeout_s
        if time_remaining_s is not None:
            budget = min(budget, time_remaining_s - _DEADLINE_MARGIN_S)
        try:
            try:
                if path_error is not None:
                    raise path_error
                response = await self._decide(
                    request, trace, budget, started, decision_id, prepared
                )
            except AuthzError:
                raise
            except Exception as exc:  # a bug, or input no code path expected: deny, log
                log.exception("unexpected error deciding", extra={"decision_id": decision_id})
                raise AuthzError(f"unexpected {type(exc).__name__}") from exc
            allowed = response.HasField("ok_response")
        except AuthzError as error:
            # Kept for the record, without its traceback and chain: they reach this frame
            # and the CheckRequest again, a cycle that pins every refused request until a
            # full collection (rare: the server raises the GC thresholds).
            error.__traceback__ = error.__context__ = error.__cause__ = None
            trace.error = error
            # Only OPA unreachable or its circuit open (errors.FAIL_OPEN_CODES): a
            # timeout or a spent budget may be authz's own doing, or a caller's.
            if (
                error.fail_open_eligible
                and trace.path in self._fail_open_paths
                and self._fail_open_gate.admit(trace.path, error.code, self._clock())
            ):
                response = _allow(
                    decision_id,
                    headers=((FAIL_OPEN_HEADER, error.code),),
                    remove=self._unenforced_removals(request),
                )
                return self._finish(
                    request,
                    response,
                    trace,
                    mode,
                    started,
                    decision_id,
                    allowed=True,
                    fail_open=True,
                )
            if error.fail_open_eligible and trace.path in self._fail_open_paths:
                trace.error = type(error)(
                    f"{error} (fail-open cap of {self._fail_open_gate.max_per_s} "
                    "per second reached on this path)"
                )
            response, allowed = error_response(error, decision_id), False
        if mode is Mode.DRY_RUN and not allowed:
            reason, status = _reason_and_status(trace)
            marker = f"would-deny; reason={reason}; status={status}"
            response = _allow(
                decision_id,
                response_headers=((DRY_RUN_HEADER, marker),),
                remove=self._unenforced_removals(request),
            )
            allowed = True
        return self._finish(request, response, trace, mode, started, decision_id, allowed=allowed)

    async def _decide(
        self,
        request: external_auth_pb2.CheckRequest,
        trace: _Trace,
        budget: float,
        started: float,
        decision_id: str,
        prepared: _Prepared | None = None,
    ) -> external_auth_pb2.CheckResponse:
        """The pipeline proper; raises AuthzError when no decision can be made."""
        if prepared is not None:
            # 2-4 were done for the whole batch (check_batch): its input, OPA's answer.
            trace.document = prepared.document
            if isinstance(prepared.answer, AuthzError):
                raise prepared.answer
            trace.evaluation = prepared.answer
            decision = trace.policy = trace.decision = parse_decision(prepared.answer.result)
            return await self._enforce(decision, trace, budget, started, decision_id)
        if budget <= 0:
            raise DeadlineExceeded("no time left for a decision when the request arrived")
        # 2. CheckRequest -> input document (credentials hashed, never in clear).
        trace.document = self._input(request)
        cache, tracer = self._cache, self._tracer
        key: bytes | None = None
        cached: CachedDecision | None = None
        if cache is not None:
            with _NO_SPAN if tracer is None else _step(tracer, CACHE_SPAN) as span:
                key = cache.key(trace.path, trace.document)
                cached = cache.get(key) if key is not None else None
                span.set_attribute("authz.cached", cached is not None)
        if cached is not None:
            # 3-4. The same input was just decided by the same bundle: reuse it.
            trace.evaluation = cached.evaluation
            trace.cached_from = cached.decision_id
            decision = trace.policy = trace.decision = cached.decision
        else:
            # A clear (new bundle, overrides) during the evaluation voids its decision.
            generation = cache.generation if cache is not None else 0
            # 3. Ask OPA, within what is left of the budget.
            remaining = budget - (self._clock() - started)
            if remaining <= 0:
                raise DeadlineExceeded("the budget was spent before OPA could be asked")
            with _NO_SPAN if tracer is None else _step(tracer, OPA_SPAN, SpanKind.CLIENT):
                evaluation = await self._engine.evaluate(trace.path, trace.document, remaining)
            trace.evaluation = evaluation
            # 4. Parse OPA's result once into a typed Decision.
            decision = trace.policy = trace.decision = parse_decision(trace.evaluation.result)
            if cache is not None and key is not None:
                cache.put(key, decision, trace.evaluation, decision_id, generation=generation)
        # A hit's response is its entry's prototype plus what varies per request.
        prototype = (
            cache.prototype(key, cached)
            if cache is not None and key is not None and cached is not None
            else None
        )
        return await self._enforce(decision, trace, budget, started, decision_id, prototype)

    def _input(self, request: external_auth_pb2.CheckRequest) -> dict[str, Any]:
        """The input document for ``request`` (:func:`authz.core.input.build_input`)."""
        return build_input(
            request,
            self._credential_headers,
            parse_request_body=self._parse_body,
            pass_jwts=self._pass_jwts,
            grpc_descriptors=self._grpc_descriptors,
        )

    async def _enforce(
        self,
        decision: Decision,
        trace: _Trace,
        budget: float,
        started: float,
        decision_id: str,
        prototype: ResponsePrototype | None = None,
    ) -> external_auth_pb2.CheckResponse:
        """Steps 5-8 of the pipeline, after the policy decided."""
        # 5. Re-check the deadline: Envoy has given up on a late answer anyway.
        if self._clock() - started > budget:
            raise DeadlineExceeded("the decision arrived after the deadline")
        # 6. Rate limit: count this request in the bucket the decision names.
        limiter = self._limiter
        if decision.allowed and decision.rate_limit is not None and limiter is not None:
            decision = trace.decision = await self._rate_limit(
                decision, decision.rate_limit, limiter
            )
        # 7. Resolve the credential the decision names, by reference: the secret comes
        #    from the secrets file and never went to OPA.
        if decision.allowed and decision.credential is not None:
            decision = self._inject_credential(decision, decision.credential)
        # 7b. An egress tunnel: resolve its destination, refuse a non-public address,
        #     and pin the checked address for Envoy (authz.core.tunnel).
        if decision.allowed and decision.tunnel is not None:
            decision = await self._pin_tunnel(decision, decision.tunnel, budget, started)
        # 8. Decision -> CheckResponse.
        return build_response(decision, decision_id, prototype)

    async def _pin_tunnel(
        self, decision: Decision, tunnel: TunnelRef, budget: float, started: float
    ) -> Decision:
        """``decision`` with :data:`TUNNEL_ADDRESS_HEADER` set to the checked address
        (replacing any the policy set). Raises AddressNotAllowed (also when no resolver
        is configured: fail closed), DestinationUnresolved, DeadlineExceeded."""
        if self._tunnels is None:
            raise AddressNotAllowed(f"tunnel to {tunnel.host!r}: no tunnel resolver configured")
        remaining = budget - (self._clock() - started)
        if remaining <= 0:
            raise DeadlineExceeded("the budget was spent before the tunnel could be resolved")
        address = await self._tunnels.address(tunnel.host, tunnel.port, remaining)
        headers = tuple(h for h in decision.headers if h[0] != TUNNEL_ADDRESS_HEADER)
        return decision.with_headers((*headers, (TUNNEL_ADDRESS_HEADER, address)))

    def _unenforced_removals(self, request: external_auth_pb2.CheckRequest) -> frozenset[str]:
        """What an allow no policy decided (bypass, a suppressed deny, fail-open) keeps
        from the upstream: exactly what an enforced allow strips. That is
        :data:`authz.core.headers.UNENFORCED_REMOVALS` (credential, identity, forwarding and
        method-override headers), the configured credential headers (for authz, never for
        the upstream) and every client-sent header in authz's own ``x-authz-`` namespace
        (only a decision may set those; an upstream trusts them), whether Envoy sent the
        headers in ``headers`` or, with ``encode_raw_headers``, in ``header_map``."""
        http = request.attributes.request.http
        names = [*http.headers, *(h.key.lower() for h in http.header_map.headers)]
        own = {name for name in names if name.startswith(OWN_PREFIX)}
        return self._unenforced_base | own

    async def _rate_limit(
        self, decision: Decision, ref: RateLimitRef, limiter: Limiter
    ) -> Decision:
        """``decision`` with rate-limit headers for the client, or a 429 deny."""
        quota = Quota.of(ref.requests_per_minute, ref.burst, self._burst_s)
        tracer = self._tracer
        with _NO_SPAN if tracer is None else _step(tracer, RATE_LIMIT_SPAN) as span:
            result = await limiter.check(ref.key, quota)
            span.set_attribute("authz.ratelimit.allowed", result.allowed)
        headers = result.headers()
        if result.allowed:
            return decision.with_response_headers((*decision.response_headers_to_add, *headers))
        return Decision(
            allowed=False,
            form="object",
            headers=headers,
            http_status=429,
            reason="rate_limited",
            rate_limit=ref,
            identity=decision.identity,
            dynamic_metadata=decision.dynamic_metadata,
            override_id=decision.override_id,
        )

    def _inject_credential(self, decision: Decision, ref: CredentialRef) -> Decision:
        """``decision`` with the credential header set (replacing any the policy set)."""
        if self._credentials is None:
            raise CredentialError(f"credential {ref.ref!r} requested but no secrets file is set")
        value = ref.format.replace("{secret}", self._credentials.get(ref.ref).reveal())
        headers = tuple(h for h in decision.headers if h[0] != ref.header)
        return decision.with_headers((*headers, (ref.header, value)))

    def _decision_path(self, extensions: Mapping[str, str]) -> str:
        path = extensions.get(DECISION_PATH_KEY)
        if path is None:
            return self._default_path
        if path not in self._valid_paths:
            try:
                parse_decision_path(DECISION_PATH_KEY, path)
            except ConfigError as exc:
                raise DecisionPathError(str(exc)) from None
            if len(self._valid_paths) < 1024:  # routes are few; never grow unbounded
                self._valid_paths.add(path)
        return path

    def _finish(
        self,
        request: external_auth_pb2.CheckRequest,
        response: external_auth_pb2.CheckResponse,
        trace: _Trace,
        mode: Mode,
        started: float,
        decision_id: str,
        *,
        allowed: bool,
        fail_open: bool = False,
    ) -> Outcome:
        record = self._record(request, trace, mode, started, decision_id, allowed, fail_open)
        for sink in self._sinks:
            try:
                sink.record(record)
            except Exception:  # a broken log sink must never fail a request
                log.exception("decision sink %s failed", type(sink).__name__)
        return Outcome(response, record)

    def _record(
        self,
        request: external_auth_pb2.CheckRequest,
        trace: _Trace,
        mode: Mode,
        started: float,
        decision_id: str,
        allowed: bool,
        fail_open: bool,
    ) -> DecisionRecord:
        """The decision's :class:`DecisionRecord`, built field by field in its order
        (:func:`~authz.core.record.record_from_fields`; test_authorizer holds every
        record to the keyword construction it replaced)."""
        reason, status = _reason_and_status(trace)
        decision, policy, evaluation = trace.decision, trace.policy, trace.evaluation
        request_id, method, path = _request_fields(request)
        if mode is Mode.BYPASS:
            reason, status, decided = "bypass", 200, True
        else:
            decided = decision.allowed if decision is not None and trace.error is None else False
        rate_limit = decision.rate_limit if decision is not None else None
        return record_from_fields(
            (
                decision_id,  # decision_id
                self._wall_clock(),  # timestamp
                trace.path,  # decision_path
                allowed,  # allowed
                reason,  # reason
                status,  # http_status
                decided,  # decision_allowed
                _MODE_TEXT[mode],  # mode
                fail_open,  # fail_open
                policy.allowed if policy is not None else None,  # policy_allowed
                policy.reason_code if policy is not None else None,  # policy_reason
                rate_limit.tier if rate_limit is not None else None,  # tier
                decision.override_id if decision is not None else None,  # override_id
                decision.source if decision is not None else None,  # source
                trace.cached_from,  # cached_from
                evaluation.revision if evaluation is not None else "",  # revision
                decision.identity if decision is not None else {},  # identity
                request_id,  # request_id
                method,  # method
                path,  # path
                self._clock() - started,  # duration_s
                evaluation.duration_s if evaluation is not None else 0.0,  # opa_duration_s
                str(trace.error) if trace.error is not None else None,  # error
                trace.document,  # document
                evaluation.result if evaluation is not None else None,  # opa_result
                evaluation.revisions if evaluation is not None else {},  # revisions
                trace.peer,  # peer
                policy.ignored if policy is not None else (),  # ignored_fields
            )
        )


@dataclass(slots=True)
class _Second:
    """One decision path's fail-open allows within one clock second."""

    second: int
    allowed: int = 0
    logged: bool = False
    cap_logged: bool = False


class _FailOpenGate:
    """Caps fail-open allows at ``max_per_s`` per decision path per clock second, and
    logs them loudly but boundedly: per path and second, one WARNING for the first allow
    (with ``suppressed``: the allows since the path's previous line that were not
    logged) and one for the first refusal over the cap (with ``refused``, likewise).
    Holds one small entry per fail-open path (the configured list bounds it)."""

    def __init__(self, max_per_s: int) -> None:
        self.max_per_s = max_per_s
        self._seconds: dict[str, _Second] = {}
        self._unlogged: dict[str, int] = {}
        self._unlogged_refusals: dict[str, int] = {}

    def admit(self, path: str, code: str, now: float) -> bool:
        """Whether one more fail-open allow on ``path`` (``now``: seconds) fits the cap;
        ``code`` is the error's, for the log line."""
        second = math.floor(now)
        window = self._seconds.get(path)
        if window is None or window.second != second:
            window = self._seconds[path] = _Second(second)
        if window.allowed >= self.max_per_s:
            refused = self._unlogged_refusals.get(path, 0) + 1
            if window.cap_logged:
                self._unlogged_refusals[path] = refused
            else:
                window.cap_logged = True
                self._unlogged_refusals[path] = 0
                log.warning(
                    "fail-open cap reached: OPA unreachable, request denied",
                    extra={
                        "decision_path": path,
                        "code": code,
                        "max_per_s": self.max_per_s,
                        "refused": refused,
                    },
                )
            return False
        window.allowed += 1
        if window.logged:
            self._unlogged[path] = self._unlogged.get(path, 0) + 1
        else:
            window.logged = True
            log.warning(
                "fail-open allow: OPA unreachable, request allowed without a decision",
                extra={
                    "decision_path": path,
                    "code": code,
                    "suppressed": self._unlogged.pop(path, 0),
                },
            )
        return True


def _trace_carrier(
    request: external_auth_pb2.CheckRequest,
    metadata: Callable[[], Iterable[tuple[str, str | bytes]] | None] | None,
) -> Mapping[str, str]:
    """The W3C trace context headers for the propagator, nothing else: the gRPC call's
    metadata when it has a ``traceparent`` (Envoy's ext_authz call span), else the
    request's (``headers``, or ``header_map`` when Envoy sends raw headers)."""
    if metadata is not None:
        found = {
            key: value if isinstance(value, str) else value.decode("latin-1")
            for key, value in metadata() or ()
            if key in _TRACE_HEADERS
        }
        if "traceparent" in found:
            return found
    http = request.attributes.request.http
    if http.headers:
        return {name: http.headers[name] for name in _TRACE_HEADERS if name in http.headers}
    return {
        h.key.lower(): h.raw_value.decode("latin-1") if h.raw_value else h.value
        for h in http.header_map.headers
        if h.key.lower() in _TRACE_HEADERS
    }


@contextlib.contextmanager
def _step(tracer: Tracer, name: str, kind: SpanKind = SpanKind.INTERNAL) -> Iterator[Span]:
    """A child span of the current one; a failure sets its status to the error's code
    (never the message, which may quote the request) and propagates."""
    with tracer.start_as_current_span(
        name, kind=kind, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except AuthzError as exc:
            span.set_status(StatusCode.ERROR, exc.code)
            raise
        except BaseException as exc:
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise


def _annotate(span: Span, record: DecisionRecord) -> None:
    """The Check span's attributes, from its decision record: identifiers and outcome
    only, never a header value, an identity or a credential."""
    span.set_attribute("authz.decision_id", record.decision_id)
    span.set_attribute("authz.decision_path", record.decision_path)
    span.set_attribute("authz.allowed", record.allowed)
    span.set_attribute("authz.reason", record.reason)
    span.set_attribute("http.response.status_code", record.http_status)
    span.set_attribute("authz.cached", record.cached_from is not None)
    span.set_attribute("authz.mode", record.mode)
    span.set_attribute("authz.fail_open", record.fail_open)
    if record.revision:
        span.set_attribute("authz.bundle_revision", record.revision)
    if record.error is not None:
        span.set_status(StatusCode.ERROR, record.reason)


def _request_fields(request: external_auth_pb2.CheckRequest) -> tuple[str, str, str]:
    """``(request_id, method, path without query)`` of the request itself. The request id
    is Envoy's ``x-request-id`` (it ties the decision to the access log line)."""
    http = request.attributes.request.http
    request_id = http.headers.get("x-request-id") or http.id
    return request_id, http.method, http.path.split("?", 1)[0]


def _reason_and_status(trace: _Trace) -> tuple[str, int]:
    """The decision's reason code and HTTP status (an error's, if one stopped it)."""
    if trace.error is not None:
        return trace.error.code, trace.error.http_status
    decision = trace.decision
    if decision is None:
        return "internal_error", 500
    if decision.allowed:
        return decision.reason_code, 200
    return decision.reason_code, decision.http_status or 403


def _allow(
    decision_id: str,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    response_headers: tuple[tuple[str, str], ...] = (),
    remove: Iterable[str] = (),
) -> external_auth_pb2.CheckResponse:
    """An allow no policy decided (bypass, a suppressed deny, fail-open) with marker
    headers; ``remove`` names the request headers kept from the upstream (a marker header
    it sets is never removed)."""
    marked = {name for name, _ in headers}
    return build_response(
        Decision(
            allowed=True,
            headers=headers,
            response_headers_to_add=response_headers,
            request_headers_to_remove=tuple(sorted(set(remove) - marked)),
        ),
        decision_id,
    )
