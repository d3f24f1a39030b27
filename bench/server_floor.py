"""What a gRPC server costs per Check before any decision: null servers against authz.

Not a test (numbers, no assertions); the numbers go to ``docs/performance.md`` ("The
gRPC server's floor") and ``docs/decisions.md``::

    python -m bench.server_floor [--servers go,aio,grpclib,h2,authz-bare,authz]
                                 [--rates 1000,0] [--step-s 8]

Each server runs behind the same gateway Envoy as ``scripts/bench`` (:mod:`bench.rig`),
one after the other, under the skewed workload's requests (``scripts/bench``'s sequence,
so authz answers nearly all from its decision cache):

- ``go``: the ceiling setup's null server (``bench/ceiling``, ``BENCH_CEILING_BIN``);
- ``aio``, ``grpclib``, ``h2``: the null servers of :mod:`bench.null_server`;
- ``authz-bare`` and ``authz``: authz with the decision log and audit trail off, and as
  shipped (over mTLS, as ``scripts/bench`` runs them; a null grpc.aio server over mTLS
  costs the same as in plaintext here, within 2%).

For each fixed rate (0: closed loop with 32 connections, the saturation throughput) it
prints the throughput, p50/p99, the CPU per request of the server (authz: authz alone,
OPA apart) and of Envoy, from ``/proc/<pid>/stat``, and the server's context switches
per request (voluntary + involuntary, all its threads, :func:`bench.procstat.read_switches`);
last, each server's CPU per request as a ratio to ``aio`` (the server authz runs on) at
each rate.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Final

from authz.tools.launch import find_binary
from bench import procstat
from bench.__main__ import options, parse_args
from bench.load import Attack, run_attack
from bench.rig import Binaries, Rig, Running
from bench.run import Bench, log

ROOT: Final = Path(__file__).resolve().parent.parent
SERVERS: Final = ("go", "aio", "grpclib", "h2", "authz-bare", "authz")
_BUNDLE: Final = "keys-100"


def _null_wrapper(run_dir: Path, impl: str) -> str:
    """An executable taking the ceiling server's ``-addr=`` flag that runs
    :mod:`bench.null_server` with ``impl`` (the rig starts a ceiling binary that way)."""
    path = run_dir / f"null-{impl}.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f'cd "{ROOT}" && exec "{sys.executable}" -m bench.null_server --impl {impl} '
        '--addr "${1#-addr=}"\n',
        encoding="utf-8",
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@contextmanager
def _running(rig: Rig, server: str) -> Iterator[Running]:
    setup = server if server.startswith("authz") else "ceiling"
    with rig.setup(setup, _BUNDLE) as running:
        yield running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--rates", default="1000,0", help="rps per step; 0: closed loop")
    parser.add_argument("--step-s", type=float, default=8.0)
    args = parser.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; choose from {SERVERS}")
    rates = [int(r) for r in args.rates.split(",")]
    vegeta = os.environ.get("BENCH_VEGETA_BIN") or find_binary("vegeta", "BENCH_VEGETA_BIN")
    opts = replace(options(parse_args(["--quick", "--scale-sizes", "100"])), keys=100)
    base = Binaries(
        envoy=find_binary("envoy", "AUTHZ_ENVOY_BIN"),
        opa=find_binary("opa", "AUTHZ_OPA_BIN"),
        vegeta=vegeta,
        ceiling=os.environ.get("BENCH_CEILING_BIN"),
    )
    bench = Bench(ROOT, opts, base, ROOT / "build" / "bench-floor", None)
    bundles = bench.build_bundles()
    cpu: dict[tuple[str, int], float] = {}
    for server in servers:
        binaries = base
        if server in ("aio", "grpclib", "h2"):
            binaries = replace(base, ceiling=_null_wrapper(bench.run_dir, server))
        elif server == "go" and not base.ceiling:
            log("go: no BENCH_CEILING_BIN (scripts/install-tools ceiling builds it); skipped")
            continue
        with ExitStack() as stack:
            rig = stack.enter_context(Rig(ROOT, bench.run_dir / server, bundles, binaries))
            running = stack.enter_context(_running(rig, server))
            role = "authz" if server.startswith("authz") else "ceiling"
            targets = bench._targets(running, "floor", bench.skewed)
            run_attack(vegeta, Attack(f"{server}-warmup", 300, 3, targets), bench.run_dir / "res")
            for rate in rates:
                pids = running.pids()
                before = {r: procstat.read_cpu_seconds(pid) for r, pid in pids.items()}
                switches = procstat.read_switches(pids[role])
                attack = Attack(f"{server}-{rate}", rate, args.step_s, targets)
                step = run_attack(vegeta, attack, bench.run_dir / "res").step
                used = {r: procstat.read_cpu_seconds(pid) - before[r] for r, pid in pids.items()}
                voluntary, involuntary = (
                    now - then
                    for now, then in zip(procstat.read_switches(pids[role]), switches, strict=True)
                )
                per = 1000 / max(step.requests, 1)
                cpu[(server, rate)] = used[role] * per
                lat = step.latency_ms
                print(
                    f"{server:10} rate {rate or 'max':>5}: {step.throughput:7.0f} ok/s, "
                    f"errors {step.errors}, p50 {lat.get('p50', 0):.2f} "
                    f"p99 {lat.get('p99', 0):.2f} ms"
                    f" | CPU ms/request: server {used[role] * per:.3f}, "
                    f"envoy {used['envoy'] * per:.3f} | context switches/request: "
                    f"{voluntary / max(step.requests, 1):.1f} + "
                    f"{involuntary / max(step.requests, 1):.1f}",
                    flush=True,
                )
    for rate in rates:
        floor = cpu.get(("aio", rate))
        if not floor:
            continue
        ratios = " | ".join(
            f"{s}/aio {cpu[(s, rate)] / floor:.2f}" for s in servers if (s, rate) in cpu
        )
        print(f"server CPU per request at {rate or 'max'} rps: {ratios}")


if __name__ == "__main__":
    main()
