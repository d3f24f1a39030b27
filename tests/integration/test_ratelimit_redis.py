"""RedisLimiter against a real redis-server: atomic, shared, and failure modes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from authz.core.errors import RateLimitUnavailable
from authz.core.ratelimit import MemoryLimiter, Quota, RedisLimiter
from tests.helpers.redis_server import RedisServer


def connect(url: str) -> redis.asyncio.Redis:
    """A client configured like authz's (a blocking pool of 16 connections)."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=16, timeout=2.0, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    return redis.asyncio.Redis.from_pool(pool)


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    yield (conn := connect(redis_server.url))
    await conn.aclose()


async def test_burst_is_exact_under_concurrency(client: redis.asyncio.Redis) -> None:
    limiter = RedisLimiter(client, timeout_s=2.0)
    quota = Quota(40, 40)
    results = await asyncio.gather(*(limiter.check("k1", quota) for _ in range(150)))
    assert sum(r.allowed for r in results) == 40
    assert {r.backend for r in results} == {"redis"}
    denied = [r for r in results if not r.allowed]
    assert all(r.retry_after_s > 0 for r in denied)


async def test_two_replicas_share_one_limit(redis_server: RedisServer) -> None:
    conns = [connect(redis_server.url) for _ in range(2)]
    try:
        replicas = [RedisLimiter(c, timeout_s=2.0) for c in conns]
        quota = Quota(30, 30)
        calls = [replicas[i % 2].check("shared", quota) for i in range(100)]
        results = await asyncio.gather(*calls)
        assert sum(r.allowed for r in results) == 30
    finally:
        for c in conns:
            await c.aclose()


async def test_remaining_counts_down(client: redis.asyncio.Redis) -> None:
    limiter = RedisLimiter(client, timeout_s=2.0)
    quota = Quota(60, 3)
    remaining = [(await limiter.check("k2", quota)).remaining for _ in range(3)]
    assert remaining == [2, 1, 0]
    assert not (await limiter.check("k2", quota)).allowed


async def test_keys_expire_in_redis(client: redis.asyncio.Redis) -> None:
    limiter = RedisLimiter(client, timeout_s=2.0)
    await limiter.check("k3", Quota(60000, 1))
    ttl = await client.pttl("authz:rl:k3")
    assert 0 < ttl <= 5


async def test_fallback_when_redis_stops_and_recovery(
    redis_server: RedisServer, client: redis.asyncio.Redis
) -> None:
    fallback = MemoryLimiter()
    limiter = RedisLimiter(
        client, timeout_s=0.2, retry_interval_s=0.2, fallback=fallback, on_failure="fallback"
    )
    quota = Quota(60, 5)
    assert (await limiter.check("k4", quota)).backend == "redis"
    redis_server.stop()
    results = [await limiter.check("k4", quota) for _ in range(7)]
    assert {r.backend for r in results} == {"fallback"}
    assert [r.allowed for r in results] == [True] * 5 + [False] * 2
    assert limiter.available is False
    assert limiter.failures >= 1
    redis_server.start()
    await asyncio.sleep(0.3)
    deadline = asyncio.get_running_loop().time() + 5
    while (await limiter.check("k5", quota)).backend != "redis":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)
    assert limiter.available is True


async def test_strict_mode_denies_when_redis_is_down(
    redis_server: RedisServer, client: redis.asyncio.Redis
) -> None:
    limiter = RedisLimiter(client, timeout_s=0.2, retry_interval_s=0.2, on_failure="deny")
    redis_server.stop()
    with pytest.raises(RateLimitUnavailable):
        await limiter.check("k6", Quota(60, 5))
    # While Redis is skipped, the deny is immediate (no waiting on a dead socket).
    with pytest.raises(RateLimitUnavailable):
        await asyncio.wait_for(limiter.check("k6", Quota(60, 5)), 0.05)
