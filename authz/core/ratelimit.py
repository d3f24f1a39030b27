"""Rate limiting: GCRA buckets per key, in process or shared through Redis.

The algorithm is GCRA (the Generic Cell Rate Algorithm, as in ATM's "virtual scheduling"
and redis-cell): a quota of ``L`` requests per minute with burst ``B`` emits one request
every ``T = 60/L`` seconds and tolerates up to ``B`` at once. Each bucket stores one
number, its theoretical arrival time (TAT). A request at ``now`` is allowed when
``max(TAT, now) + T - B*T <= now``, and then moves TAT forward by ``T``. So a client
sending ``L`` requests at once gets ``B`` of them and then one every ``T``: limits are
enforced smoothly, never "all 60 in the first second, then nothing".

Quotas come from the decision (``rate_limit.requests_per_minute``, ``burst``), so the
bundle data is their one source of truth and a changed tier applies at the next bundle
activation. ``-1`` means unlimited, ``0`` means no requests.

Backends:

- :class:`MemoryLimiter` (default): a dict in this process; atomic because the event
  loop runs one check at a time.
- :class:`RedisLimiter`: one Lua script per check (atomic in Redis, using Redis's own
  clock so replicas never disagree about time), for several authz replicas sharing one
  limit. When Redis is unreachable it either falls back to a local limiter (default; the
  limit then holds per replica) or denies with :class:`~authz.core.errors.RateLimitUnavailable`
  (``strict``), skips Redis for ``retry_interval_s`` to add no latency meanwhile, then
  probes it again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from authz.core.errors import RateLimitUnavailable

__all__ = [
    "UNLIMITED",
    "Limiter",
    "MemoryLimiter",
    "Quota",
    "RateLimitResult",
    "RedisLimiter",
    "gcra",
]

UNLIMITED: Final = -1
WINDOW_S: Final = 60.0
REDIS_PREFIX: Final = "authz:rl:"

log = logging.getLogger(__name__)

# KEYS[1] bucket; ARGV[1] emission interval T (us); ARGV[2] burst B.
# Returns {allowed (0/1), TAT - now after the check (us), retry after (us)}.
_GCRA_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, new_tat - now, 0}
"""


@dataclass(frozen=True, slots=True)
class Quota:
    """``requests_per_minute`` (``-1`` unlimited, ``0`` none) with bucket size ``burst``
    (requests that may arrive at once; at least 1).

    What depends on the quota alone is computed once, at construction (a rate-limited
    decision checks the same few quotas on every request): the interval ``T``, the
    bucket's capacity ``burst * T`` and the two headers that name the quota. None of it
    takes part in equality, hashing or ``repr``."""

    requests_per_minute: int
    burst: int
    # T and burst * T (None unless both fields are ints and not 0 requests), and the
    # ratelimit-limit / ratelimit-policy headers (None for an unlimited quota).
    _interval: int | None = field(init=False, repr=False, compare=False)
    _capacity: int | None = field(init=False, repr=False, compare=False)
    _named: tuple[tuple[str, str], tuple[str, str]] | None = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        rpm = self.requests_per_minute
        # Ints only (what Quota.of is given); 0 has no interval, and other types keep to
        # the computation at each use (MemoryLimiter's slow path).
        plain = type(rpm) is int and type(self.burst) is int and rpm != 0
        interval = _interval_ns(rpm) if plain else None
        named = (
            None
            if rpm == UNLIMITED
            else (
                ("ratelimit-limit", str(rpm)),
                ("ratelimit-policy", f"{rpm};w={WINDOW_S:.0f};burst={self.burst}"),
            )
        )
        object.__setattr__(self, "_interval", interval)
        object.__setattr__(self, "_capacity", None if interval is None else self.burst * interval)
        object.__setattr__(self, "_named", named)

    @property
    def interval_ns(self) -> int:
        """Nanoseconds between two requests at the sustained rate (``T``). Raises
        ZeroDivisionError for a quota of 0 requests."""
        interval = self._interval
        return _interval_ns(self.requests_per_minute) if interval is None else interval

    @classmethod
    def of(cls, requests_per_minute: int, burst: int | None, burst_seconds: float) -> Quota:
        """A quota; without an explicit ``burst``, ``burst_seconds`` worth of requests
        (at least 1, at most ``requests_per_minute``). The same arguments (ints and a
        float ``burst_seconds``) give the same, shared quota, up to ``_QUOTAS_MAX`` of
        them."""
        # Only plain ints and a float are shared: 60, 60.0 and a bool are equal keys but
        # not the same quota (their headers differ).
        plain = (
            type(requests_per_minute) is int
            and type(burst_seconds) is float
            and (burst is None or type(burst) is int)
        )
        if plain:
            key = (requests_per_minute, burst, burst_seconds)
            quota = _QUOTAS.get(key)
            if quota is None:
                quota = cls._of(requests_per_minute, burst, burst_seconds)
                if len(_QUOTAS) < _QUOTAS_MAX:
                    _QUOTAS[key] = quota
            return quota
        return cls._of(requests_per_minute, burst, burst_seconds)

    @classmethod
    def _of(cls, requests_per_minute: int, burst: int | None, burst_seconds: float) -> Quota:
        if burst is None:
            burst = math.ceil(requests_per_minute * burst_seconds / WINDOW_S)
            burst = max(1, min(burst, max(requests_per_minute, 1)))
        return cls(requests_per_minute, burst)


