"""Cache misses with and without coalescing: CPU per decision of authz's pipeline and of
OPA, and decisions per second, at a fixed number of concurrent decisions.

Not a test (numbers, no assertions); the numbers go to ``docs/performance.md``::

    python -m bench.coalesce [--decisions 4000] [--keys 10000] [--rounds 3]

Starts a real OPA (``AUTHZ_OPA_BIN`` or ``opa`` on PATH) on a free 127.0.0.1 port with the
shipped policy tree (``policy/``, its batch rule included) and ``--keys`` API keys of
its own, then decides ``--decisions`` CheckRequests per case through the real
:class:`~authz.core.authorizer.Authorizer` (no decision cache: every decision is a miss,
each request a key and path of its own, a third of them with an unknown key), over
:class:`~authz.core.opa.OpaClient` alone (``off``, today's path) or behind
:class:`~authz.core.batch.Coalescer` (``on``), with 1, 8 and 32 decisions in flight at
once, and with the coalescer letting 1 or 2 queries be in flight before decisions queue
(``max_in_flight``). Rounds interleave the cases so a change of load on the machine hits
them all alike.

First, the OPA query alone: 512 of those inputs as one query each, then as batch queries
of 8, 32 and 64 (:meth:`~authz.core.opa.OpaClient.query_batch`), once per round.
CPU is ``utime + stime`` of this process (authz) and of OPA (``/proc/<pid>/stat``);
per decision in microseconds; "share batched" is the share of decisions answered by a
batch query. The last lines are the ratios to ``off`` (median of the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2

from authz.core.authorizer import Authorizer
from authz.core.batch import Coalescer
from authz.core.headers import CREDENTIAL_HEADERS
from authz.core.input import build_input
from authz.core.opa import OpaClient, PolicyEngine
from authz.tools.keys import digest
from authz.tools.launch import find_binary, free_port, opa_launch, started
from bench.procstat import read_cpu_seconds
from tests.helpers.fakes import check_request

ROOT = Path(__file__).resolve().parents[1]
PATH = "authz/gateway/decision"
CONCURRENCY = (1, 8, 32)
# 0: no coalescer (today's path); n: the coalescer with max_in_flight n.
VARIANTS = (0, 1, 2)


def _requests(count: int, keys: int) -> list[external_auth_pb2.CheckRequest]:
    """Every request new: its own path, a key of its own (one in three unknown)."""
    out = []
    for i in range(count):
        key = f"ak_bench_{i % keys}" if i % 3 else f"ak_unknown_{i}"
        out.append(
            check_request(
                method="GET", path=f"/api/v1/items/{i}?page={i % 7}", headers={"x-api-key": key}
            )
        )
    return out


async def _case(
    url: str, opa_pid: int, in_flight: int, concurrency: int, requests: Sequence[Any]
) -> dict[str, float]:
    """``in_flight`` 0: no coalescer; else the coalescer's ``max_in_flight``."""
    client = OpaClient(url)
    sizes: list[int] = []
    engine: PolicyEngine = (
        Coalescer(client, max_in_flight=in_flight, on_batch=lambda o, n: sizes.append(n))
        if in_flight
        else client
    )
    authorizer = Authorizer(
        engine, default_decision_path=PATH, credential_headers=CREDENTIAL_HEADERS, timeout_s=5.0
    )
    queue = list(reversed(requests))

    async def worker() -> None:
        while queue:
            outcome = await authorizer.check(queue.pop())
            assert outcome.record.error is None, outcome.record.error

    try:
        for request in requests[:100]:  # warm up the pool
            await authorizer.check(request)
        own, opa = time.process_time(), read_cpu_seconds(opa_pid)
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
        own, opa = time.process_time() - own, read_cpu_seconds(opa_pid) - opa
    finally:
        await engine.close()
    n = len(requests)
    batched = sum(sizes)
    return {
        "authz_us": own / n * 1e6,
        "opa_us": opa / n * 1e6,
        "rps": n / wall,
        "batched": batched / (n + 100),
        "mean_batch": batched / len(sizes) if sizes else 0.0,
    }


