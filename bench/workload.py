"""Benchmark API keys, their bundle data, and the request streams that use them.

Keys are deterministic (``bench_key(i)``), so key ``i`` is the same in every bundle size:
the 100-key bundle holds the first 100 keys of the 100,000-key bundle, and a request
stream over keys ``0..99`` is valid against every size. Bundle data stores only the
SHA-256 digest of each key (``authz.tools.keys.digest``), in the format of
``infra/demo/bundle-data/gateway/api_keys/data.json``.

Streams are lists of key indices:

- :func:`zipf_sequence` - a skewed popularity: ``hot`` keys, the key of rank ``r``
  (1-based) drawn with probability proportional to ``1 / r**exponent``;
- :class:`DistinctStream` - every request a different key (a seeded permutation of all
  keys, consumed in order across calls, so no key repeats until all were used).

:func:`write_targets` turns a stream into a vegeta ``http`` targets file (every request
``GET BENCH_PATH`` with its key). :class:`RealisticStream` is the realistic workload: whole
requests (:class:`Request`) with Zipf-distributed keys over varied paths (ids in path
segments, query strings), a few methods and user agents, and per-request ``x-request-id``
and ``traceparent`` headers; :func:`write_requests` writes those.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from authz.tools.keys import digest

__all__ = [
    "BENCH_PATH",
    "BENCH_ROLE",
    "BENCH_TIER",
    "REALISTIC_TEMPLATES",
    "USER_AGENTS",
    "DistinctStream",
    "RealisticStream",
    "Request",
    "ZipfSampler",
    "bench_key",
    "keys_data",
    "requests_text",
    "write_keys_overlay",
    "write_requests",
    "write_targets",
    "zipf_sequence",
    "zipf_weights",
]

# Allowed for role "user" by policy/gateway/data.json (GET /api/v1/**).
BENCH_PATH: Final = "/api/v1/items/1"
BENCH_ROLE: Final = "user"
# -1 requests per minute: authz's limiter never answers 429 for bench keys.
BENCH_TIER: Final = "unlimited"


def bench_key(index: int, seed: str = "bench") -> str:
    """The plaintext API key number ``index`` (stable for a given ``seed``)."""
    token = hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()[:32]
    return f"ak_bench_{index:06d}_{token}"


def keys_data(count: int, seed: str = "bench") -> dict[str, dict[str, Any]]:
    """``gateway/api_keys/data.json`` content for keys ``0..count-1``: digest -> entry."""
    return {
        digest(bench_key(i, seed)): {
            "id": f"key-bench-{i:06d}",
            "enabled": True,
            "role": BENCH_ROLE,
            "rate_limit_tier": BENCH_TIER,
        }
        for i in range(count)
    }


def write_keys_overlay(directory: Path, count: int, seed: str = "bench") -> Path:
    """Write ``<directory>/gateway/api_keys/data.json`` (a ``build-policy-bundle --data``
    overlay) with ``count`` keys; returns ``directory``."""
    target = directory / "gateway" / "api_keys" / "data.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(keys_data(count, seed), indent=0), encoding="utf-8")
    return directory


def zipf_weights(n: int, exponent: float = 1.0) -> list[float]:
    """Unnormalized Zipf weights of ranks ``1..n``: ``1 / rank**exponent``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if exponent < 0:
        raise ValueError(f"exponent must be >= 0, got {exponent}")
    return [1.0 / (rank**exponent) for rank in range(1, n + 1)]


class ZipfSampler:
    """Draws ranks ``0..n-1`` with Zipf popularity: rank ``r`` (0-based) has weight
    ``1 / (r + 1)**exponent``. The cumulative weights are computed once (O(n)); a draw is
    a binary search (O(log n)) with the caller's ``random.Random``."""

    def __init__(self, n: int, exponent: float = 1.0) -> None:
        self._cumulative = list(itertools.accumulate(zipf_weights(n, exponent)))
        self._total = self._cumulative[-1]
        self._last = n - 1

    def draw(self, rng: random.Random) -> int:
        """One rank, 0 the most popular."""
        return min(bisect.bisect_right(self._cumulative, rng.random() * self._total), self._last)