def _interval_ns(requests_per_minute: int) -> int:
    return max(1, round(WINDOW_S * 1e9 / requests_per_minute))


# Quota.of's shared quotas, by (requests_per_minute, burst, burst_seconds). Quotas come
# from bundle data (a handful of tiers); a policy computing them from request values
# could name any number, so at most this many are kept (later ones are built each time).
_QUOTAS_MAX: Final = 1024
_QUOTAS: dict[tuple[int, int | None, float], Quota] = {}


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    """One check's outcome. ``remaining`` is how many more requests would be allowed right
    now; ``reset_s`` seconds until the bucket is full again; ``retry_after_s`` seconds
    until the next request is allowed (0 when this one was). ``backend`` names who
    decided (``memory``, ``redis``, ``fallback``, ``none`` for unlimited)."""

    allowed: bool
    quota: Quota
    remaining: int
    reset_s: float
    retry_after_s: float
    backend: str

    def headers(self) -> tuple[tuple[str, str], ...]:
        """Client-facing headers, after draft-ietf-httpapi-ratelimit-headers (draft-03
        field names): ``RateLimit-Limit`` (requests per minute), ``RateLimit-Remaining``
        (requests allowed right now), ``RateLimit-Reset`` (seconds until the bucket is
        full), ``RateLimit-Policy`` (``<limit>;w=60;burst=<burst>``), plus ``Retry-After``
        (whole seconds, rounded up) on a deny. None for an unlimited quota."""
        named = self.quota._named
        if named is None:
            return ()
        limit, policy = named
        remaining = ("ratelimit-remaining", str(self.remaining))
        reset = ("ratelimit-reset", str(math.ceil(self.reset_s)))
        if self.allowed:
            return (limit, remaining, reset, policy)
        retry = ("retry-after", str(max(1, math.ceil(self.retry_after_s))))
        return (limit, remaining, reset, policy, retry)


def gcra(tat: int, now: int, quota: Quota) -> tuple[bool, int, int, int]:
    """One GCRA step (pure), in integer nanoseconds so that ``burst`` intervals add up
    exactly (floats would lose the last request of a burst). ``tat`` is the bucket's
    stored TAT (``0`` for a new bucket), ``now`` the time. Returns ``(allowed, new stored
    TAT, TAT - now after the step, retry after)``; when denied the stored TAT is
    unchanged."""
    interval = quota.interval_ns
    tat = max(tat, now)
    new_tat = tat + interval
    allow_at = new_tat - quota.burst * interval
    if now < allow_at:
        return False, tat, tat - now, allow_at - now
    return True, new_tat, new_tat - now, 0


