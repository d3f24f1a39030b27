"""Decision cache: skip OPA for a request whose input is identical to one it has just
decided.

A policy decision is a function of the input document and the bundle (and, for a few
policies, the clock). The cache key (:func:`cache_key`) is the SHA-256 digest of the
decision path and the canonical JSON of the whole input document the policy sees
(:func:`authz.core.input.build_input`: every field Envoy sent, destination port, TLS SNI, peer
certificate, ``metadata_context`` and route metadata included; credentials only as their
digests), with the parts unique to each request removed (:data:`VOLATILE_HEADERS`:
request ids and tracing, in ``headers`` and in ``headerMap``; ``attributes.request.time``;
``attributes.request.http.id``; the source port). Canonical: orjson with sorted keys, so
two equal documents give equal bytes. Two requests with equal keys get equal inputs (but
for those volatile parts), so they get the same decision from the same bundle; the key
can only be computed after the input is built (``docs/performance.md`` has the cost).

The cache is bounded in bytes (``max_bytes``) as well as in entries (``max_entries``),
LRU. An entry holds the decision, the evaluation's revision and the deciding decision id,
never the input document (a hit records its own request's document), so its size follows
OPA's answer, not what the client sent; :func:`entry_size` accounts it conservatively
(measured against tracemalloc in ``tests/unit/core/test_cache.py``).

Not cached:

- a decision without ``identity``: a deny for a missing or unknown credential (the
  shipped policies name the key or sandbox in every decision about a known one), or an
  anonymous allow. Anyone can send distinct anonymous requests for free, so caching them
  would only let a flood of keyless requests evict the entries of identified callers;
- a decision with ``cache_ttl_s: 0`` (e.g. when a key expires soon);
- a decision evaluated across a :meth:`DecisionCache.clear` (bundle revision, overrides,
  admin reload): :attr:`DecisionCache.generation` is read before the evaluation starts
  and :meth:`DecisionCache.put` drops the decision if it changed, so no clear can be
  undone by an evaluation that was in flight.

Entries expire after a TTL (``ttl_s``, or the decision's own ``cache_ttl_s``; each
entry's life is shortened by a random share of up to ``jitter``, so the entries of a cold
start do not all expire in the same second and send their requests to OPA at once), and
are dropped whenever the bundle revision changes (seen in an OPA answer's provenance, or
by the bundle watcher's probe every second) or the overrides change. An entry is reused
only while the active revision is *confirmed*: OPA reported it within the last
``confirm_s`` seconds. So a revoked key (a new bundle) is refused as soon as authz sees
the new revision, and if OPA stops answering, reuse stops within ``confirm_s`` (every
request then asks OPA, and fails closed) instead of lasting a TTL. What is cached is the
policy's decision only: rate limiting, credential injection and the enforcement mode
still apply to every request.

Policies whose decision depends on anything outside the key (the request id, tracing
headers, the source port, the time beyond the TTL) must set ``cache_ttl_s: 0``.

**Declared keys** (``docs/contract.md``, "Declared cache keys"). A policy may declare
which parts of the input its decision depends on (:class:`KeyDeclaration`: input paths,
and request headers by name prefix); the bundle lists the declarations by decision path
in ``data.authz.meta.cache_keys``, which authz reads once per bundle activation
(:meth:`DecisionCache.declare`). For a declared path the key is :func:`declared_key`:
SHA-256 over the canonical JSON of the declared values only (plus the revision the
declaration came from), so requests that differ in anything else (request ids, user
agents, trace headers, query strings) share one entry. A declaration is used only while
the revision it was read from is the cache's active revision, and its key names that
revision: a decision of a newer bundle (which may read more of the input) can never be
found under a key of an older declaration. Without a bundle revision (OPA serving
policy files, whose changes announce nothing) declarations are never used. A path with no
declaration keeps the exact-input key above.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from authz.core.decision import Decision
from authz.core.headers import CREDENTIAL_HEADERS, IDENTITY_HEADERS
from authz.core.opa import Evaluation
from authz.core.response import ResponsePrototype, response_prototype

__all__ = [
    "DEFAULT_MAX_BYTES",
    "VOLATILE_HEADERS",
    "CachedDecision",
    "DecisionCache",
    "KeyDeclaration",
    "cache_key",
    "declared_key",
    "entry_size",
    "parse_declarations",
]

# The byte bound's default (AUTHZ_DECISION_CACHE_MAX_BYTES), 64 MiB.
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
# Accounted per entry besides OPA's answer: the 32-byte key and its OrderedDict slot, the
# entry, Decision and Evaluation objects, the revisions map and the decision id
# (measured: ~1 KB for the smallest decision).
ENTRY_OVERHEAD: Final = 1024
# Names a deployment may never leave out of the key: who the caller is.
_NEVER_VOLATILE: Final = frozenset(CREDENTIAL_HEADERS + IDENTITY_HEADERS)

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

# Bounds on the declarations a bundle may make (data.authz.meta.cache_keys): a
# declaration over them is refused (that path keeps the exact-input key).
MAX_DECLARED_PATHS: Final = 64
MAX_DECLARED_FIELDS: Final = 64
MAX_FIELD_DEPTH: Final = 16
MAX_DECLARED_NAME: Final = 256
MAX_HEADER_PREFIXES: Final = 32
# Where header prefixes select from: the headers map the shipped policies read.
HEADERS_PATH: Final = ("attributes", "request", "http", "headers")
# First byte of what a declared key hashes; an exact key's starts with the decision
# path's first character (a letter or "_"), so the two can never hash the same bytes.
_DECLARED_TAG: Final = b"\x01"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KeyDeclaration:
    """What a policy's decision depends on: ``fields``, input paths (each a tuple of
    object keys from the input's root; the value there, or its absence, is part of the
    key), and ``header_prefixes``: every header of ``input.attributes.request.http.headers``
    whose lowercased name starts with one of them, name and value. Shape as declared in
    Rego: ``{"input": [["credentials"], ["attributes", "request", "http", "method"]],
    "header_prefixes": ["x-authz-"]}`` (``docs/contract.md``)."""

    fields: tuple[tuple[str, ...], ...]
    header_prefixes: tuple[str, ...] = ()


def _declaration(value: Any) -> KeyDeclaration:
    """One declaration from its JSON; raises ValueError naming what is wrong."""
    if not isinstance(value, dict) or not set(value) <= {"input", "header_prefixes"}:
        raise ValueError('expected an object with "input" and optionally "header_prefixes"')
    fields, prefixes = value.get("input"), value.get("header_prefixes", [])
    if not isinstance(fields, list) or not 0 < len(fields) <= MAX_DECLARED_FIELDS:
        raise ValueError(f'"input" must be a list of 1 to {MAX_DECLARED_FIELDS} input paths')
    for field in fields:
        if (
            not isinstance(field, list)
            or not 0 < len(field) <= MAX_FIELD_DEPTH
            or not all(isinstance(p, str) and 0 < len(p) <= MAX_DECLARED_NAME for p in field)
        ):
            raise ValueError(
                f"input path {field!r}: expected 1 to {MAX_FIELD_DEPTH} non-empty strings"
            )
    if (
        not isinstance(prefixes, list)
        or len(prefixes) > MAX_HEADER_PREFIXES
        or not all(isinstance(p, str) and 0 < len(p) <= MAX_DECLARED_NAME for p in prefixes)
    ):
        raise ValueError(f'"header_prefixes" must be up to {MAX_HEADER_PREFIXES} strings')
    return KeyDeclaration(
        tuple(tuple(field) for field in fields), tuple(p.lower() for p in prefixes)
    )


def parse_declarations(value: Any) -> tuple[dict[str, KeyDeclaration], list[str]]:
    """``data.authz.meta.cache_keys`` (``{decision path: declaration}``) -> the valid
    declarations, and one message per entry refused (that path keeps the exact-input
    key: refusing is always safe). A value that is not an object declares nothing."""
    if not isinstance(value, dict):
        return {}, [] if value is None else ["cache_keys is not an object"]
    declarations: dict[str, KeyDeclaration] = {}
    problems: list[str] = []
    for path, item in value.items():
        if len(declarations) >= MAX_DECLARED_PATHS:
            problems.append(f"more than {MAX_DECLARED_PATHS} decision paths declared")
            break
        try:
            declarations[str(path)] = _declaration(item)
        except ValueError as exc:
            problems.append(f"{str(path)[:MAX_DECLARED_NAME]!r}: {exc}")
    return declarations, problems


def _select(document: Any, field: tuple[str, ...]) -> list[Any]:
    """``[value]`` at ``field`` in ``document``, or ``[]`` when it is absent (so an
    absent field and a JSON null stay apart)."""
    node = document
    for name in field:
        # A plain dict (every input document) first: an ABC isinstance check costs
        # several times a dict lookup. Any other Mapping takes the general path.
        if type(node) is dict:
            node = node.get(name, _ABSENT)
            if node is _ABSENT:
                return []
        elif isinstance(node, Mapping) and name in node:
            node = node[name]
        else:
            return []
    return [node]


_ABSENT: Final = object()


class _Selection:
    """A :class:`KeyDeclaration` read once per bundle activation
    (:meth:`DecisionCache.declare`) into what :meth:`key` walks per request."""

    __slots__ = ("_fields", "_prefixes")

    def __init__(self, declaration: KeyDeclaration) -> None:
        self._fields = declaration.fields
        self._prefixes = declaration.header_prefixes

    def key(self, path: str, revision: str, document: Mapping[str, Any]) -> bytes:
        """:func:`declared_key` of ``document``."""
        selected: list[Any] = [_select(document, field) for field in self._fields]
        prefixes = self._prefixes
        if prefixes:
            found = _select(document, HEADERS_PATH)
            headers = found[0] if found else None
            if type(headers) is not dict and not isinstance(headers, Mapping):
                headers = {}
            selected.append(
                {k: v for k, v in headers.items() if str(k).lower().startswith(prefixes)}
            )
        canonical = orjson.dumps([revision, path, selected], option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(_DECLARED_TAG + canonical).digest()


def declared_key(
    path: str, revision: str, document: Mapping[str, Any], declaration: KeyDeclaration
) -> bytes:
    """The declared cache key of ``document`` for decision ``path``: SHA-256 (32 bytes)
    over a tag byte and the canonical JSON (orjson, sorted keys) of ``[revision, path,
    the declared values]``; a JSON array, so no choice of values can make two different
    selections encode alike. Raises TypeError (orjson.JSONEncodeError) for values JSON
    cannot hold."""
    return _Selection(declaration).key(path, revision, document)


def cache_key(
    path: str, document: Mapping[str, Any], volatile: frozenset[str] = VOLATILE_HEADERS
) -> bytes:
    """The cache key of input ``document`` for decision ``path``: SHA-256 (32 bytes) over
    the path, a NUL, and the canonical JSON (orjson, sorted keys) of the document without
    its volatile parts (the ``volatile`` headers, the request time and id, the source
    port). Raises TypeError (orjson.JSONEncodeError) for a document JSON cannot hold."""
    canonical = orjson.dumps(_stable(document, volatile), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(path.encode() + b"\0" + canonical).digest()


def _stable(document: Mapping[str, Any], volatile: frozenset[str]) -> Mapping[str, Any]:
    """``document`` without what is unique to each request, copying only the dicts on
    the way to what is removed (the rest is shared, not copied)."""
    attributes = document.get("attributes")
    if not isinstance(attributes, Mapping):
        return document
    attributes = dict(attributes)
    request = attributes.get("request")
    if isinstance(request, Mapping):
        request = {k: v for k, v in request.items() if k != "time"}
        http = request.get("http")
        if isinstance(http, Mapping):
            http = {k: v for k, v in http.items() if k != "id"}
            headers = http.get("headers")
            if isinstance(headers, Mapping):
                http["headers"] = {k: v for k, v in headers.items() if k.lower() not in volatile}
            header_map = http.get("headerMap")
            if isinstance(header_map, Mapping) and isinstance(header_map.get("headers"), list):
                entries = [
                    h
                    for h in header_map["headers"]
                    if not (isinstance(h, Mapping) and str(h.get("key", "")).lower() in volatile)
                ]
                http["headerMap"] = {**header_map, "headers": entries}
            request["http"] = http
        attributes["request"] = request
    source = attributes.get("source")
    if isinstance(source, Mapping):
        address = source.get("address")
        socket = address.get("socketAddress") if isinstance(address, Mapping) else None
        if isinstance(address, Mapping) and isinstance(socket, Mapping):
            stable_socket = {k: v for k, v in socket.items() if k != "portValue"}
            attributes["source"] = {
                **source,
                "address": {**address, "socketAddress": stable_socket},
            }
    return {**document, "attributes": attributes}


def entry_size(key: bytes, evaluation: Evaluation) -> int:
    """Bytes accounted for one entry: :data:`ENTRY_OVERHEAD`, the key, and twice the
    memory of OPA's decoded answer (``sys.getsizeof`` over every JSON node), which bounds
    the parsed :class:`~authz.core.decision.Decision` built from it (measured at 35-55% of this
    total over headers, metadata and identity of every size)."""
    return (
        ENTRY_OVERHEAD
        + len(key)
        + 2 * _footprint(evaluation.result)
        + _footprint(dict(evaluation.revisions))
    )


# JSON's scalars: never walked into, so summed where they are met instead of stacked.
_LEAVES: Final = frozenset({str, int, float, bool, type(None)})


def _footprint(value: Any) -> int:
    """``sys.getsizeof`` summed over a decoded JSON value and everything in it: every
    node, and the keys and values of every ``dict`` and the items of every ``list``
    (subclasses included), walked without recursion. A plain dict's or list's scalar
    members are added where they are met rather than stacked (the same sum)."""
    size = sys.getsizeof
    leaves = _LEAVES
    total, stack = 0, [value]
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        total += size(node)
        kind = type(node)
        if kind is dict:
            for key, item in node.items():
                if type(key) is str:
                    total += size(key)
                else:
                    push(key)
                if type(item) in leaves:
                    total += size(item)
                else:
                    push(item)
        elif kind is list:
            for item in node:
                if type(item) in leaves:
                    total += size(item)
                else:
                    push(item)
        elif kind in leaves:
            continue
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return total


@dataclass(frozen=True, slots=True)
class CachedDecision:
    """A cached policy decision, the evaluation it came from (its revision, for the
    record; without OPA's raw answer), the decision id that evaluated it, when it
    expires (monotonic seconds), its accounted size in bytes (:func:`entry_size`, plus
    its prototype's) and an allow's response prototype once
    :meth:`DecisionCache.prototype` built it (:class:`authz.core.response.ResponsePrototype`)."""

    decision: Decision
    evaluation: Evaluation
    decision_id: str
    expires_at: float
    size: int
    prototype: ResponsePrototype | None = None
    # Whether DecisionCache.prototype was asked (then prototype is final, maybe None).
    prototyped: bool = False


class DecisionCache:
    """Bounded TTL LRU of policy decisions, keyed by :func:`cache_key`.

    ``max_bytes`` bounds the entries' accounted size (:func:`entry_size`) and
    ``max_entries`` their number; the least recently used go first. ``ignore_headers``
    adds deployment-specific per-request headers (a correlation id, a load generator's
    sequence number) to :data:`VOLATILE_HEADERS`; credential and identity headers
    (:mod:`authz.core.headers`) are never ignored. ``ttl_s`` caps an entry's life and
    ``confirm_s`` is how recently the revision must have been confirmed
    (:meth:`observe_revision`) for any entry to be reused, both in seconds; ``jitter``
    (0..1) is the largest share of its TTL an entry loses at random (``rng`` gives 0..1).
    ``clock`` is monotonic seconds. Raises ValueError for a jitter outside 0..1 or a
    bound below 1. ``hits``, ``misses``, ``clears`` and ``dropped_stale`` (puts dropped
    because a clear happened during their evaluation) are counters for metrics;
    ``bytes`` is the accounted size of the entries held."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float = 60.0,
        confirm_s: float = 5.0,
        jitter: float = 0.2,
        ignore_headers: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be within 0..1, got {jitter}")
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"bounds must be at least 1, got {max_entries}, {max_bytes}")
        self.volatile = (VOLATILE_HEADERS | {h.lower() for h in ignore_headers}) - _NEVER_VOLATILE
        self._entries: OrderedDict[bytes, CachedDecision] = OrderedDict()
        self._max_entries = max_entries
        self.max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._confirm_s = confirm_s
        self._jitter = jitter
        self._clock = clock
        self._rng = rng
        self._revision: str | None = None
        self._declarations: Mapping[str, KeyDeclaration] = {}
        self._selections: Mapping[str, _Selection] = {}
        self._declared_for: str | None = None
        self._confirmed_at = float("-inf")
        self._generation = 0
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.clears = 0
        self.dropped_stale = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def generation(self) -> int:
        """Bumped by every :meth:`clear`; read it before an evaluation starts and pass it
        to :meth:`put`."""
        return self._generation

    def key(self, path: str, document: Mapping[str, Any]) -> bytes | None:
        """:func:`declared_key` when the active bundle revision declared one for
        ``path`` (:meth:`declare`), else :func:`cache_key` with this cache's volatile
        headers; None (uncacheable) for a document JSON cannot hold."""
        try:
            selection = self._selections.get(path)
            revision = self._revision
            # Only under a bundle revision: without one (policies loaded from files), a
            # policy change announces nothing, and an old declaration could outlive it.
            if selection is not None and revision and revision == self._declared_for:
                return selection.key(path, revision, document)
            return cache_key(path, document, self.volatile)
        except TypeError:  # orjson.JSONEncodeError: OPA could not be sent it either
            return None

    def declare(self, revision: str, declarations: Mapping[str, KeyDeclaration]) -> None:
        """Use ``declarations`` (decision path -> :class:`KeyDeclaration`, read from
        bundle ``revision``) while ``revision`` is the active one; paths not in it keep
        the exact-input key. Declarations that differ from the current ones drop every
        entry (an activation that changes them has already dropped them too)."""
        if dict(declarations) != dict(self._declarations):
            self.clear("cache key declarations changed")
        self._declarations = dict(declarations)
        self._selections = {path: _Selection(d) for path, d in self._declarations.items()}
        self._declared_for = revision

    @property
    def declarations(self) -> Mapping[str, KeyDeclaration]:
        """The declarations in use (empty: every path keys on the exact input)."""
        in_use = self._revision and self._declared_for == self._revision
        return self._declarations if in_use else {}

    def get(self, key: bytes) -> CachedDecision | None:
        """The live entry for ``key`` (refreshing its LRU position), or None (also while
        the revision is unconfirmed)."""
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None and now - self._confirmed_at > self._confirm_s:
            self.misses += 1  # kept: the next confirmation of the same revision revives it
            return None
        if entry is None or entry.expires_at <= now:
            if entry is not None:
                self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def prototype(self, key: bytes, entry: CachedDecision) -> ResponsePrototype | None:
        """The response prototype of ``entry`` (just returned by :meth:`get` for
        ``key``), for :func:`authz.core.response.build_response`: what every hit would
        build again, its response less the decision id and the rate-limit headers
        (:func:`authz.core.response.response_prototype`). Built at the first call (a
        decision never hit again does not pay for it) and kept with the entry, counted in
        its size (less recently used entries go to make room); None when there is none
        (a deny, nested metadata), it does not fit ``max_bytes``, or ``key`` no longer
        holds ``entry``."""
        if entry.prototyped:
            return entry.prototype
        if self._entries.get(key) is not entry:
            return None
        prototype = response_prototype(entry.decision)
        added = 0
        if prototype is not None and entry.size + prototype.size <= self.max_bytes:
            added = prototype.size
        else:
            prototype = None
        entry = CachedDecision(
            entry.decision,
            entry.evaluation,
            entry.decision_id,
            entry.expires_at,
            entry.size + added,
            prototype,
            prototyped=True,
        )
        self._entries[key] = entry  # an existing key: its position is kept
        self.bytes += added
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            if oldest == key:  # not reached: it alone fits
                break
            self._drop(oldest)
        return prototype

    def put(
        self,
        key: bytes,
        decision: Decision,
        evaluation: Evaluation,
        decision_id: str,
        *,
        generation: int,
    ) -> None:
        """Cache ``decision``, evaluated from a state read at ``generation``
        (:attr:`generation` before the evaluation started), unless a clear happened since
        (dropped, counted in ``dropped_stale``), it names no identity, it is uncacheable
        (``cache_ttl_s`` 0), or its size alone exceeds ``max_bytes``. An evaluation from
        another bundle revision than the cached ones drops them all first. Then the least
        recently used entries go until both bounds hold."""
        if generation != self._generation:
            self.dropped_stale += 1
            return
        self.observe_revision(evaluation.revision)
        if not decision.identity:
            return
        ttl = (
            self._ttl_s if decision.cache_ttl_s is None else min(decision.cache_ttl_s, self._ttl_s)
        )
        if ttl <= 0:
            return
        size = entry_size(key, evaluation)
        if size > self.max_bytes:
            return
        now = self._clock()
        ttl *= 1.0 - self._jitter * self._rng()
        if key in self._entries:
            self._drop(key)
        reused = dataclasses.replace(evaluation, result=None, duration_s=0.0)
        self._entries[key] = CachedDecision(decision, reused, decision_id, now + ttl, size)
        self.bytes += size
        while self.bytes > self.max_bytes or len(self._entries) > self._max_entries:
            self._drop(next(iter(self._entries)))
        # Drop expired entries from the old end too, so memory follows the live set.
        for _ in range(2):
            oldest = next(iter(self._entries.items()), None)
            if oldest is None or oldest[1].expires_at > now:
                break
            self._drop(oldest[0])

    def _drop(self, key: bytes) -> None:
        self.bytes -= self._entries.pop(key).size

    def observe_revision(self, revision: str) -> None:
        """Note the active bundle revision, as OPA just reported it (which confirms it for
        ``confirm_s`` seconds); a change drops every entry."""
        self._confirmed_at = self._clock()
        if revision != self._revision:
            if self._revision is not None:
                self.clear(f"bundle revision {revision}")
            self._revision = revision

    def clear(self, why: str) -> None:
        """Drop every entry (bundle activation, overrides changed, ...) and bump
        :attr:`generation`, so no evaluation in flight can put a decision back."""
        if self._entries:
            log.info("decision cache cleared", extra={"why": why, "entries": len(self._entries)})
        self._entries.clear()
        self.bytes = 0
        self._generation += 1
        self.clears += 1