def zipf_sequence(
    keys: Sequence[int], count: int, exponent: float = 1.0, seed: int = 1
) -> list[int]:
    """``count`` draws from ``keys`` with Zipf popularity: ``keys[0]`` is the most
    popular (rank 1), ``keys[r-1]`` has weight ``1 / r**exponent``. Deterministic for a
    given ``seed``."""
    sampler = ZipfSampler(len(keys), exponent)
    rng = random.Random(seed)  # noqa: S311 (load shape, not security)
    return [keys[sampler.draw(rng)] for _ in range(count)]


@dataclass
class DistinctStream:
    """Every request a distinct key: a seeded permutation of ``0..n-1`` handed out in
    order by :meth:`take`; it wraps around (and counts the wraps) only after all ``n``
    keys were used."""

    n: int
    seed: int = 1
    cursor: int = 0
    wraps: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        self._order = list(range(self.n))
        random.Random(self.seed).shuffle(self._order)  # noqa: S311

    def take(self, count: int) -> list[int]:
        """The next ``count`` key indices."""
        out: list[int] = []
        while len(out) < count:
            chunk = self._order[self.cursor : self.cursor + count - len(out)]
            out.extend(chunk)
            self.cursor += len(chunk)
            if self.cursor >= self.n:
                self.cursor = 0
                self.wraps += 1
        return out

    @property
    def used(self) -> int:
        """How many keys were handed out so far."""
        return self.wraps * self.n + self.cursor


def targets_text(url: str, indices: Iterable[int], seed: str = "bench") -> str:
    """vegeta ``-format=http`` targets: one ``GET url`` with ``X-API-Key`` per index."""
    return "".join(f"GET {url}\nX-API-Key: {bench_key(i, seed)}\n\n" for i in indices)


def write_targets(path: Path, url: str, indices: Iterable[int], seed: str = "bench") -> Path:
    """Write :func:`targets_text` to ``path``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(targets_text(url, indices, seed), encoding="utf-8")
    return path


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload: ``method``, ``target`` (path and query, starting with
    ``/``) and ``headers`` in the order they are sent."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), None when absent."""
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)


def requests_text(url: str, requests: Iterable[Request]) -> str:
    """vegeta ``-format=http`` targets (https://github.com/tsenart/vegeta#http-format):
    ``METHOD url+target``, one ``Name: value`` line per header, a blank line."""
    return "".join(
        f"{r.method} {url}{r.target}\n" + "".join(f"{k}: {v}\n" for k, v in r.headers) + "\n"
        for r in requests
    )


def write_requests(path: Path, url: str, requests: Iterable[Request]) -> Path:
    """Write :func:`requests_text` to ``path``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(requests_text(url, requests), encoding="utf-8")
    return path


# A client population, most popular first (drawn with Zipf popularity).
USER_AGENTS: Final = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "okhttp/4.12.0",
    "python-requests/2.32.3",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "curl/8.11.0",
)
# Distinct ids a path segment draws from (Zipf: a few hot items, a long tail).
REALISTIC_IDS: Final = 10_000
_SEARCH_TERMS: Final = ("shoes", "red+shoes", "laptop", "usb-c", "gift", "coffee", "desk")
_STATUSES: Final = ("open", "shipped", "cancelled")

# Path templates, most popular first (drawn with Zipf popularity), as functions of
# (rng, id sampler) -> (method, target). Every one is allowed for role "user" by
# policy/gateway/data.json (GET/HEAD/DELETE on /api/v1/**, GET on /api/v1/status).
_Template = Callable[[random.Random, ZipfSampler], tuple[str, str]]


def _item(rng: random.Random, ids: ZipfSampler) -> tuple[str, str]:
    return "GET", f"/api/v1/items/{ids.draw(rng) + 1}"


def _item_reviews(rng: random.Random, ids: ZipfSampler) -> tuple[str, str]:
    return "GET", f"/api/v1/items/{ids.draw(rng) + 1}/reviews?page={rng.randint(1, 5)}"


def _search(rng: random.Random, _: ZipfSampler) -> tuple[str, str]:
    term = _SEARCH_TERMS[min(int(rng.expovariate(0.7)), len(_SEARCH_TERMS) - 1)]
    return "GET", f"/api/v1/search?q={term}&page={rng.randint(1, 3)}&sort=relevance"


def _user_orders(rng: random.Random, ids: ZipfSampler) -> tuple[str, str]:
    status = rng.choice(_STATUSES)
    return "GET", f"/api/v1/users/u-{ids.draw(rng) + 1}/orders?status={status}&limit=20"


def _uuid4(rng: random.Random) -> str:
    """A version-4 UUID (RFC 9562 section 5.4) from ``rng``: 122 random bits, the version
    nibble 4 and the variant bits 10 (a third of the cost of ``uuid.UUID(int=...)``)."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _order(rng: random.Random, _: ZipfSampler) -> tuple[str, str]:
    return "GET", f"/api/v1/orders/{_uuid4(rng)}"


