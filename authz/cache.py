"""Decision cache: skip OPA for a request identical to one it has just decided.

A policy decision is a function of the input document and the bundle (and, for a few
policies, the clock). The cache key is the request's stable content: decision path,
route ``context_extensions``, method, path, host, scheme, protocol, every header but
the ones unique to each request (:data:`VOLATILE_HEADERS`: request ids and tracing),
body, source IP (not port) and principal. Two requests with equal keys get equal inputs
(but for those volatile parts), so they get the same decision from the same bundle.

Entries are bounded (LRU, ``max_entries``), expire after a TTL (``ttl_s``, or the
decision's own ``cache_ttl_s``; ``0`` makes a decision uncacheable, e.g. when a key
expires soon; each entry's life is shortened by a random share of up to ``jitter``, so
the entries of a cold start do not all expire in the same second and send their requests
to OPA at once), and are dropped whenever the bundle revision changes (seen in an OPA
answer's provenance, or by the bundle watcher's probe every second) or the overrides
change. An entry is reused only while the active revision is *confirmed*: OPA reported
it within the last ``confirm_s`` seconds. So a revoked key (a new bundle) is refused as
soon as authz sees the new revision, and if OPA stops answering, reuse stops within
``confirm_s`` (every request then asks OPA, and fails closed) instead of lasting a TTL.
What is cached is the policy's decision only: rate limiting, credential injection and the
enforcement mode still apply to every request. Entries keep the input for the audit
trail, without a body over 8 KB (the key holds a digest of the body), so an entry stays
small whatever the request.

Policies whose decision depends on anything outside the key (the request id, tracing
headers, the source port, the time beyond the TTL) must set ``cache_ttl_s: 0``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from envoy.service.auth.v3 import external_auth_pb2

from authz.decision import Decision
from authz.input import without_large_body
from authz.policy import Evaluation

__all__ = ["VOLATILE_HEADERS", "CachedDecision", "DecisionCache", "cache_key"]

# Headers unique to each request: never part of the key.
VOLATILE_HEADERS: Final = frozenset(
    {
        "x-request-id",
        "traceparent",
        "tracestate",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "b3",
        "x-amzn-trace-id",
        "x-cloud-trace-context",
        "x-datadog-trace-id",
        "x-datadog-parent-id",
        "x-datadog-sampling-priority",
        "x-envoy-expected-rq-timeout-ms",
        "x-client-trace-id",
    }
)

log = logging.getLogger(__name__)


def cache_key(
    path: str,
    request: external_auth_pb2.CheckRequest,
    volatile: frozenset[str] = VOLATILE_HEADERS,
) -> Hashable:
    """The cache key of ``request`` for decision ``path`` (a hashable tuple), ignoring the
    ``volatile`` headers."""
    attributes = request.attributes
    http = attributes.request.http
    source = attributes.source
    body = b""
    if http.body or http.raw_body:  # a digest, so a large body is not kept in the key
        body = hashlib.sha256(http.body.encode() + b"\0" + http.raw_body).digest()
    return (
        path,
        tuple(sorted(attributes.context_extensions.items())),
        http.method,
        http.path,
        http.host,
        http.scheme,
        http.protocol,
        tuple(sorted((k, v) for k, v in http.headers.items() if k not in volatile)),
        # Envoy's raw form (encode_raw_headers): the headers, credentials included, are
        # only here, never in ``headers``.
        tuple(
            sorted(
                (h.key.lower(), h.value, h.raw_value)
                for h in http.header_map.headers
                if h.key.lower() not in volatile
            )
        ),
        body,
        source.address.socket_address.address,
        source.principal,
    )


@dataclass(frozen=True, slots=True)
class CachedDecision:
    """A cached policy decision with the evaluation it came from (revision, and OPA time
    for the record) and the input document (for the audit trail) and the decision id
    that evaluated it."""

    decision: Decision
    evaluation: Evaluation
    document: Mapping[str, Any]
    decision_id: str
    expires_at: float


class DecisionCache:
    """Bounded TTL LRU of policy decisions. ``ignore_headers`` adds deployment-specific
    per-request headers (a correlation id, a load generator's sequence number) to
    :data:`VOLATILE_HEADERS`. ``ttl_s`` caps an entry's life and ``confirm_s`` is how
    recently the revision must have been confirmed (:meth:`observe_revision`) for any entry
    to be reused, both in seconds; ``jitter`` (0..1) is the largest share of its TTL an
    entry loses at random (``rng`` gives 0..1; ValueError outside 0..1). ``clock`` is
    monotonic seconds. ``hits``, ``misses`` and ``clears`` are counters for metrics."""

    def key(self, path: str, request: external_auth_pb2.CheckRequest) -> Hashable:
        """:func:`cache_key` with this cache's volatile headers."""
        return cache_key(path, request, self.volatile)

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        ttl_s: float = 60.0,
        confirm_s: float = 5.0,
        jitter: float = 0.2,
        ignore_headers: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be within 0..1, got {jitter}")
        self.volatile = VOLATILE_HEADERS | {h.lower() for h in ignore_headers}
        self._entries: OrderedDict[Hashable, CachedDecision] = OrderedDict()
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._confirm_s = confirm_s
        self._jitter = jitter
        self._clock = clock
        self._rng = rng
        self._revision: str | None = None
        self._confirmed_at = float("-inf")
        self.hits = 0
        self.misses = 0
        self.clears = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> CachedDecision | None:
        """The live entry for ``key`` (refreshing its LRU position), or None (also while
        the revision is unconfirmed)."""
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None and now - self._confirmed_at > self._confirm_s:
            self.misses += 1  # kept: the next confirmation of the same revision revives it
            return None
        if entry is None or entry.expires_at <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(
        self,
        key: Hashable,
        decision: Decision,
        evaluation: Evaluation,
        document: Mapping[str, Any],
        decision_id: str,
    ) -> None:
        """Cache ``decision`` unless it is uncacheable (``cache_ttl_s`` 0). An evaluation
        from another bundle revision than the cached ones drops them all first."""
        self.observe_revision(evaluation.revision)
        ttl = (
            self._ttl_s if decision.cache_ttl_s is None else min(decision.cache_ttl_s, self._ttl_s)
        )
        if ttl <= 0:
            return
        now = self._clock()
        ttl *= 1.0 - self._jitter * self._rng()
        self._entries[key] = CachedDecision(
            decision, evaluation, without_large_body(document), decision_id, now + ttl
        )
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        # Drop expired entries from the old end too, so memory follows the live set.
        for _ in range(2):
            oldest = next(iter(self._entries.values()), None)
            if oldest is None or oldest.expires_at > now:
                break
            self._entries.popitem(last=False)

    def observe_revision(self, revision: str) -> None:
        """Note the active bundle revision, as OPA just reported it (which confirms it for
        ``confirm_s`` seconds); a change drops every entry."""
        self._confirmed_at = self._clock()
        if revision != self._revision:
            if self._revision is not None:
                self.clear(f"bundle revision {revision}")
            self._revision = revision

    def clear(self, why: str) -> None:
        """Drop every entry (bundle activation, overrides changed, ...)."""
        if self._entries:
            log.info("decision cache cleared", extra={"why": why, "entries": len(self._entries)})
        self._entries.clear()
        self.clears += 1
