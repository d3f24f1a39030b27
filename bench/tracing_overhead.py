"""What the tracing hooks cost per Check, off (no tracer: the default) and on.

Not a test (numbers, no assertions); the numbers go to ``docs/performance.md``::

    python -m bench.tracing_overhead off|on [--checks 2000] [--rounds 7]

Runs :meth:`authz.core.authorizer.Authorizer.check` in process with a fake OPA (no I/O),
the decision cache (missing on every request, so each Check runs every hook: the cache
lookup, the OPA query, the rate limiter) and the in-memory rate limiter, on ``--checks``
distinct requests carrying a sampled ``traceparent``; prints the median and the minimum
over ``--rounds`` rounds of the mean wall time per Check, in microseconds. ``on`` uses
an SDK tracer provider sampling every span and exporting nowhere (the span cost alone).
Run ``off`` on a checkout before the tracing hooks (PYTHONPATH) to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from authz.core.authorizer import Authorizer
from authz.core.cache import DecisionCache
from authz.core.ratelimit import MemoryLimiter
from tests.helpers.fakes import FakeEngine, check_request

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ANSWER = {
    "allowed": True,
    "authz": {
        "reason": "allowed",
        "identity": {"key_id": "k1"},
        "rate_limit": {"tier": "t", "key": "key:k1", "requests_per_minute": 10**9},
    },
}


async def measure(mode: str, checks: int, rounds: int) -> tuple[float, float]:
    """(median, min) microseconds per Check over ``rounds`` rounds of ``checks``."""
    options: dict[str, Any] = {}
    if mode == "on":
        from opentelemetry.sdk.trace import TracerProvider

        options["tracer"] = TracerProvider().get_tracer("bench")
    authorizer = Authorizer(
        FakeEngine(ANSWER, record=False),
        default_decision_path="authz/gateway/decision",
        credential_headers=("x-api-key",),
        timeout_s=1.0,
        cache=DecisionCache(ttl_s=1e-7),  # every lookup misses: OPA is asked each time
        limiter=MemoryLimiter(),
        **options,
    )
    headers = {"x-api-key": "k", "traceparent": TRACEPARENT}
    requests = [check_request(path=f"/api/{i}", headers=headers) for i in range(checks)]
    for request in requests:  # warm up
        await authorizer.check(request)
    per_check: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        for request in requests:
            await authorizer.check(request)
        per_check.append((time.perf_counter() - started) / checks * 1e6)
    return statistics.median(per_check), min(per_check)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("off", "on"))
    parser.add_argument("--checks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    median, fastest = asyncio.run(measure(args.mode, args.checks, args.rounds))
    print(f"tracing {args.mode}: median {median:.1f} us/check, min {fastest:.1f}")


if __name__ == "__main__":
    main()
