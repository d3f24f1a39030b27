"""GCRA limiter with an injected clock: burst, refill, boundaries, unlimited, headers."""

from __future__ import annotations

import asyncio
import math

import pytest

from authz.core.ratelimit import MemoryLimiter, Quota, RateLimitResult, gcra
from tests.helpers.fakes import ManualClock


def run(limiter: MemoryLimiter, key: str, quota: Quota, n: int) -> list[bool]:
    return [limiter.check_now(key, quota).allowed for _ in range(n)]


@pytest.mark.parametrize(
    ("rpm", "burst", "burst_s", "expected"),
    [
        (60, None, 10.0, 10),
        (10, None, 10.0, 2),
        (1, None, 10.0, 1),
        (600, None, 10.0, 100),
        (60, None, 60.0, 60),
        (60, None, 600.0, 60),
        (60, 5, 10.0, 5),
        (-1, None, 10.0, 1),
        (0, None, 10.0, 1),
    ],
    ids=[
        "60",
        "10",
        "1-min-1",
        "600",
        "full-minute",
        "capped-at-limit",
        "explicit",
        "unlimited",
        "zero",
    ],
)
def test_quota_burst(rpm: int, burst: int | None, burst_s: float, expected: int) -> None:
    assert Quota.of(rpm, burst, burst_s).burst == expected


def test_burst_then_smooth_refill() -> None:
    clock = ManualClock(1000.0)
    limiter = MemoryLimiter(clock=clock)
    quota = Quota(60, 10)  # one per second, ten at once
    assert run(limiter, "k", quota, 12) == [True] * 10 + [False] * 2
    clock.now += 0.999
    assert run(limiter, "k", quota, 1) == [False]
    clock.now += 0.001  # exactly one interval later: one more
    assert run(limiter, "k", quota, 2) == [True, False]
    clock.now += 3.0
    assert run(limiter, "k", quota, 4) == [True, True, True, False]


def test_sustained_rate_is_the_limit_not_more() -> None:
    clock = ManualClock(1000.0)
    limiter = MemoryLimiter(clock=clock)
    quota = Quota(60, 10)
    allowed = 0
    for _ in range(600):  # ten requests per second for a minute
        allowed += sum(run(limiter, "k", quota, 1))
        clock.now += 0.1
    # 10 (burst) + ~60 (one per second) over the minute.
    assert 69 <= allowed <= 71


def test_full_bucket_after_idle_and_no_credit_beyond_burst() -> None:
    clock = ManualClock(1000.0)
    limiter = MemoryLimiter(clock=clock)
    quota = Quota(60, 3)
    assert run(limiter, "k", quota, 3) == [True] * 3
    clock.now += 3600
    assert run(limiter, "k", quota, 4) == [True, True, True, False]


def test_keys_are_independent() -> None:
    clock = ManualClock(1000.0)
    limiter = MemoryLimiter(clock=clock)
    quota = Quota(60, 2)
    assert run(limiter, "a", quota, 3) == [True, True, False]
    assert run(limiter, "b", quota, 2) == [True, True]


def test_unlimited_and_zero() -> None:
    limiter = MemoryLimiter(clock=ManualClock(1000.0))
    assert run(limiter, "k", Quota(-1, 1), 1000) == [True] * 1000
    assert run(limiter, "k", Quota(0, 1), 3) == [False] * 3
    assert len(limiter) == 0


def test_remaining_reset_and_retry_after() -> None:
    clock = ManualClock(1000.0)
    limiter = MemoryLimiter(clock=clock)
    quota = Quota(60, 3)
    first = limiter.check_now("k", quota)
    assert (first.allowed, first.remaining, first.reset_s) == (True, 2, pytest.approx(1.0))
    limiter.check_now("k", quota)
    third = limiter.check_now("k", quota)
    assert (third.remaining, third.reset_s) == (0, pytest.approx(3.0))
    denied = limiter.check_now("k", quota)
    assert not denied.allowed
    assert denied.remaining == 0
    assert denied.retry_after_s == pytest.approx(1.0)
    clock.now += 0.25
    assert limiter.check_now("k", quota).retry_after_s == pytest.approx(0.75)


def test_changed_quota_applies_to_the_same_bucket() -> None:
    clock = ManualClock(1000.0)
    limiter = MemoryLimiter(clock=clock)
    assert run(limiter, "k", Quota(60, 2), 3) == [True, True, False]
    clock.now += 0.1
    # Still over the old quota (one per second), but the key moved to a bigger tier
    # (ten per second): its next request is judged by the new quota.
    assert run(limiter, "k", Quota(60, 2), 1) == [False]
    assert run(limiter, "k", Quota(600, 20), 1) == [True]


def test_sweep_drops_expired_buckets_only() -> None:
    clock = ManualClock(1000.0)
    limiter = MemoryLimiter(clock=clock, sweep_every=1_000_000, max_keys=3)
    quota = Quota(60, 1)
    for key in ("a", "b", "c"):
        limiter.check_now(key, quota)
    clock.now += 10  # a, b, c expired
    limiter.check_now("d", quota)
    limiter.check_now("e", quota)  # over max_keys -> sweep
    assert len(limiter) == 2


def test_concurrent_checks_are_exact() -> None:
    limiter = MemoryLimiter(clock=ManualClock(1000.0))
    quota = Quota(50, 50)

    async def main() -> list[RateLimitResult]:
        return await asyncio.gather(*(limiter.check("k", quota) for _ in range(200)))

    results = asyncio.run(main())
    assert sum(r.allowed for r in results) == 50


S = 1_000_000_000


@pytest.mark.parametrize(
    ("tat", "now", "expected"),
    [
        (0, 100 * S, (True, 101 * S, 1 * S, 0)),
        (104 * S, 100 * S, (True, 105 * S, 5 * S, 0)),
        (105 * S, 100 * S, (False, 105 * S, 5 * S, 1 * S)),
    ],
    ids=["fresh", "last-in-burst", "over"],
)
def test_gcra_step(tat: int, now: int, expected: tuple[bool, int, int, int]) -> None:
    assert gcra(tat, now, Quota(60, 5)) == expected


@pytest.mark.parametrize("rpm", [7, 50, 600, 999, 1000, 60000], ids=str)
def test_a_full_burst_is_exact_for_any_rate(rpm: int) -> None:
    limiter = MemoryLimiter(clock=ManualClock(1000.0))
    quota = Quota(rpm, rpm)
    assert sum(run(limiter, "k", quota, rpm + 5)) == rpm


def test_headers_allowed_and_denied() -> None:
    clock = ManualClock(1000.0)
    limiter = MemoryLimiter(clock=clock)
    quota = Quota(60, 2)
    ok = dict(limiter.check_now("k", quota).headers())
    assert ok == {
        "ratelimit-limit": "60",
        "ratelimit-remaining": "1",
        "ratelimit-reset": "1",
        "ratelimit-policy": "60;w=60;burst=2",
    }
    limiter.check_now("k", quota)
    denied = dict(limiter.check_now("k", quota).headers())
    assert denied["retry-after"] == "1"
    assert denied["ratelimit-remaining"] == "0"
    assert int(denied["ratelimit-reset"]) == math.ceil(2.0)
    assert limiter.check_now("u", Quota(-1, 1)).headers() == ()