async def _opa_side(url: str, opa_pid: int, requests: Sequence[Any]) -> list[str]:
    """The OPA query alone (no Authorizer): CPU per decision of OPA and of the client
    for 512 inputs sent one query each, then in batch queries of 8, 32 and 64."""
    client = OpaClient(url)
    documents = [build_input(r, CREDENTIAL_HEADERS) for r in requests[:512]]
    rows = []
    try:
        for document in documents[:50]:  # warm up the pool
            await client.evaluate(PATH, document, 5.0)
        for size in (1, 8, 32, 64):
            own, opa = time.process_time(), read_cpu_seconds(opa_pid)
            for start in range(0, len(documents), size):
                chunk = documents[start : start + size]
                if size == 1:
                    await client.evaluate(PATH, chunk[0], 5.0)
                else:
                    await client.query_batch(PATH, chunk, 5.0)
            own, opa = time.process_time() - own, read_cpu_seconds(opa_pid) - opa
            per = 1e6 / len(documents)
            name = "one query each" if size == 1 else f"batches of {size}"
            rows.append(f"| {name} | {opa * per:.0f} | {own * per:.0f} |")
    finally:
        await client.close()
    return rows


def _median(rows: list[dict[str, float]], key: str) -> float:
    if key == "cpu":
        return statistics.median(r["authz_us"] + r["opa_us"] for r in rows)
    return statistics.median(r[key] for r in rows)


def main() -> None:
    """Run the rounds and print a Markdown table, then the ratios to ``off``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=4000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    opa_bin = find_binary("opa", "AUTHZ_OPA_BIN")
    requests = _requests(args.decisions, args.keys)
    results: dict[tuple[int, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys = {
            digest(f"ak_bench_{i}"): {
                "id": f"key-{i}",
                "enabled": True,
                "role": "viewer",
                "rate_limit_tier": "default",
            }
            for i in range(args.keys)
        }
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps({"gateway": {"api_keys": keys}}), encoding="utf-8")
        port = free_port()
        launch = opa_launch(opa_bin, port, str(ROOT / "policy"), str(data))
        with started(launch, Path(tmp) / "opa.log") as opa:
            url = f"http://127.0.0.1:{port}"
            print("| OPA query | OPA CPU µs/decision | client CPU µs/decision |")
            print("|---|---|---|")
            for _ in range(args.rounds):
                for row in asyncio.run(_opa_side(url, opa.pid, requests)):
                    print(row)
            print()
            print(
                "| round | decisions in flight | coalescing (max queries in flight) "
                "| authz CPU µs/decision | OPA CPU µs/decision | authz + OPA "
                "| decisions/s | share batched | mean batch |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            for round_ in range(args.rounds):
                for concurrency in CONCURRENCY:
                    for in_flight in VARIANTS:
                        r = asyncio.run(_case(url, opa.pid, in_flight, concurrency, requests))
                        results.setdefault((concurrency, in_flight), []).append(r)
                        print(
                            f"| {round_ + 1} | {concurrency} | {_name(in_flight)} "
                            f"| {r['authz_us']:.0f} | {r['opa_us']:.0f} "
                            f"| {r['authz_us'] + r['opa_us']:.0f} | {r['rps']:.0f} "
                            f"| {r['batched']:.2f} | {r['mean_batch']:.1f} |"
                        )
    print()
    for concurrency in CONCURRENCY:
        off = results[(concurrency, 0)]
        for in_flight in VARIANTS[1:]:
            on = results[(concurrency, in_flight)]
            print(
                f"{concurrency} in flight, {_name(in_flight)}/off: CPU per decision "
                f"{_median(on, 'cpu') / _median(off, 'cpu'):.2f} "
                f"(authz {_median(on, 'authz_us') / _median(off, 'authz_us'):.2f}, "
                f"OPA {_median(on, 'opa_us') / _median(off, 'opa_us'):.2f}), "
                f"throughput {_median(on, 'rps') / _median(off, 'rps'):.2f}"
            )


def _name(in_flight: int) -> str:
    return f"on ({in_flight})" if in_flight else "off"


if __name__ == "__main__":
    main()
