"""CPU per decision on a cache miss (or, with ``--hits``, a hit), authz and OPA, in total
and per step of the pipeline.

Not a test (numbers, no assertions); the numbers go to ``docs/performance.md`` ("Cost of
a miss")::

    python -m bench.miss_cost [--requests 2000] [--transport tcp,unix] [--profile] [--hits]

Builds the shipped policy bundle (``scripts/build-policy-bundle``) with ``--keys`` bench
keys, serves it from a real OPA (``AUTHZ_OPA_BIN``) on a free 127.0.0.1 port or a unix
socket, and starts authz in process with :func:`authz.runtime.server.build_runtime` and
its shipped settings (decision log on, written to a file; audit trail on, SQLite in a
temporary directory), pointed at that OPA; ``--variants`` adds runs with the decision
log off (``no-log``) and with the audit trail off too (``no-log-no-audit``), so the
difference between two variants is what that component costs per decision. Then it
calls the Authorizer's ``check`` for ``--requests`` gateway requests that each carry a
key not used before (``GET /api/v1/items/1``, like ``scripts/bench``'s distinct
workload), so every one misses the decision cache, one after the other, on uvloop as
the server runs. With ``--hits`` the requests cycle over :data:`HIT_KEYS` keys instead,
each also with a fresh ``x-request-id`` (which the declared cache key leaves out), so after
the warm-up every decision is a cache hit: what authz's own pipeline costs on a hit. The
gRPC server is not in the path (its cost per Check is the same on
a hit and a miss; ``docs/performance.md`` measures it apart).

Printed per transport: CPU per decision in microseconds of this process
(``time.process_time``, the audit writer thread included) and of OPA
(``/proc/<pid>/stat``), and wall time per decision. With ``--profile`` a second pass runs
under :mod:`cProfile` with a CPU clock and prints each step's inclusive CPU per decision
(:data:`STEPS`); the profiler's own overhead inflates those, so read them as shares.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Final

import uvloop

from authz.runtime.config import load
from authz.runtime.server import build_runtime
from authz.tools.launch import Launch, find_binary, free_port, opa_launch, started
from bench.procstat import read_cpu_seconds
from bench.workload import BENCH_PATH, bench_key, write_keys_overlay
from tests.helpers.fakes import check_request

ROOT: Final = Path(__file__).resolve().parent.parent
# --hits: the keys the requests cycle over (all decided, and cached, in the warm-up).
HIT_KEYS: Final = 50

# Step -> (file suffix, function name) of the frame whose inclusive CPU is the step's.
STEPS: Final = (
    ("input building (build_input)", "authz/core/input.py", "build_input"),
    ("cache key (DecisionCache.key)", "authz/core/cache.py", "key"),
    ("cache put (DecisionCache.put)", "authz/core/cache.py", "put"),
    ("OPA call, whole (OpaClient.evaluate)", "authz/core/opa.py", "evaluate"),
    ("  request encoding (orjson.dumps, any caller)", "~", "<built-in method orjson.dumps>"),
    ("  answer parsing (_parse_answer)", "authz/core/opa.py", "_parse_answer"),
    ("decision parsing (parse_decision)", "authz/core/decision.py", "parse_decision"),
    ("rate limit (Authorizer._rate_limit)", "authz/core/authorizer.py", "_rate_limit"),
    ("response building (build_response)", "authz/core/response.py", "build_response"),
    ("decision record (Authorizer._record)", "authz/core/authorizer.py", "_record"),
    ("sinks: decision log (DecisionLog.record)", "authz/runtime/logs.py", "record"),
    ("sinks: audit trail (AuditTrail.record)", "authz/runtime/audit/store.py", "record"),
    ("sinks: metrics (MetricsSink.record)", "authz/runtime/metrics.py", "record"),
    ("whole Check (Authorizer.check)", "authz/core/authorizer.py", "check"),
)


def build_bundle(base: Path, keys: int) -> Path:
    """The shipped policy with ``keys`` bench keys, as ``scripts/bench`` builds it."""
    overlay = write_keys_overlay(base / "overlay", keys)
    subprocess.run(
        [
            str(ROOT / "scripts/build-policy-bundle"),
            "--data",
            str(overlay),
            "--out",
            str(base),
            "--name",
            "miss",
            "--skip-tests",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return base / "miss.tar.gz"


def opa_on_socket(binary: str, socket: Path, bundle: Path) -> Launch:
    """``opa run --server --addr unix://<socket>``: ready once its health answers."""
    base = opa_launch(binary, 0, "--bundle", str(bundle))
    argv = tuple(
        f"--addr=unix://{socket}" if arg.startswith("--addr=") else arg for arg in base.argv
    )
    return Launch("OPA", argv, f"unix://{socket}", lambda: _socket_ok(socket))


def _socket_ok(socket: Path) -> bool:
    import http.client
    import socket as sockets

    if not socket.exists():
        return False
    conn = http.client.HTTPConnection("localhost", timeout=0.5)
    try:
        conn.sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        conn.sock.settimeout(0.5)
        conn.sock.connect(str(socket))
        conn.request("GET", "/health?bundles")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def running_opa(binary: str, transport: str, bundle: Path, base: Path) -> Iterator[tuple[str, int]]:
    """(AUTHZ_OPA_URL, OPA's pid) of an OPA serving ``bundle`` over ``transport``."""
    if transport == "unix":
        launch = opa_on_socket(binary, base / f"opa-{time.monotonic_ns()}.sock", bundle)
    else:
        port = free_port()
        launch = opa_launch(binary, port, "--bundle", str(bundle), ready_path="/health?bundles")
    with started(launch, base / f"opa-{transport}.log") as proc:
        yield launch.url, proc.pid


