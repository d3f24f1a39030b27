"""CPU per decision on a decision-cache hit, authz's core in process, whole and per step.

Not a test (numbers, no assertions); the numbers go to ``docs/performance.md`` ("Cost of
a hit")::

    python -m bench.hit_cost [--number 20000]

Builds an :class:`authz.core.authorizer.Authorizer` over a fake engine answering the
shipped gateway policy's allow (rate limited: a ``MemoryLimiter``), a decision cache with
the gateway's declared key, and no decision sinks (the decision log, metrics and audit
trail are ``authz.runtime``'s, measured apart), then times, on a typical gateway
CheckRequest (``GET /api/v1/items/1``, an API key, a user agent, a request id):

- a whole ``Authorizer.check`` that hits the cache;
- each core step of it alone: ``build_input``, ``DecisionCache.key``, ``build_response``,
  the rate-limit headers added to the cached decision;
- one step against the code it replaced, in the same run:
  :meth:`~authz.core.decision.Decision.with_response_headers` against
  ``dataclasses.replace``.

Each figure is the median of 3 runs of ``--number`` calls, CPU time
(``time.process_time``) per call in microseconds, so other processes' load counts less.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any, Final

import orjson

from authz.core.authorizer import Authorizer
from authz.core.cache import DecisionCache, KeyDeclaration
from authz.core.decision import parse_decision
from authz.core.headers import CREDENTIAL_HEADERS
from authz.core.input import build_input
from authz.core.ratelimit import MemoryLimiter
from authz.core.response import build_response
from tests.helpers.fakes import FakeEngine, check_request

PATH: Final = "authz/gateway/decision"
REVISION: Final = "rev-test"  # FakeEngine's
# The shipped gateway policy's allow (policy/gateway/gateway.rego, ``allow``) and
# declaration (``cache_key``).
ALLOW: Final = {
    "allowed": True,
    "authz": {
        "reason": "allowed",
        "source": "policy_rule",
        "rate_limit": {"tier": "standard", "key": "key:k1", "requests_per_minute": 10**9},
        "identity": {"key_id": "k1", "role": "reader", "tier": "standard"},
    },
    "headers": {"x-authz-key-id": "k1", "x-authz-role": "reader", "x-authz-tier": "standard"},
    "request_headers_to_remove": ["authorization", "x-api-key"],
    "dynamic_metadata": {"key_id": "k1", "role": "reader", "tier": "standard"},
}
DECLARATION: Final = KeyDeclaration(
    fields=(
        ("credentials",),
        ("preview",),
        ("parsed_path",),
        ("attributes", "request", "http", "method"),
        ("attributes", "request", "http", "headers", "authorization"),
    ),
    header_prefixes=("x-authz-",),
)
RATE_LIMIT_HEADERS: Final = (
    ("x-ratelimit-limit", "1000000000"),
    ("x-ratelimit-remaining", "999999999"),
    ("x-ratelimit-reset", "0"),
)


def _us(call: Callable[[], Any], number: int) -> float:
    """Median over 3 runs of CPU microseconds per ``call()``."""
    timer = timeit.Timer(call, timer=time.process_time)
    return statistics.median(timer.timeit(number) / number * 1e6 for _ in range(3))


def measure(number: int) -> list[tuple[str, float, float | None]]:
    """``(step, µs per call, µs of the code it replaced or None)`` per row."""
    request = check_request(
        path="/api/v1/items/1",
        headers={"x-api-key": "ak_" + "x" * 40, "user-agent": "curl/8", "x-request-id": "r1"},
    )
    cache = DecisionCache(ttl_s=3600, confirm_s=3600)
    cache.observe_revision(REVISION)
    cache.declare(REVISION, {PATH: DECLARATION})
    authorizer = Authorizer(
        FakeEngine(lambda path, document: orjson.loads(orjson.dumps(ALLOW)), record=False),
        default_decision_path=PATH,
        credential_headers=CREDENTIAL_HEADERS,
        timeout_s=5.0,
        cache=cache,
        limiter=MemoryLimiter(),
    )
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(authorizer.check(request))  # the miss that fills the cache
        hit = _us(lambda: loop.run_until_complete(authorizer.check(request)), number)
    finally:
        loop.close()
    if cache.hits < number:
        raise RuntimeError(f"expected cache hits, got {cache.hits} of {3 * number}")
    document = build_input(request, CREDENTIAL_HEADERS)
    allow = parse_decision(ALLOW)
    limited = allow.with_response_headers(RATE_LIMIT_HEADERS)
    decision_id = "3f2b1c1e-8a3b-4b0e-9a55-0d3c2c1b2a10"
    return [
        ("Authorizer.check, cache hit (no sinks)", hit, None),
        ("build_input", _us(lambda: build_input(request, CREDENTIAL_HEADERS), number), None),
        ("DecisionCache.key (declared)", _us(lambda: cache.key(PATH, document), number), None),
        (
            "build_response (rate-limited allow)",
            _us(lambda: build_response(limited, decision_id), number),
            None,
        ),
        (
            "rate-limit headers (with_response_headers vs replace)",
            _us(lambda: allow.with_response_headers(RATE_LIMIT_HEADERS), number),
            _us(
                lambda: dataclasses.replace(allow, response_headers_to_add=RATE_LIMIT_HEADERS),
                number,
            ),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000, help="calls per run")
    args = parser.parse_args(argv)
    print(f"{'step':58} {'µs':>8} {'before':>8} {'ratio':>6}")
    for step, now, before in measure(args.number):
        if before is None:
            print(f"{step:58} {now:8.2f}")
        else:
            print(f"{step:58} {now:8.2f} {before:8.2f} {now / before:6.2f}")


if __name__ == "__main__":
    main()
