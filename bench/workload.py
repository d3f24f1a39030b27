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

:func:`write_targets` turns a stream into a vegeta ``http`` targets file.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from authz.tools.keys import digest

__all__ = [
    "BENCH_PATH",
    "BENCH_ROLE",
    "BENCH_TIER",
    "DistinctStream",
    "bench_key",
    "keys_data",
    "write_keys_overlay",
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


def zipf_sequence(
    keys: Sequence[int], count: int, exponent: float = 1.0, seed: int = 1
) -> list[int]:
    """``count`` draws from ``keys`` with Zipf popularity: ``keys[0]`` is the most
    popular (rank 1), ``keys[r-1]`` has weight ``1 / r**exponent``. Deterministic for a
    given ``seed``."""
    weights = zipf_weights(len(keys), exponent)
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    rng = random.Random(seed)  # noqa: S311 (load shape, not security)
    last = len(keys) - 1
    return [
        keys[min(bisect.bisect_right(cumulative, rng.random() * total), last)] for _ in range(count)
    ]


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