# What each variant changes in the shipped settings: the difference in CPU between two
# variants is what that component costs per decision, measured without a profiler.
VARIANTS: Final = {
    "shipped": {},
    "no-log": {"AUTHZ_DECISION_LOG": "false"},
    "no-log-no-audit": {"AUTHZ_DECISION_LOG": "false", "AUTHZ_AUDIT_DB": ""},
}


async def measure(
    url: str,
    opa_pid: int,
    base: Path,
    first_key: int,
    requests: int,
    profile: bool,
    variant: str = "shipped",
    hits: bool = False,
) -> dict[str, Any]:
    """Run ``requests`` misses (``hits``: hits) through an in-process authz; CPU and step
    figures."""
    environ = {
        "AUTHZ_OPA_URL": url,
        "AUTHZ_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
        "AUTHZ_AUDIT_DB": str(base / f"audit-{first_key}.db"),
        **VARIANTS[variant],
    }
    settings = load(environ)
    stdout = sys.stdout
    async with contextlib.AsyncExitStack() as stack:
        with (base / "decisions.log").open("a", encoding="utf-8") as log_file:
            sys.stdout = log_file  # the decision log's stream, as a container's stdout file
            try:
                runtime = await build_runtime(settings, stack)
                authorizer = runtime.live.authorizer
                assert authorizer is not None
                await runtime.watcher.poll_once()  # the revision and declarations, as live
                checks = [
                    check_request(
                        path=BENCH_PATH,
                        headers={
                            "x-api-key": bench_key(i % HIT_KEYS if hits else first_key + i),
                            "x-request-id": f"bench-{first_key + i}",
                        },
                    )
                    for i in range(requests + 200)
                ]
                for request in checks[:200]:  # warm up pools, OPA and the code paths
                    await authorizer.check(request)
                await asyncio.sleep(0.5)  # let the audit writer drain the warm-up
                profiler = cProfile.Profile(time.process_time) if profile else None
                own, opa = time.process_time(), read_cpu_seconds(opa_pid)
                wall = time.perf_counter()
                if profiler is not None:
                    profiler.enable()
                allowed = 0
                for request in checks[200:]:
                    outcome = await authorizer.check(request)
                    allowed += outcome.response.HasField("ok_response")
                await asyncio.sleep(0.4)  # the audit writer's batch of these decisions
                if profiler is not None:
                    profiler.disable()
                wall = time.perf_counter() - wall - 0.4
                own, opa = time.process_time() - own, read_cpu_seconds(opa_pid) - opa
            finally:
                sys.stdout = stdout
    if allowed < requests * 0.99:  # a few may time out on a busy machine; more: a bad bundle
        raise RuntimeError(f"only {allowed} of {requests} allowed: check the bundle")
    per = 1e6 / requests
    result: dict[str, Any] = {"authz_us": own * per, "opa_us": opa * per, "wall_us": wall * per}
    if profiler is not None:
        result["steps"] = steps(profiler, requests)
    return result


def steps(profiler: cProfile.Profile, requests: int) -> dict[str, float]:
    """Inclusive CPU per decision (µs) of each of :data:`STEPS`."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    table: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for label, suffix, name in STEPS:
        total = sum(
            entry[3]
            for (path, _, func), entry in table.items()
            if func == name and (path.endswith(suffix) or path == suffix)
        )
        out[label] = total / requests * 1e6
    return out


def _run(coroutine: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """``coroutine`` on uvloop, the event loop authz runs on (``AUTHZ_UVLOOP``)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=20000)
    parser.add_argument("--transport", default="tcp,unix")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="shipped", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--hits", action="store_true", help="every decision a cache hit")
    args = parser.parse_args()
    opa_bin = find_binary("opa", "AUTHZ_OPA_BIN")
    transports = args.transport.split(",")
    variants = args.variants.split(",")
    runs = args.rounds * len(transports) * (len(variants) + (1 if args.profile else 0))
    needed = (args.requests + 200) * runs
    if needed > args.keys and not args.hits:
        parser.error(f"--keys must be at least {needed} (every request a new key)")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        bundle = build_bundle(base, args.keys)
        first = 0
        print(
            "| transport | settings | authz CPU µs/decision | OPA CPU µs/decision "
            "| wall µs/decision |"
        )
        print("|---|---|---|---|---|")
        profiles: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for transport in transports:
                with running_opa(opa_bin, transport, bundle, base) as (url, pid):
                    for variant in variants:
                        res = _run(
                            measure(url, pid, base, first, args.requests, False, variant, args.hits)
                        )
                        first += args.requests + 200
                        print(
                            f"| {transport} | {variant} | {res['authz_us']:.0f} "
                            f"| {res['opa_us']:.0f} | {res['wall_us']:.0f} |",
                            flush=True,
                        )
                    if args.profile:
                        res = _run(
                            measure(url, pid, base, first, args.requests, True, hits=args.hits)
                        )
                        first += args.requests + 200
                        profiles[transport] = res["steps"]
        for transport, table in profiles.items():
            print(f"\nsteps under cProfile ({transport}), inclusive CPU µs per decision:")
            for label, value in table.items():
                print(f"  {value:8.1f}  {label}")
    os.environ.pop("AUTHZ_OPA_URL", None)


if __name__ == "__main__":
    main()
