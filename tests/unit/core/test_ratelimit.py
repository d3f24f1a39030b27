"""GCRA limiter with an injected clock: burst, refill, boundaries, unlimited, headers."""

from __future__ import annotations

import asyncio
import math
import re
from decimal import Decimal
from fractions import Fraction

import pytest

from authz.core import ratelimit as ratelimit_module
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


# --- Precomputed quotas (issue 19): the code before them, verbatim, as the reference. ---


def _reference_quota_of(rpm: object, burst: object, burst_s: object) -> tuple[object, object]:
    if burst is None:
        burst = math.ceil(rpm * burst_s / 60.0)  # type: ignore[operator]
        burst = max(1, min(burst, max(rpm, 1)))  # type: ignore[call-overload]
    return rpm, burst


def _reference_interval(rpm: object) -> int:
    return max(1, round(60.0 * 1e9 / rpm))  # type: ignore[operator]


def _reference_check(
    tats: dict[str, int], key: str, rpm: object, burst: object, now_s: float
) -> tuple[bool, object, float, float, tuple[tuple[str, str], ...]]:
    """MemoryLimiter.check_now, gcra, _result and headers() as they were: (allowed,
    remaining, reset_s, retry_after_s, headers)."""
    if rpm == -1:
        return True, 0, 0.0, 0.0, ()
    if rpm == 0:
        allowed, remaining, reset_s, retry_s = False, 0, 60.0, 60.0
    else:
        now = int(now_s * 1e9)
        interval = _reference_interval(rpm)
        tat = max(tats.get(key, 0), now)
        new_tat = tat + interval
        allow_at = new_tat - burst * interval  # type: ignore[operator]
        if now < allow_at:
            allowed, ahead, retry = False, tat - now, allow_at - now
        else:
            allowed, ahead, retry = True, new_tat - now, 0
            tats[key] = new_tat
        remaining = max(0, (burst * interval - ahead) // interval)  # type: ignore[operator]
        reset_s, retry_s = max(ahead, 0) / 1e9, retry / 1e9
    out = [
        ("ratelimit-limit", str(rpm)),
        ("ratelimit-remaining", str(remaining)),
        ("ratelimit-reset", str(math.ceil(reset_s))),
        ("ratelimit-policy", f"{rpm};w=60;burst={burst}"),
    ]
    if not allowed:
        out.append(("retry-after", str(max(1, math.ceil(retry_s)))))
    return allowed, remaining, reset_s, retry_s, tuple(out)


# (requests_per_minute, burst, burst_s): the shipped tiers' sizes, a rate whose interval
# is not a whole number of nanoseconds, 1, unlimited, zero, a burst of 1 and one larger
# than the rate, and a rate past float precision (its interval rounds to 1 ns).
_QUOTAS: list[tuple[int, int | None, float]] = [
    (60, None, 10.0),
    (600, None, 10.0),
    (1000, 50, 10.0),
    (7, None, 10.0),
    (7, 3, 0.05),
    (1, None, 10.0),
    (61, 1, 10.0),
    (60, 1000, 10.0),
    (-1, None, 10.0),
    (0, None, 10.0),
    (10**9, None, 1.0),
    (10**12, 5, 1.0),
]


def _clocks(rpm: int, burst: int) -> list[float]:
    """Check times (seconds): a burst at one instant (the bucket empties, unless it holds
    more than 1000), then steps of exactly one interval, one just under and one just
    over, then an idle refill."""
    interval = 60.0 / rpm if rpm > 0 else 1.0
    times = [1000.0] * min(burst + 2, 1002)
    now = 1000.0
    for step in (interval, interval * 0.999, interval * 1.001, interval, 0.0, 120.0):
        now += step
        times.append(now)
    return times


@pytest.mark.parametrize(("rpm", "burst", "burst_s"), _QUOTAS, ids=[str(q) for q in _QUOTAS])
def test_precomputed_quota_checks_equal_the_uncached_computation(
    rpm: int, burst: int | None, burst_s: float
) -> None:
    clock = ManualClock()
    limiter = MemoryLimiter(clock=clock)
    tats: dict[str, int] = {}
    ref_rpm, ref_burst = _reference_quota_of(rpm, burst, burst_s)
    seen = set()
    for now in _clocks(rpm, ref_burst):  # type: ignore[arg-type]
        clock.now = now
        quota = Quota.of(rpm, burst, burst_s)  # the shared quota from the second call
        assert (quota.requests_per_minute, quota.burst) == (ref_rpm, ref_burst)
        result = limiter.check_now("k", quota)
        allowed, remaining, reset_s, retry_s, headers = _reference_check(
            tats, "k", ref_rpm, ref_burst, now
        )
        assert (result.allowed, result.remaining, result.reset_s, result.retry_after_s) == (
            allowed,
            remaining,
            reset_s,
            retry_s,
        )
        assert [type(v) for v in (result.remaining, result.reset_s, result.retry_after_s)] == [
            type(v) for v in (remaining, reset_s, retry_s)
        ]
        assert result.headers() == (() if rpm == -1 else headers)
        if rpm > 0:
            assert quota.interval_ns == _reference_interval(rpm)
        seen.add(allowed)
    if rpm > 0 and ref_burst <= 1000:  # type: ignore[operator]
        assert seen == {True, False}  # the bucket emptied


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((60, None, 10.0), (60.0, None, 10.0)),
        ((60, None, 10.0), (True, None, 10.0)),
        ((60, 5, 10.0), (60, 5.0, 10.0)),
        ((60, 1, 10.0), (60, True, 10.0)),
        ((60, None, 10.0), (60, None, Fraction(10))),
        ((60, None, 10.0), (60, None, Decimal(10))),
    ],
    ids=[
        "float-rpm",
        "bool-rpm",
        "float-burst",
        "bool-burst",
        "fraction-burst-s",
        "decimal-burst-s",
    ],
)
def test_shared_quotas_are_only_shared_between_equal_types(
    first: tuple[object, object, object], second: tuple[object, object, object]
) -> None:
    """60 and 60.0 (and True and 1) are equal keys but name different quotas: the
    second is built as the uncached Quota.of would (or raises as it did), whichever came
    first."""
    Quota.of(*first)  # type: ignore[arg-type]
    try:
        _reference_quota_of(*second)
    except TypeError as exc:  # Decimal / float
        with pytest.raises(TypeError, match=re.escape(str(exc))):
            Quota.of(*second)  # type: ignore[arg-type]
        return
    quota = Quota.of(*second)  # type: ignore[arg-type]
    ref_rpm, ref_burst = _reference_quota_of(*second)
    assert (type(quota.requests_per_minute), type(quota.burst)) == (type(ref_rpm), type(ref_burst))
    assert (quota.requests_per_minute, quota.burst) == (ref_rpm, ref_burst)
    limiter = MemoryLimiter(clock=ManualClock(1000.0))
    assert (
        limiter.check_now("k", quota).headers()
        == _reference_check({}, "k", ref_rpm, ref_burst, 1000.0)[4]
    )