def _result(
    allowed: bool, quota: Quota, ahead_ns: int, retry_ns: int, backend: str
) -> RateLimitResult:
    # ``ahead_ns`` (TAT - now) of ``burst * T`` is used; what is left, in whole requests.
    interval = quota.interval_ns
    remaining = max(0, (quota.burst * interval - ahead_ns) // interval)
    return RateLimitResult(
        allowed, quota, remaining, max(ahead_ns, 0) / 1e9, retry_ns / 1e9, backend
    )


def _trivial(quota: Quota) -> RateLimitResult | None:
    if quota.requests_per_minute == UNLIMITED:
        return RateLimitResult(True, quota, 0, 0.0, 0.0, "none")
    if quota.requests_per_minute == 0:
        return RateLimitResult(False, quota, 0, WINDOW_S, WINDOW_S, "none")
    return None


class Limiter(Protocol):
    """Checks (and counts) one request against a bucket."""

    async def check(self, key: str, quota: Quota) -> RateLimitResult:
        """Count one request for ``key`` under ``quota``. Raises RateLimitUnavailable
        only when a shared backend is down and the configured mode is strict."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryLimiter:
    """In-process GCRA buckets. ``clock`` is monotonic seconds. At most ``max_keys``
    buckets are kept: expired ones (TAT in the past, equivalent to a new bucket) are swept
    every ``sweep_every`` checks, and if still over, the oldest are dropped."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1_000_000,
        sweep_every: int = 10_000,
        name: str = "memory",
    ) -> None:
        self._clock = clock
        self._tats: dict[str, int] = {}
        self._max_keys = max_keys
        self._sweep_every = sweep_every
        self._since_sweep = 0
        self._name = name

    def __len__(self) -> int:
        return len(self._tats)

    def check_now(self, key: str, quota: Quota) -> RateLimitResult:
        """Synchronous :meth:`check` (the in-process bucket never waits)."""
        interval = quota._interval
        capacity = quota._capacity
        if interval is None or capacity is None or quota.requests_per_minute == UNLIMITED:
            return self._check_slow(key, quota)
        now = int(self._clock() * 1e9)
        # gcra and _result in one, on the quota's precomputed T and burst * T (the same
        # integers; tests/unit/core/test_ratelimit.py compares with the two steps).
        tat = self._tats.get(key, 0)
        if tat < now:
            tat = now
        new_tat = tat + interval
        allow_at = new_tat - capacity
        if now < allow_at:
            ahead = tat - now
            return RateLimitResult(
                False,
                quota,
                max(0, (capacity - ahead) // interval),
                max(ahead, 0) / 1e9,
                (allow_at - now) / 1e9,
                self._name,
            )
        self._tats[key] = new_tat
        self._since_sweep += 1
        if self._since_sweep >= self._sweep_every or len(self._tats) > self._max_keys:
            self._sweep(now)
        ahead = new_tat - now
        return RateLimitResult(
            True, quota, max(0, (capacity - ahead) // interval), ahead / 1e9, 0.0, self._name
        )

    def _check_slow(self, key: str, quota: Quota) -> RateLimitResult:
        """:meth:`check_now` as the separate steps: for unlimited, zero and odd quotas
        (no precomputed interval), and the reference its fast path is tested against."""
        trivial = _trivial(quota)
        if trivial is not None:
            return trivial
        now = int(self._clock() * 1e9)
        allowed, stored, ahead, retry = gcra(self._tats.get(key, 0), now, quota)
        if allowed:
            self._tats[key] = stored
            self._since_sweep += 1
            if self._since_sweep >= self._sweep_every or len(self._tats) > self._max_keys:
                self._sweep(now)
        return _result(allowed, quota, ahead, retry, self._name)

    async def check(self, key: str, quota: Quota) -> RateLimitResult:
        """See :meth:`Limiter.check`."""
        return self.check_now(key, quota)

    def _sweep(self, now: int) -> None:
        self._since_sweep = 0
        self._tats = {k: v for k, v in self._tats.items() if v > now}
        excess = len(self._tats) - self._max_keys
        if excess > 0:
            log.warning(
                "rate-limit buckets over max_keys; dropping the oldest", extra={"n": excess}
            )
            for key in list(self._tats)[:excess]:
                del self._tats[key]

    async def close(self) -> None:
        """Nothing to release."""


class RedisLimiter:
    """GCRA buckets in Redis (``redis_client`` is a ``redis.asyncio.Redis``), shared by
    every replica. ``on_failure`` is ``fallback`` (use ``fallback``, a local limiter) or
    ``deny`` (raise RateLimitUnavailable). ``timeout_s`` bounds each Redis call;
    after a failure Redis is skipped for ``retry_interval_s`` seconds. ``available`` and
    ``failures`` describe the connection for readiness and metrics."""

    def __init__(
        self,
        redis_client: Any,
        *,
        on_failure: Literal["fallback", "deny"] = "fallback",
        timeout_s: float = 0.05,
        retry_interval_s: float = 1.0,
        fallback: MemoryLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis_client
        self._script = redis_client.register_script(_GCRA_LUA)
        self._on_failure = on_failure
        self._timeout_s = timeout_s
        self._retry_interval_s = retry_interval_s
        self._fallback = fallback or MemoryLimiter(name="fallback")
        self._clock = clock
        self._skip_until = 0.0
        self.available = True
        self.failures = 0

    async def check(self, key: str, quota: Quota) -> RateLimitResult:
        """See :meth:`Limiter.check`."""
        trivial = _trivial(quota)
        if trivial is not None:
            return trivial
        if self._clock() < self._skip_until:
            return self._degraded(key, quota)
        interval_us = max(1, quota.interval_ns // 1000)
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._script(
                    keys=[REDIS_PREFIX + key], args=[interval_us, quota.burst]
                )
        except Exception as exc:  # redis.RedisError, OSError, TimeoutError, ...
            self._failed(exc)
            return self._degraded(key, quota)
        if not self.available:
            self.available = True
            log.warning("redis rate-limit backend recovered")
        allowed, ahead_us, retry_us = (int(v) for v in reply)
        return _result(bool(allowed), quota, ahead_us * 1000, retry_us * 1000, "redis")

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self._skip_until = self._clock() + self._retry_interval_s
        if self.available:
            self.available = False
            log.error(
                "redis rate-limit backend unreachable",
                extra={"error": type(exc).__name__, "mode": self._on_failure},
            )

    def _degraded(self, key: str, quota: Quota) -> RateLimitResult:
        if self._on_failure == "deny":
            raise RateLimitUnavailable("the shared rate-limit backend (Redis) is unreachable")
        return self._fallback.check_now(key, quota)

    async def close(self) -> None:
        """Close the Redis connection pool."""
        await self._redis.aclose()
