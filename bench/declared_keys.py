"""Decision cache hit rate and CPU per request on API-like traffic: exact-input keys
against the shipped policies' declared keys.

Not a test (numbers, no assertions); the numbers go to ``docs/performance.md``::

    python -m bench.declared_keys [--requests 6000] [--keys 200]

The same in-process authz as :mod:`bench.miss_cost` (shipped settings, real OPA over a
unix socket, the shipped bundle with bench keys), fed one request stream twice: once
with the bundle's declarations in use (``data.authz.meta.cache_keys``, read as the
bundle watcher reads them) and once with none (every path keyed on the exact input, as
before declared keys). The stream: API keys with Zipf popularity over ``--keys`` keys,
``GET`` on ``/api/v1/items/<id>`` with Zipf-popular ids among 50, one of 4 query strings
and one of 5 user agents, and a unique ``x-request-id`` and ``traceparent`` per request
(left out of both keys), ``x-client-request-id`` unique too (a client's own id: in the
exact key unless a deployment lists it in ``AUTHZ_DECISION_CACHE_IGNORE_HEADERS``).
Printed: hit rate, authz and OPA CPU per request (µs), for each keying.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from authz.runtime.config import load
from authz.runtime.server import build_runtime
from authz.tools.launch import find_binary, free_port
from bench.miss_cost import build_bundle, running_opa
from bench.procstat import read_cpu_seconds
from bench.workload import bench_key, zipf_weights
from tests.helpers.fakes import check_request

AGENTS = ("curl/8.5.0", "python-requests/2.32", "Mozilla/5.0 (X11)", "okhttp/4.12", "Go-http")
QUERIES = ("", "?page=2", "?limit=50&sort=name", "?fields=id,name")


def stream(requests: int, keys: int, seed: int = 19) -> list[Any]:
    """The CheckRequests, deterministic for ``seed``."""
    rng = random.Random(seed)  # noqa: S311 (a workload, not a secret)
    key_weights, id_weights = zipf_weights(keys), zipf_weights(50)
    out = []
    for n in range(requests):
        key = rng.choices(range(keys), key_weights)[0]
        item = rng.choices(range(50), id_weights)[0]
        headers = {
            "x-api-key": bench_key(key),
            "user-agent": rng.choice(AGENTS),
            "x-request-id": f"req-{n}",
            "traceparent": f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01",
            "x-client-request-id": f"client-{n}",
        }
        out.append(
            check_request(path=f"/api/v1/items/{item}{rng.choice(QUERIES)}", headers=headers)
        )
    return out


async def measure(url: str, opa_pid: int, base: Path, requests: list[Any], declared: bool) -> str:
    environ = {
        "AUTHZ_OPA_URL": url,
        "AUTHZ_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_AUDIT_DB": str(base / f"audit-{declared}-{time.monotonic_ns()}.db"),
    }
    stdout = sys.stdout
    async with contextlib.AsyncExitStack() as stack:
        with (base / "decisions.log").open("a", encoding="utf-8") as log_file:
            sys.stdout = log_file
            try:
                runtime = await build_runtime(load(environ), stack)
                authorizer = runtime.live.authorizer
                assert authorizer is not None
                await runtime.watcher.poll_once()
                await asyncio.sleep(0.3)  # the background watcher's first poll, too
                cache = authorizer._cache  # the decision cache the server built
                assert cache is not None
                if not declared:  # as before declared keys: none, whatever the watcher reads
                    cache.declare(runtime.watcher.revision or "", {})
                    cache.declare = lambda revision, declarations: None  # type: ignore[method-assign]
                own, opa = time.process_time(), read_cpu_seconds(opa_pid)
                for request in requests:
                    await authorizer.check(request)
                await asyncio.sleep(0.4)  # the audit writer's last batch
                own, opa = time.process_time() - own, read_cpu_seconds(opa_pid) - opa
                hits = cache.hits / max(1, cache.hits + cache.misses)
                assert bool(cache.declarations) == declared
            finally:
                sys.stdout = stdout
    per = 1e6 / len(requests)
    label = "declared keys" if declared else "exact input"
    return f"| {label} | {hits:.1%} | {own * per:.0f} | {opa * per:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    requests = stream(args.requests, args.keys)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        bundle = build_bundle(base, args.keys)
        print("| cache key | hit rate | authz CPU µs/request | OPA CPU µs/request |")
        print("|---|---|---|---|")
        for _ in range(args.rounds):
            for declared in (False, True):
                opa_bin = find_binary("opa", "AUTHZ_OPA_BIN")
                with (
                    running_opa(opa_bin, "unix", bundle, base) as (url, pid),
                    asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
                ):
                    print(runner.run(measure(url, pid, base, requests, declared)), flush=True)


if __name__ == "__main__":
    main()