def _status(_rng: random.Random, _: ZipfSampler) -> tuple[str, str]:
    return "GET", "/api/v1/status"


def _item_head(rng: random.Random, ids: ZipfSampler) -> tuple[str, str]:
    return "HEAD", f"/api/v1/items/{ids.draw(rng) + 1}"


def _cart_delete(rng: random.Random, ids: ZipfSampler) -> tuple[str, str]:
    return "DELETE", f"/api/v1/cart/items/{ids.draw(rng) + 1}"


REALISTIC_TEMPLATES: Final[tuple[_Template, ...]] = (
    _item,
    _search,
    _item_reviews,
    _user_orders,
    _status,
    _order,
    _item_head,
    _cart_delete,
)


@dataclass
class RealisticStream:
    """The realistic workload, as an endless stream handed out by :meth:`take`.

    Each request: an API key drawn with Zipf popularity (``exponent``) from keys
    ``0..hot-1``; a path template drawn with Zipf popularity from
    :data:`REALISTIC_TEMPLATES`, its ids drawn with Zipf popularity from
    :data:`REALISTIC_IDS` (search terms, pages, statuses and order UUIDs vary too); a
    user agent drawn with Zipf popularity from :data:`USER_AGENTS`; a fresh
    ``x-request-id`` (a UUID) and W3C ``traceparent``
    (https://www.w3.org/TR/trace-context/#traceparent-header) on every request.
    Deterministic for a given ``seed``: two streams with the same arguments yield the
    same requests."""

    hot: int
    exponent: float = 1.0
    seed: int = 1
    key_seed: str = "bench"
    issued: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _keys: ZipfSampler = field(init=False, repr=False)
    _ids: ZipfSampler = field(init=False, repr=False)
    _templates: ZipfSampler = field(init=False, repr=False)
    _agents: ZipfSampler = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.hot < 1:
            raise ValueError(f"hot must be >= 1, got {self.hot}")
        self._rng = random.Random(self.seed)  # noqa: S311 (load shape, not security)
        self._keys = ZipfSampler(self.hot, self.exponent)
        self._ids = ZipfSampler(REALISTIC_IDS, self.exponent)
        self._templates = ZipfSampler(len(REALISTIC_TEMPLATES), self.exponent)
        self._agents = ZipfSampler(len(USER_AGENTS), self.exponent)

    def take(self, count: int) -> list[Request]:
        """The next ``count`` requests."""
        rng = self._rng
        out = []
        for _ in range(count):
            key = bench_key(self._keys.draw(rng), self.key_seed)
            method, target = REALISTIC_TEMPLATES[self._templates.draw(rng)](rng, self._ids)
            trace, span = rng.getrandbits(128), rng.getrandbits(64)
            out.append(
                Request(
                    method,
                    target,
                    (
                        ("X-API-Key", key),
                        ("User-Agent", USER_AGENTS[self._agents.draw(rng)]),
                        ("Accept", "application/json"),
                        ("X-Request-Id", _uuid4(rng)),
                        ("traceparent", f"00-{trace:032x}-{span:016x}-01"),
                    ),
                )
            )
        self.issued += count
        return out