def test_shared_quotas_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit_module, "_QUOTAS", {})
    for rpm in range(1, ratelimit_module._QUOTAS_MAX + 50):
        assert Quota.of(rpm, None, 10.0).requests_per_minute == rpm
    assert len(ratelimit_module._QUOTAS) == ratelimit_module._QUOTAS_MAX
    assert Quota.of(1, None, 10.0) is Quota.of(1, None, 10.0)


@pytest.mark.parametrize(
    "quota",
    [Quota("60", 1), Quota(10**12, "x"), Quota(60.0, 2), Quota(-1.0, 1)],  # type: ignore[arg-type]
    ids=["str-rpm", "str-burst", "float-rpm", "float-unlimited"],
)
def test_odd_quotas_construct_and_check_as_before(quota: Quota) -> None:
    """A quota of other types than ints is built as before (nothing computed that could
    raise) and checked by the separate steps: same result, same error."""
    limiter = MemoryLimiter(clock=ManualClock(1000.0))
    try:
        expected: object = _reference_check({}, "k", quota.requests_per_minute, quota.burst, 1000.0)
    except TypeError as exc:
        with pytest.raises(TypeError, match=re.escape(str(exc))):
            limiter.check_now("k", quota)
        return
    result = limiter.check_now("k", quota)
    got = (result.allowed, result.remaining, result.reset_s, result.retry_after_s)
    assert (*got, result.headers()) == expected
