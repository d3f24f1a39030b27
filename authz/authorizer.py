"""The decision pipeline: CheckRequest -> input -> OPA -> Decision -> CheckResponse.

:meth:`Authorizer.check` reads like the flow it implements, one comment per phase; every
step lives in its own module (``input``, ``policy``, ``decision``, ``response``). Each
call returns an :class:`Outcome`: the CheckResponse for Envoy and a
:class:`~authz.record.DecisionRecord` for the decision log. It fails closed: any
:class:`~authz.errors.AuthzError` becomes a deny through
:func:`~authz.response.error_response`; nothing is raised to the caller except
programming errors, which the servicer also turns into a deny.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from envoy.service.auth.v3 import external_auth_pb2

from authz.config import parse_decision_path
from authz.decision import CredentialRef, Decision, RateLimitRef, parse_decision
from authz.errors import (
    AuthzError,
    ConfigError,
    CredentialError,
    DeadlineExceeded,
    DecisionPathError,
)
from authz.input import build_input
from authz.policy import Evaluation, PolicyEngine
from authz.ratelimit import Limiter, Quota
from authz.record import DecisionRecord, DecisionSink
from authz.response import build_response, error_response
from authz.secrets import Secret

__all__ = ["DECISION_PATH_KEY", "Authorizer", "CredentialSource", "Outcome"]

# The context_extensions key an Envoy route sets to pick its decision path.
DECISION_PATH_KEY: Final = "decision_path"
# Time kept back from Envoy's deadline so our deny reaches Envoy before it gives up.
_DEADLINE_MARGIN_S: Final = 0.010

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


class Authorizer:
    """Runs the decision pipeline for one CheckRequest at a time (safe to share across
    concurrent calls; holds no per-request state).

    ``engine`` answers OPA queries; ``limiter`` enforces the decision's ``rate_limit``
    (None: no rate limiting) with ``burst_s`` seconds worth of burst unless the decision
    says; ``credentials`` resolves the credential a decision names for injection (None:
    no secrets file, so such decisions deny 503); ``sinks``
    receive every :class:`DecisionRecord` (a sink that raises is logged and skipped,
    never fails the request); ``timeout_s`` is the
    decision budget in seconds; ``clock`` (seconds, monotonic) and ``new_id`` (a
    decision id) are injectable for tests.
    """

    def __init__(
        self,
        engine: PolicyEngine,
        *,
        default_decision_path: str,
        credential_headers: Iterable[str],
        timeout_s: float,
        parse_body: bool = True,
        limiter: Limiter | None = None,
        burst_s: float = 10.0,
        credentials: CredentialSource | None = None,
        sinks: Iterable[DecisionSink] = (),
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self._engine = engine
        self._default_path = default_decision_path
        self._credential_headers = frozenset(credential_headers)
        self._timeout_s = timeout_s
        self._parse_body = parse_body
        self._credentials = credentials
        self._limiter = limiter
        self._burst_s = burst_s
        self._sinks = tuple(sinks)
        self._clock = clock
        self._wall_clock = wall_clock
        self._new_id = new_id
        self._valid_paths: set[str] = {default_decision_path}

    async def check(
        self, request: external_auth_pb2.CheckRequest, time_remaining_s: float | None = None
    ) -> Outcome:
        """Decide ``request``. ``time_remaining_s`` is the caller's deadline (gRPC
        ``context.time_remaining()``), or None for none; the budget is the smaller of it
        (minus a small margin) and the configured timeout."""
        started = self._clock()
        decision_id = self._new_id()
        budget = self._timeout_s
        if time_remaining_s is not None:
            budget = min(budget, time_remaining_s - _DEADLINE_MARGIN_S)
        path = self._default_path
        evaluation: Evaluation | None = None
        document: dict[str, Any] | None = None
        try:
            if budget <= 0:
                raise DeadlineExceeded("no time left for a decision when the request arrived")
            # 1. Route -> decision path (Envoy's per-route context_extensions).
            path = self._decision_path(request.attributes.context_extensions)
            # 2. CheckRequest -> input document (credentials hashed, never in clear).
            document = build_input(
                request, self._credential_headers, parse_request_body=self._parse_body
            )
            # 3. Ask OPA, within the budget.
            evaluation = await self._engine.evaluate(path, document, budget)
            # 4. Parse OPA's result once into a typed Decision.
            decision = parse_decision(evaluation.result)
            # 5. Re-check the deadline: Envoy has given up on a late answer anyway.
            if self._clock() - started > budget:
                raise DeadlineExceeded("the decision arrived after the deadline")
            # 6. Rate limit: count this request in the bucket the decision names.
            limiter = self._limiter
            if decision.allowed and decision.rate_limit is not None and limiter is not None:
                decision = await self._rate_limit(decision, decision.rate_limit, limiter)
            # 7. Resolve the credential the decision names, by reference: the secret
            #    comes from the secrets file and never went to OPA.
            if decision.allowed and decision.credential is not None:
                decision = self._inject_credential(decision, decision.credential)
            # 8. Decision -> CheckResponse.
            response = build_response(decision, decision_id)
        except AuthzError as error:
            return self._finish(
                error_response(error, decision_id),
                self._record(decision_id, path, started, document, evaluation, None, error),
            )
        return self._finish(
            response, self._record(decision_id, path, started, document, evaluation, decision)
        )

    async def _rate_limit(
        self, decision: Decision, ref: RateLimitRef, limiter: Limiter
    ) -> Decision:
        """``decision`` with rate-limit headers for the client, or a 429 deny."""
        quota = Quota.of(ref.requests_per_minute, ref.burst, self._burst_s)
        result = await limiter.check(ref.key, quota)
        headers = result.headers()
        if result.allowed:
            return dataclasses.replace(
                decision, response_headers_to_add=(*decision.response_headers_to_add, *headers)
            )
        return Decision(
            allowed=False,
            form="object",
            headers=headers,
            http_status=429,
            reason="rate_limited",
            rate_limit=ref,
            identity=decision.identity,
            dynamic_metadata=decision.dynamic_metadata,
        )

    def _inject_credential(self, decision: Decision, ref: CredentialRef) -> Decision:
        """``decision`` with the credential header set (replacing any the policy set)."""
        if self._credentials is None:
            raise CredentialError(f"credential {ref.ref!r} requested but no secrets file is set")
        value = ref.format.replace("{secret}", self._credentials.get(ref.ref).reveal())
        headers = tuple(h for h in decision.headers if h[0] != ref.header)
        return dataclasses.replace(decision, headers=(*headers, (ref.header, value)))

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

    def _record(
        self,
        decision_id: str,
        path: str,
        started: float,
        document: Mapping[str, Any] | None,
        evaluation: Evaluation | None,
        decision: Decision | None,
        error: AuthzError | None = None,
    ) -> DecisionRecord:
        return DecisionRecord.build(
            decision_id=decision_id,
            timestamp=self._wall_clock(),
            decision_path=path,
            document=document,
            evaluation=evaluation,
            decision=decision,
            error=error,
            duration_s=self._clock() - started,
        )

    def _finish(self, response: external_auth_pb2.CheckResponse, record: DecisionRecord) -> Outcome:
        for sink in self._sinks:
            try:
                sink.record(record)
            except Exception:  # a broken log sink must never fail a request
                log.exception("decision sink %s failed", type(sink).__name__)
        return Outcome(response, record)
