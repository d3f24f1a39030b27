"""``python -m bench``: run the benchmark (``scripts/bench`` installs the tools first).

Prints progress on stderr, then the per-workload table (max rps, p50/p99 at the fixed
rates, CPU per request, authz's cache hit rate, throughput over the peer's and the
ceiling's), the per-workload ratios and, as the last line, the ratios
``authz/peer throughput``, ``authz/peer p99 at 1000 rps``, ``authz/limit throughput``
(``--only hostile``: the hostile step's ``hostile/quiet throughput ..., p99 ...x``).
Saves ``<out>/results-<stamp>.json`` and ``<out>/latency-<stamp>.png``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from authz.stack.supervisor import StackError, find_binary
from bench import report
from bench.rig import SETUPS, Binaries
from bench.run import DEFAULT, EXTRA_STEPS, QUICK, WORKLOADS, Bench, Options, log

ROOT = Path(__file__).resolve().parent.parent


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _setups(text: str) -> tuple[str, ...]:
    names = tuple(v for v in text.split(",") if v)
    unknown = set(names) - set(SETUPS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown setups {sorted(unknown)}; known: {SETUPS}")
    return names


def _only(text: str) -> tuple[str, ...]:
    names = tuple(v for v in text.split(",") if v)
    known = (*SETUPS, *WORKLOADS, *EXTRA_STEPS)
    unknown = set(names) - set(known)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown names {sorted(unknown)}; known: {known}")
    return names


def _env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("AUTHZ_"):
        raise argparse.ArgumentTypeError(f"expected AUTHZ_NAME=value, got {text!r}")
    return name, value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; unset ones keep the (quick) defaults."""
    d = DEFAULT
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Envoy alone (limit), Envoy + a null ext_authz server (ceiling), Envoy + "
        "opa-envoy-plugin (peer), Envoy + authz + OPA as shipped (authz) and with the decision "
        "log and audit off (authz-bare), on the skewed, realistic and distinct workloads, side "
        "by side in one run on 127.0.0.1.",
    )
    p.add_argument("--quick", action="store_true", help="short steps: a smoke run (~7 min)")
    p.add_argument("--setups", type=_setups, help=f"comma-separated subset of {SETUPS}")
    p.add_argument("--rates", type=_ints, help=f"fixed open-loop rates (default {d.rates})")
    p.add_argument("--step-s", type=float, help=f"fixed-rate step seconds ({d.step_s:g})")
    p.add_argument("--probe-s", type=float, help=f"closed-loop probe seconds ({d.probe_s:g})")
    p.add_argument("--search-step-s", type=float, help=f"search step s ({d.search_step_s:g})")
    p.add_argument("--search-steps", type=int, help=f"search steps ({d.search_steps})")
    p.add_argument("--workers", type=int, help=f"closed-loop connections ({d.workers})")
    p.add_argument("--max-p99-ms", type=float, help=f"sustained means p99 <= ({d.max_p99_ms:g})")
    p.add_argument("--keys", type=int, help=f"API keys in the main bundle ({d.keys})")
    p.add_argument("--hot-keys", type=int, help=f"keys the skewed load uses ({d.hot_keys})")
    p.add_argument("--zipf", type=float, dest="zipf_exponent", help="Zipf exponent (1.0)")
    p.add_argument("--scale-sizes", type=_ints, help=f"bundle sizes ({d.scale_sizes})")
    p.add_argument("--scale-rate", type=int, help=f"scale step rate ({d.scale_rate})")
    p.add_argument("--warmup-rate", type=int, help=f"warm-up rate ({d.warmup_rate})")
    p.add_argument("--distinct-keys", type=int, help=f"distinct-key bundle ({d.distinct_keys})")
    p.add_argument("--envoy-concurrency", type=int, help="Envoy --concurrency, all setups (1)")
    p.add_argument("--no-profile", dest="profile", action="store_false", default=None)
    p.add_argument(
        "--only",
        type=_only,
        help="comma-separated setups, workloads and steps to run (others are skipped), of "
        f"{(*SETUPS, *WORKLOADS, *EXTRA_STEPS)}: e.g. authz,peer,realistic; hostile alone = "
        "legitimate throughput and p99 with and without hostile load (authz, one bundle)",
    )
    transport = p.add_mutually_exclusive_group()
    transport.add_argument(
        "--opa-socket",
        dest="opa_socket",
        action="store_true",
        default=None,
        help="authz reaches OPA on a unix socket (AUTHZ_OPA_URL=unix://...), as shipped "
        "(the default)",
    )
    transport.add_argument(
        "--opa-tcp",
        dest="opa_socket",
        action="store_false",
        default=None,
        help="authz reaches OPA over loopback TCP instead of the unix socket",
    )
    p.add_argument("--hostile-legit-rate", type=int, help=f"legit rps ({d.hostile_legit_rate})")
    p.add_argument("--hostile-rate", type=int, help=f"hostile rps ({d.hostile_rate})")
    p.add_argument("--hostile-step-s", type=float, help=f"hostile phase s ({d.hostile_step_s:g})")
    p.add_argument("--hostile-slow", type=int, help=f"slow connections ({d.hostile_slow})")
    p.add_argument("--keep-run", action="store_true", default=None, help="keep bundles, targets")
    p.add_argument(
        "--authz-ref",
        help="run authz from this git ref (e.g. HEAD: the last commit, without uncommitted "
        "changes; default: the working tree)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        dest="wait_quiet_s",
        help="before each setup, wait up to this many seconds for other processes on the "
        "machine to go quiet (default 0: measure and report them only)",
    )
    p.add_argument(
        "--authz-env",
        type=_env,
        action="append",
        default=[],
        help="extra AUTHZ_NAME=value for both authz setups (repeatable; none by default: "
        "authz runs with the settings it ships with)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "build" / "bench")
    p.add_argument("--vegeta", default=os.environ.get("BENCH_VEGETA_BIN") or shutil.which("vegeta"))
    p.add_argument(
        "--peer",
        default=os.environ.get("AUTHZ_PEER_BIN"),
        help="opa-envoy-plugin binary (default $AUTHZ_PEER_BIN; none: peer is skipped)",
    )
    p.add_argument(
        "--ceiling",
        default=os.environ.get("BENCH_CEILING_BIN"),
        help="the null ext_authz server, bench/ceiling built (default $BENCH_CEILING_BIN; "
        "none: the ceiling setup is skipped)",
    )
    p.add_argument(
        "--py-spy", default=shutil.which("py-spy", path=str(Path(sys.executable).parent))
    )
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> Options:
    """The run's options: the (quick) defaults with every given argument applied."""
    base = QUICK if args.quick else DEFAULT
    overrides = {
        name: getattr(args, name)
        for name in (
            "setups",
            "rates",
            "step_s",
            "probe_s",
            "search_step_s",
            "search_steps",
            "workers",
            "max_p99_ms",
            "keys",
            "hot_keys",
            "zipf_exponent",
            "scale_sizes",
            "scale_rate",
            "warmup_rate",
            "distinct_keys",
            "envoy_concurrency",
            "profile",
            "keep_run",
            "authz_ref",
            "wait_quiet_s",
            "only",
            "hostile_legit_rate",
            "hostile_rate",
            "hostile_step_s",
            "hostile_slow",
            "opa_socket",
        )
        if getattr(args, name) is not None
    }
    env = {**base.authz_env, **dict(args.authz_env)}
    return replace(base, **overrides, authz_env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """Run and report; 0 when every setup ran, 1 when one failed, 2 on a setup error."""
    args = parse_args(argv)
    opts = options(args)
    if not opts.plan() and not opts.runs("hostile") and not opts.scale_setups():
        log(f"nothing to run: --only {','.join(opts.only)} with --setups {','.join(opts.setups)}")
        return 2
    if not args.vegeta:
        log("vegeta not found (scripts/bench installs it; or --vegeta PATH)")
        return 2
    try:
        binaries = Binaries(
            envoy=find_binary("envoy", "AUTHZ_ENVOY_BIN"),
            opa=find_binary("opa", "AUTHZ_OPA_BIN"),
            vegeta=args.vegeta,
            peer=args.peer or None,
            ceiling=args.ceiling or None,
        )
    except StackError as exc:
        log(str(exc))
        return 2
    bench = Bench(ROOT, opts, binaries, args.out, args.py_spy)
    results = bench.run()
    json_path, png_path = bench.save()
    text = report.render(results)
    head, _, tail = text.rpartition("\n\n")
    print(head)
    print()
    print(f"results: {json_path}" + (f"  plot: {png_path}" if png_path else ""))
    print(tail)
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
