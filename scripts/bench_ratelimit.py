"""Rate limiter cost per decision: no limit vs in-process vs Redis, in one run.

Runs the real decision pipeline (``Authorizer.check``: input building, decision parsing,
rate limiting, response building) with OPA replaced by an instant in-process answer, so
the limiter's share is visible. Prints microseconds per decision and the ratio of each
limiter to the no-limit path, sequentially and with 64 checks in flight.

Usage: scripts/bench-ratelimit [--decisions N] [--keys K]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis.asyncio
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from authz.core.authorizer import Authorizer
from authz.core.opa import Evaluation
from authz.core.ratelimit import Limiter, MemoryLimiter, RedisLimiter
from authz.tools import launch as launcher


class InstantEngine:
    """An OPA stand-in answering at once (so only authz's own work is timed)."""

    def __init__(self, keys: int) -> None:
        self._answers = [
            {
                "allowed": True,
                "reason": "allowed",
                "headers": {"x-authz-key-id": f"key-{i}"},
                "rate_limit": {"tier": "bench", "key": f"key:{i}", "requests_per_minute": 10**9},
                "identity": {"key_id": f"key-{i}"},
            }
            for i in range(keys)
        ]
        self._next = 0

    async def evaluate(
        self, path: str, document: Mapping[str, Any], timeout_s: float
    ) -> Evaluation:
        self._next = (self._next + 1) % len(self._answers)
        return Evaluation(self._answers[self._next], {"authz": "bench"})

    async def close(self) -> None:
        return None


def request() -> external_auth_pb2.CheckRequest:
    headers = {
        ":method": "GET",
        ":path": "/api/v1/items/1",
        "x-api-key": "ak_bench_key",
        "user-agent": "bench",
        "accept": "*/*",
    }
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=attribute_context_pb2.AttributeContext.Peer(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address="10.0.0.1", port_value=5)
                )
            ),
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    method="GET", path="/api/v1/items/1", host="gw", headers=headers
                )
            ),
            context_extensions={"decision_path": "authz/gateway/decision"},
        )
    )


async def measure(limiter: Limiter | None, keys: int, n: int, concurrency: int) -> float:
    """Microseconds per decision."""
    authorizer = Authorizer(
        InstantEngine(keys),
        default_decision_path="authz/gateway/decision",
        credential_headers=("x-api-key", "authorization"),
        timeout_s=5.0,
        limiter=limiter,
    )
    req = request()
    for _ in range(min(n // 10, 2000)):  # warm up
        await authorizer.check(req)
    started = time.perf_counter()
    if concurrency == 1:
        for _ in range(n):
            await authorizer.check(req)
    else:
        for _ in range(n // concurrency):
            await asyncio.gather(*(authorizer.check(req) for _ in range(concurrency)))
    return (time.perf_counter() - started) / n * 1e6


async def run_all(port: int, keys: int, n: int) -> list[tuple[int, float, float, float]]:
    """(in flight, no-limit us, memory us, redis us) for 1 and 64 checks in flight."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        f"redis://127.0.0.1:{port}/0", max_connections=64, timeout=1.0
    )
    client = redis.asyncio.Redis.from_pool(pool)
    rows = []
    for concurrency in (1, 64):
        base = await measure(None, keys, n, concurrency)
        memory = await measure(MemoryLimiter(), keys, n, concurrency)
        shared = await measure(RedisLimiter(client), keys, n, concurrency)
        rows.append((concurrency, base, memory, shared))
    await client.aclose()
    return rows


def main() -> int:
    """Start a throwaway redis-server, measure, print the table and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--keys", type=int, default=1000)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server not found (scripts/install-deps installs it)", file=sys.stderr)
        return 2
    port = launcher.free_port()
    with tempfile.TemporaryDirectory() as workdir:
        launch = launcher.redis_launch(binary, port, Path(workdir))
        with launcher.started(launch, Path(workdir) / "redis.log", timeout_s=10):
            rows = asyncio.run(run_all(port, args.keys, args.decisions))
    print(f"decisions per run: {args.decisions}, distinct keys: {args.keys}, OPA: instant stub")
    print(
        f"{'in flight':>9} | {'no limit us':>11} | {'memory us':>9} | {'redis us':>9} | "
        f"{'memory/none':>11} | {'redis/none':>10}"
    )
    for concurrency, base, memory, shared in rows:
        print(
            f"{concurrency:>9} | {base:>11.1f} | {memory:>9.1f} | {shared:>9.1f} | "
            f"{memory / base:>11.2f} | {shared / base:>10.2f}"
        )
    print(
        f"ratios (64 in flight): memory/none {rows[1][2] / rows[1][1]:.2f}, "
        f"redis/none {rows[1][3] / rows[1][1]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
