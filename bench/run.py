"""One benchmark run: build the bundles, measure each setup, save and print the results.

Workloads (:data:`WORKLOADS`), each run by the setups :data:`SETUP_WORKLOADS` names:

- ``skewed``: ``GET BENCH_PATH`` with a key drawn with Zipf popularity from ``hot_keys``
  of the ``keys`` keys (bundle ``keys-<keys>``);
- ``realistic``: :class:`bench.workload.RealisticStream` on the same bundle: Zipf keys
  over varied paths (ids in path segments, query strings), a few methods and user
  agents, a fresh ``x-request-id`` and ``traceparent`` on every request;
- ``distinct``: every request a key that setup has not used before (bundle
  ``keys-<distinct_keys>``): a decision cache cannot help.

Each (setup, workload) pair is a session on a freshly started setup (so no cache carries
over from another workload):

1. sanity: a valid key answers 200 and an unknown key 401 (limit and ceiling: 200);
2. warm-up (discarded);
3. a scale step (``peer``/``authz``, when the bundle's size is a scale size):
   ``scale_rate`` rps over the ``scale_hot_keys`` first keys, then the processes' memory;
4. each fixed rate, open loop: latency percentiles, CPU seconds per 1,000 requests of
   every process of the setup (``/proc/<pid>/stat`` before and after) and, for authz,
   the decision cache's hits and misses (:mod:`bench.hitrate`);
5. max sustained rate (``search``) and peak RSS;
6. authz, skewed only: a profiled step (py-spy on the authz process) at ``profile_load``
   of its max sustained rate.

Then the scale step on each bundle size not measured yet. Last, with the authz setup in
the run (or alone, ``--only hostile``), the hostile step on a fresh authz setup
(``bench.hostile``): the skewed workload at ``hostile_legit_rate`` alone, then beside
hostile requests at ``hostile_rate`` and ``hostile_slow`` slow clients; its ratios are
loaded over quiet. ``only`` picks setups, workloads and the ``scale``/``hostile`` steps
(:meth:`Options.plan`). Each step also records the CPU the rest of the machine used
meanwhile (``foreign_cpu_cores``): the machine is shared, and a busy neighbour skews a
step.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Final

import authz
from authz.stack.supervisor import StackError
from bench import hitrate, procstat, report
from bench.hostile import format_hostile, hostile_ratios, write_hostile_targets
from bench.load import Attack, LoadRun, run_attack
from bench.profile import format_profile, parse_collapsed, summarize_profile
from bench.rig import HOST, SETUPS, Binaries, Rig, Running
from bench.search import Bisection
from bench.stats import Step, sustained
from bench.workload import (
    BENCH_PATH,
    DistinctStream,
    RealisticStream,
    bench_key,
    write_keys_overlay,
    write_requests,
    write_targets,
    zipf_sequence,
)
from tests.helpers.hostile import Slowloris, Tally

__all__ = [
    "DEFAULT",
    "EXTRA_STEPS",
    "QUICK",
    "SETUP_WORKLOADS",
    "WORKLOADS",
    "Bench",
    "Options",
]

# The setups whose p50 is compared across bundle sizes (the scale steps).
DECIDERS: Final = ("peer", "authz")
WORKLOADS: Final = ("skewed", "realistic", "distinct")
# Steps besides the workloads, each selectable with --only.
EXTRA_STEPS: Final = ("scale", "hostile")
# What each setup runs by default. Envoy alone is the reference on one workload; the null
# server ignores the key, so its distinct-key row would repeat its skewed one (the report
# reads distinct ratios against the ceiling's skewed row); the row with the decision log
# and audit off is one row, on the traffic that resembles a deployment's.
SETUP_WORKLOADS: Final[Mapping[str, tuple[str, ...]]] = {
    "limit": ("skewed",),
    "ceiling": ("skewed", "realistic"),
    "peer": WORKLOADS,
    "authz": WORKLOADS,
    "authz-bare": ("realistic",),
}
# Requests in the skewed and scale targets files (vegeta cycles through a file).
SEQUENCE_LENGTH: Final = 20_000
# Pause between load steps so a backlog from the previous one cannot leak into the next.
SETTLE_S: Final = 1.5
# The probe may exceed the ceiling it measures a little; bisection starts just above.
PROBE_HEADROOM: Final = 1.05
FOREIGN_CPU_WARN: Final = 0.10
QUIET_CORES: Final = 0.10
QUIET_SECONDS: Final = 3


@dataclass(frozen=True)
class Options:
    """What to measure and for how long (durations in seconds, rates in rps)."""

    setups: tuple[str, ...] = SETUPS
    rates: tuple[int, ...] = (500, 1000)
    step_s: float = 6.0
    warmup_s: float = 2.0
    # Light enough for every setup: warming up must not leave a backlog behind.
    warmup_rate: int = 100
    probe_s: float = 4.0
    search_step_s: float = 4.0
    search_steps: int = 4
    search_low: float = 0.4
    workers: int = 32
    max_p99_ms: float = 100.0
    keys: int = 10_000
    hot_keys: int = 1_000
    zipf_exponent: float = 1.0
    scale_sizes: tuple[int, ...] = (100, 10_000, 100_000)
    # Low: the scale steps measure decision latency, not queueing near saturation.
    scale_rate: int = 100
    scale_hot_keys: int = 100
    distinct_keys: int = 100_000
    envoy_concurrency: int = 1
    profile: bool = True
    profile_s: float = 10.0
    # The profiled step runs at this share of authz's max sustained rate (a loaded but
    # not overloaded process: overload profiles the failure path).
    profile_load: float = 0.8
    seed: int = 1
    # Added to authz's environment in both authz setups. Empty: authz runs with the
    # settings it ships with (vegeta's own per-request headers never reach it: the rig's
    # Envoy removes them, bench.rig).
    authz_env: Mapping[str, str] = field(default_factory=dict)
    # authz talks to OPA over a unix socket (AUTHZ_OPA_URL=unix://...), as the stack and
    # the deployments ship it; False (--opa-tcp): over loopback TCP.
    opa_socket: bool = True
    keep_run: bool = False
    # Run authz from this git ref of the repository (None: the working tree).
    authz_ref: str | None = None
    # Before each setup starts, wait up to this long for the rest of the machine to go
    # quiet (other processes below QUIET_CORES for a few seconds).
    wait_quiet_s: float = 0.0
    # The hostile step (bench.hostile), on a fresh authz setup: the legitimate skewed load
    # at hostile_legit_rate rps for hostile_step_s seconds alone, then again beside
    # hostile requests at hostile_rate rps and hostile_slow slow clients.
    hostile_legit_rate: int = 100
    hostile_rate: int = 10
    hostile_step_s: float = 10.0
    hostile_slow: int = 20
    # Names of setups, workloads and EXTRA_STEPS to run (empty: everything; see plan).
    only: tuple[str, ...] = ()

    def plan(self) -> dict[str, tuple[str, ...]]:
        """Setup -> the workloads it runs, in :data:`SETUPS` order (a setup with none is
        absent). ``only`` filters: the setups it names (none named: every setup of
        ``setups``), and the workloads it names (none named: each setup's
        :data:`SETUP_WORKLOADS`, unless it names only extra steps, then none). A setup and
        a workload both named run even where :data:`SETUP_WORKLOADS` leaves that pair
        out. Raises ValueError on a name that is none of these."""
        unknown = set(self.only) - {*SETUPS, *WORKLOADS, *EXTRA_STEPS}
        if unknown:
            raise ValueError(
                f"unknown names {sorted(unknown)}; known: {[*SETUPS, *WORKLOADS, *EXTRA_STEPS]}"
            )
        named_setups = [s for s in self.only if s in SETUPS]
        named_workloads = [w for w in WORKLOADS if w in self.only]
        extras_only = not named_workloads and any(e in self.only for e in EXTRA_STEPS)
        plan: dict[str, tuple[str, ...]] = {}
        for setup in SETUPS:
            if setup not in self.setups or (named_setups and setup not in named_setups):
                continue
            if extras_only:
                workloads: tuple[str, ...] = ()
            elif not named_workloads:
                workloads = SETUP_WORKLOADS[setup]
            elif setup in named_setups:
                workloads = tuple(named_workloads)
            else:
                workloads = tuple(w for w in named_workloads if w in SETUP_WORKLOADS[setup])
            if workloads:
                plan[setup] = workloads
        return plan

    def runs(self, step: str) -> bool:
        """Whether extra step ``step`` (``scale``, ``hostile``) runs: ``only`` names it,
        or names no workload and no extra step (everything runs), and a setup it needs is
        in the run (``scale``: peer or authz; ``hostile``: authz)."""
        named = [n for n in self.only if n in (*WORKLOADS, *EXTRA_STEPS)]
        if named and step not in named:
            return False
        named_setups = [s for s in self.only if s in SETUPS]
        needs = DECIDERS if step == "scale" else ("authz",)
        return any(s in self.setups and (not named_setups or s in named_setups) for s in needs)

    def scale_setups(self) -> list[str]:
        """The setups the scale steps measure (none when ``scale`` does not run)."""
        if not self.runs("scale"):
            return []
        named_setups = [s for s in self.only if s in SETUPS]
        return [s for s in DECIDERS if s in self.setups and (not named_setups or s in named_setups)]

    def bundle_sizes(self) -> list[int]:
        """Every bundle size the run needs."""
        sizes: set[int] = set()
        for workloads in self.plan().values():
            sizes.update(self.distinct_keys if w == "distinct" else self.keys for w in workloads)
        if self.scale_setups():
            sizes.update(self.scale_sizes)
        if self.runs("hostile"):
            sizes.add(self.keys)
        return sorted(sizes)


DEFAULT: Final = Options()
QUICK: Final = replace(
    DEFAULT,
    step_s=2.0,
    warmup_s=1.0,
    probe_s=2.0,
    search_step_s=2.0,
    search_steps=3,
    profile_s=2.0,
    hostile_step_s=3.0,
)


def log(message: str) -> None:
    """Progress on stderr (stdout carries the final report)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _machine_busy_s() -> float:
    # /proc/stat "cpu" line: user nice system idle iowait irq softirq steal ...
    with open("/proc/stat", encoding="utf-8") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    return procstat.cpu_seconds(sum(fields) - fields[3] - fields[4])


def _get(url: str, key: str | None) -> int:
    headers = {"X-API-Key": key} if key else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (loopback http)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


class Bench:
    """A run in ``out_dir`` (``results-<stamp>.json``, ``latency-<stamp>.png`` and
    ``run-<stamp>/`` with configs, logs and, while running, the bundles)."""

    def __init__(
        self, root: Path, options: Options, binaries: Binaries, out_dir: Path, py_spy: str | None
    ) -> None:
        self.root = root
        self.opt = options
        self.bin = binaries
        self.py_spy = py_spy
        self.stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.out_dir = out_dir
        self.run_dir = out_dir / f"run-{self.stamp}"
        self.results: dict[str, Any] = {"setups": {}, "scale": {}, "errors": []}
        rng = random.Random(options.seed)  # noqa: S311
        hot = rng.sample(range(options.keys), min(options.hot_keys, options.keys))
        self.skewed = zipf_sequence(hot, SEQUENCE_LENGTH, options.zipf_exponent, options.seed)
        scale_keys = list(range(min(options.scale_hot_keys, *options.scale_sizes)))
        self.scale = zipf_sequence(scale_keys, SEQUENCE_LENGTH, options.zipf_exponent, options.seed)
        self._shared_pids: list[int] = []
        # Bundle sizes whose scale step ran, per setup.
        self._scaled: dict[str, set[int]] = {}
        # The distinct-key stream of the running session, by setup (for keys_used).
        self._streams: dict[str, DistinctStream] = {}

    # -- environment and bundles ----------------------------------------------------
    def environment(self) -> dict[str, Any]:
        """Machine, tool versions and the authz source measured."""
        cpu_model = ""
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
        status = _git(self.root, "status", "--porcelain", "--", "authz")
        ref = self.opt.authz_ref
        return {
            "cores": os.cpu_count(),
            "cpu": cpu_model,
            "kernel": platform.release(),
            "python": platform.python_version(),
            "envoy": _version([self.bin.envoy, "--version"]).split("version:")[-1].strip(),
            "opa": _version([self.bin.opa, "version"]),
            "peer": _version([self.bin.peer, "version"]) if self.bin.peer else None,
            "peer_version": os.environ.get("BENCH_PEER_VERSION", "unknown (AUTHZ_PEER_BIN)"),
            "peer_binary": self.bin.peer,
            "vegeta": os.environ.get("BENCH_VEGETA_VERSION")
            or _version([self.bin.vegeta, "-version"]),
            "authz_source": f"git {ref} ({_git(self.root, 'rev-parse', '--short', ref)})"
            if ref
            else f"working tree {Path(authz.__file__).parent}",
            "git_commit": _git(self.root, "rev-parse", "--short", "HEAD"),
            "authz_tree_dirty": None
            if status is None or self.opt.authz_ref
            else bool(status.strip()),
            "envoy_concurrency": self.opt.envoy_concurrency,
            "authz_env": dict(self.opt.authz_env),
            "opa_socket": self.opt.opa_socket,
            "ceiling_binary": self.bin.ceiling,
        }

    def export_authz(self) -> Path | None:
        """``git archive <authz_ref> authz`` into the run directory, for authz to import
        instead of the working tree (None without ``authz_ref``)."""
        if self.opt.authz_ref is None:
            return None
        target = self.run_dir / "authz-src"
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(self.root), "archive", self.opt.authz_ref, "authz"],
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
        return target

    def wait_quiet(self, what: str) -> float:
        """Wait up to ``wait_quiet_s`` until the machine has been quiet (busy below
        QUIET_CORES, our idle processes included) for QUIET_SECONDS; returns the seconds
        waited and records them."""
        if self.opt.wait_quiet_s <= 0:
            return 0.0
        started = time.monotonic()
        quiet = 0
        while quiet < QUIET_SECONDS:
            before = _machine_busy_s()
            time.sleep(1.0)
            quiet = quiet + 1 if _machine_busy_s() - before < QUIET_CORES else 0
            if time.monotonic() - started > self.opt.wait_quiet_s:
                log(f"{what}: the machine did not go quiet in {self.opt.wait_quiet_s:g}s; going on")
                break
        waited = round(time.monotonic() - started, 1)
        self.results.setdefault("quiet_waits", []).append({"before": what, "waited_s": waited})
        return waited

    def build_bundles(self) -> Path:
        """Build ``keys-<n>`` for every size (policy + keys + the peer shim) into
        ``run_dir/bundles``; returns that directory."""
        bundles = self.run_dir / "bundles"
        for size in self.opt.bundle_sizes():
            overlay = write_keys_overlay(self.run_dir / "data" / f"keys-{size}", size)
            shutil.copytree(
                self.root / "bench" / "peer", overlay / "bench_peer", dirs_exist_ok=True
            )
            started = time.monotonic()
            log_path = self.run_dir / "logs" / f"build-keys-{size}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("wb") as out:
                subprocess.run(
                    [
                        str(self.root / "scripts" / "build-policy-bundle"),
                        "--data",
                        str(overlay),
                        "--out",
                        str(bundles),
                        "--name",
                        f"keys-{size}",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    check=True,
                )
            log(f"bundle keys-{size} built in {time.monotonic() - started:.1f}s")
        return bundles

    # -- steps ----------------------------------------------------------------------
    def _targets(self, running: Running, name: str, indices: Sequence[int]) -> Path:
        return write_targets(
            self.run_dir / "targets" / f"{running.name}-{name}.txt",
            running.url + BENCH_PATH,
            indices,
        )

    def _workload_targets(self, running: Running, workload: str) -> Callable[[str, int], Path]:
        """A targets-file writer for ``workload`` in this session: (file name, request
        count) -> path. Skewed writes its fixed sequence (vegeta cycles it); realistic and
        distinct hand out the next requests of one stream per session, so a request id or
        a distinct key is never sent twice."""
        o = self.opt
        if workload == "skewed":
            return lambda name, _count: self._targets(running, name, self.skewed)
        directory = self.run_dir / "targets"
        if workload == "distinct":
            keys = DistinctStream(o.distinct_keys, seed=o.seed)
            self._streams[running.name] = keys
            return lambda name, count: write_targets(
                directory / f"{running.name}-{name}.txt", running.url + BENCH_PATH, keys.take(count)
            )
        if workload == "realistic":
            stream = RealisticStream(o.hot_keys, o.zipf_exponent, seed=o.seed)
            return lambda name, count: write_requests(
                directory / f"{running.name}-{name}.txt", running.url, stream.take(count)
            )
        raise ValueError(f"unknown workload {workload!r}")

    def _step(
        self, running: Running, name: str, rate: int, duration_s: float, targets: Path
    ) -> tuple[Step, dict[str, Any]]:
        """Run one load step; its summary, and the JSON record with the CPU each process
        used (total and per 1,000 requests), what other processes used meanwhile and, for
        authz, its decision cache's lookups (``cache``: hits, misses, hit_rate)."""
        cache_before = hitrate.read_lookups(running.admin_url) if running.admin_url else None
        pids = running.pids()
        before = {role: procstat.read_cpu_seconds(pid) for role, pid in pids.items()}
        shared_before = sum(procstat.read_cpu_seconds(p) for p in self._shared_pids)
        busy_before, started = _machine_busy_s(), time.monotonic()
        attack = Attack(
            f"{running.name}-{name}", rate, duration_s, targets, workers=self.opt.workers
        )
        run = run_attack(self.bin.vegeta, attack, self.run_dir / "results")
        elapsed = time.monotonic() - started
        busy = _machine_busy_s() - busy_before
        cpu = {role: procstat.read_cpu_seconds(pid) - before[role] for role, pid in pids.items()}
        shared = sum(procstat.read_cpu_seconds(p) for p in self._shared_pids) - shared_before
        cache = (
            hitrate.lookups(cache_before, hitrate.read_lookups(running.admin_url))
            if cache_before is not None and running.admin_url
            else None
        )
        ours = sum(cpu.values()) + shared + run.loadgen_cpu_s
        foreign = max(0.0, busy - ours) / elapsed
        step = run.step
        per_1k = {r: round(c / step.requests * 1000, 4) for r, c in cpu.items() if step.requests}
        lat = step.latency_ms
        log(
            f"{running.name:5} {name:18} rate {rate or 'max':>5}: {step.throughput:7.0f} ok/s "
            f"p50 {report.fmt_ms(lat.get('p50'))} p99 {report.fmt_ms(lat.get('p99'))} "
            f"p99.9 {report.fmt_ms(lat.get('p99.9'))} ms, errors {step.errors}"
            + (f" {step.codes}" if step.errors else "")
            + (
                f", cache hits {cache['hit_rate']:.0%}"
                if cache and cache["hit_rate"] is not None
                else ""
            )
            + (
                f"  [other processes used {foreign:.2f} cores]"
                if foreign > FOREIGN_CPU_WARN
                else ""
            )
        )
        record: dict[str, Any] = {
            "step": step.to_json(),
            "cpu_s": {r: round(c, 3) for r, c in cpu.items()},
            "cpu_per_1k": per_1k,
            "loadgen_cpu_s": run.loadgen_cpu_s,
            "foreign_cpu_cores": round(foreign, 3),
        }
        if cache is not None:
            record["cache"] = cache
        return step, record

    def _sanity(self, running: Running) -> None:
        url = running.url + BENCH_PATH
        valid, unknown = _get(url, bench_key(0)), _get(url, "ak_bench_unknown")
        want_unknown = 200 if running.name in ("limit", "ceiling") else 401
        if valid != 200 or unknown != want_unknown:
            raise RuntimeError(
                f"{running.name}: sanity check failed: valid key -> {valid} (want 200), "
                f"unknown key -> {unknown} (want {want_unknown})"
            )

    def _warmup(self, running: Running, targets: Path) -> None:
        if self.opt.warmup_s > 0:
            run_attack(
                self.bin.vegeta,
                Attack(f"{running.name}-warmup", self.opt.warmup_rate, self.opt.warmup_s, targets),
                self.run_dir / "results",
            )
            time.sleep(SETTLE_S)

    def _memory(self, running: Running) -> dict[str, dict[str, int | None]]:
        return {role: procstat.read_memory(pid) for role, pid in running.pids().items()}

    def _search(
        self, running: Running, workload: str, targets_for: Callable[[str, int], Path]
    ) -> dict[str, Any]:
        """Closed-loop probe, then bisection of open-loop steps (bench.search);
        ``targets_for(name, count)`` writes a targets file of ``count`` requests."""
        o = self.opt
        probe_count = int(max(self._ceiling_guess(running.name), 1000) * o.probe_s * 1.2)
        targets = targets_for(f"{workload}-probe", probe_count)
        probe_step, probe = self._step(running, f"{workload}-probe", 0, o.probe_s, targets)
        ceiling = probe_step.throughput
        result: dict[str, Any] = {
            "probe": probe,
            "ceiling_rps": ceiling,
            "steps": [],
            "max_rps": None,
        }
        if ceiling < 20:
            return result
        search = Bisection(lo=o.search_low * ceiling, hi=ceiling * PROBE_HEADROOM)
        for _ in range(o.search_steps):
            rate = search.next_rate()
            if rate is None:
                break
            time.sleep(SETTLE_S)
            count = int(rate * o.search_step_s * 1.1) + 100
            targets = targets_for(f"{workload}-search", count)
            step, record = self._step(running, f"{workload}-{rate}", rate, o.search_step_s, targets)
            ok, reason = sustained(step, o.max_p99_ms)
            if not ok:
                time.sleep(SETTLE_S)  # an overloaded step needs longer to drain
            search.record(rate, ok)
            result["steps"].append({"rate": rate, "sustained": ok, "reason": reason, **record})
        result["max_rps"] = search.best
        result["ceiling_measured"] = search.ceiling_measured
        log(f"{running.name:5} {workload} max sustained: {search.best} rps (probe {ceiling:.0f})")
        return result

    def _ceiling_guess(self, setup: str) -> float:
        searches = self.results["setups"].get(setup, {}).get("search", {})
        best = max((float(s.get("ceiling_rps") or 0) for s in searches.values()), default=0)
        return best or 5000.0

    # -- sessions --------------------------------------------------------------------
    def _workload_session(self, rig: Rig, setup: str, workload: str) -> None:
        """One workload on a freshly started setup: fixed rates, the max sustained rate,
        memory, the cache's hit rate over every measured step; the scale step first when
        this bundle is a scale size, the profile last (authz, skewed)."""
        o = self.opt
        size = o.distinct_keys if workload == "distinct" else o.keys
        out = self.results["setups"].setdefault(setup, {"search": {}})
        record: dict[str, Any] = {"fixed": {}}
        out.setdefault("workloads", {})[workload] = record
        with rig.setup(setup, f"keys-{size}") as running:
            targets_for = self._workload_targets(running, workload)
            self._sanity(running)
            warm = (
                self._targets(running, f"{workload}-warmup", self.scale)
                if workload == "distinct"  # no distinct key spent on warming up
                else targets_for(f"{workload}-warmup", int(o.warmup_rate * o.warmup_s) + 10)
            )
            self._warmup(running, warm)
            if setup in self.opt.scale_setups() and size in o.scale_sizes:
                self._scale_step(running, setup, size)
            for rate in o.rates:
                time.sleep(SETTLE_S)
                targets = targets_for(f"{workload}-{rate}", int(rate * o.step_s * 1.1) + 100)
                _, record["fixed"][str(rate)] = self._step(
                    running, f"{workload}-{rate}", rate, o.step_s, targets
                )
            time.sleep(SETTLE_S)
            search = self._search(running, workload, targets_for)
            out["search"][workload] = search
            if workload == "distinct":
                stream = self._streams.get(running.name)
                if stream is not None:
                    search["keys_used"] = stream.used
                    search["key_reuse"] = stream.wraps > 0
            record["memory"] = self._memory(running)
            steps = [*record["fixed"].values(), search.get("probe"), *search["steps"]]
            record["cache"] = hitrate.combine(step.get("cache") for step in steps if step)
            if workload == "skewed" or "memory" not in out:
                out["memory"] = record["memory"]
            if workload == "skewed":
                out["fixed"] = record["fixed"]  # the per-setup table reads the skewed rates
            if setup == "authz" and workload == "skewed" and o.profile:
                time.sleep(SETTLE_S)
                best = search.get("max_rps")
                rate = max(10, int(o.profile_load * best)) if best else o.scale_rate
                self._profile(running, targets_for("profiled", 0), rate)

    def _scale_step(self, running: Running, setup: str, size: int) -> None:
        targets = self._targets(running, f"scale-{size}", self.scale)
        _, record = self._step(
            running, f"scale-{size}keys", self.opt.scale_rate, self.opt.step_s, targets
        )
        record["memory"] = self._memory(running)
        self.results["scale"].setdefault(setup, {})[str(size)] = record
        self._scaled.setdefault(setup, set()).add(size)

    def _scale_session(self, rig: Rig, setup: str, size: int) -> None:
        with rig.setup(setup, f"keys-{size}") as running:
            self._sanity(running)
            self._warmup(running, self._targets(running, f"scale-{size}-warmup", self.scale))
            self._scale_step(running, setup, size)

    def _profile(self, running: Running, targets: Path, rate: int) -> None:
        if self.py_spy is None:
            log("py-spy not found: no profile")
            return
        raw = self.run_dir / "profile-authz.txt"
        spy = subprocess.Popen(
            [
                self.py_spy,
                "record",
                "--pid",
                str(running.pids()["authz"]),
                "--duration",
                f"{max(1, int(self.opt.profile_s))}",
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, step = self._step(running, "profiled", rate, self.opt.profile_s, targets)
        if spy.wait(timeout=self.opt.profile_s + 30) != 0 or not raw.exists():
            log("py-spy failed (ptrace not permitted?): no profile")
            return
        with raw.open(encoding="utf-8") as lines:
            summary = summarize_profile(parse_collapsed(lines))
        self.results["profile"] = {"rate": rate, "step": step, "raw": str(raw), **summary}
        log("authz profile:\n" + format_profile(summary))

    def _hostile_session(self, rig: Rig) -> None:
        """The hostile step (bench.hostile) on a fresh authz setup."""
        o = self.opt
        with rig.setup("authz", f"keys-{o.keys}") as running:
            self._sanity(running)
            legit = self._targets(running, "hostile-legit", self.skewed)
            self._warmup(running, legit)
            count = int(o.hostile_rate * o.hostile_step_s * 1.2) + 10
            hostile = write_hostile_targets(
                self.run_dir / "targets" / f"{running.name}-hostile.txt", running.url, count
            )
            rate = o.hostile_legit_rate
            out: dict[str, Any] = {
                "legit_rate": rate,
                "hostile_rate": o.hostile_rate,
                "slow_clients": o.hostile_slow,
                "memory_before": self._memory(running),
            }
            self.results["hostile"] = out
            time.sleep(SETTLE_S)
            _, out["quiet"] = self._step(
                running, f"legit-{rate}-quiet", rate, o.hostile_step_s, legit
            )
            time.sleep(SETTLE_S)
            attack = Attack(f"{running.name}-hostile", o.hostile_rate, o.hostile_step_s, hostile)
            done: list[LoadRun | BaseException] = []

            def send_hostile() -> None:
                try:
                    done.append(run_attack(self.bin.vegeta, attack, self.run_dir / "results"))
                except BaseException as exc:  # re-raised in the main thread below
                    done.append(exc)

            port = int(running.url.rsplit(":", 1)[1])
            tally = Tally()
            sender = threading.Thread(target=send_hostile, name="hostile", daemon=True)
            with Slowloris(HOST, port, o.hostile_slow, tally, interval_s=0.2) as slow:
                sender.start()
                _, loaded = self._step(
                    running, f"legit-{rate}-under-attack", rate, o.hostile_step_s, legit
                )
                sender.join(timeout=o.hostile_step_s + 60)
            if not done:
                raise RuntimeError("the hostile vegeta did not finish")
            if isinstance(done[0], BaseException):
                raise RuntimeError(f"hostile load failed: {done[0]}") from done[0]
            run = done[0]
            # The hostile vegeta ran beside the step: its CPU is ours, not a neighbour's.
            loaded["foreign_cpu_cores"] = round(
                max(0.0, loaded["foreign_cpu_cores"] - run.loadgen_cpu_s / o.hostile_step_s), 3
            )
            loaded["hostile_loadgen_cpu_s"] = run.loadgen_cpu_s
            out["loaded"] = loaded
            out["hostile"] = run.step.to_json()
            out["slow"] = {"opened": slow.opened, "answers": tally.matching(lambda _: True)}
            out["memory_after"] = self._memory(running)
            out["ratios"] = hostile_ratios(out["quiet"]["step"], loaded["step"])
            log(format_hostile(out))

    # -- the run ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Build, measure, save; returns the results document."""
        o = self.opt
        started = time.monotonic()
        self.results["started"] = self.stamp
        self.results["options"] = asdict(o)
        self.results["environment"] = self.environment()
        bundles = self.build_bundles()
        authz_src = self.export_authz()
        rig = Rig(
            self.root,
            self.run_dir,
            bundles,
            self.bin,
            envoy_concurrency=o.envoy_concurrency,
            authz_env={**o.authz_env, **({"PYTHONPATH": str(authz_src)} if authz_src else {})},
            opa_socket=o.opa_socket,
        )
        plan = o.plan()
        self.results["plan"] = {setup: list(workloads) for setup, workloads in plan.items()}
        with rig:
            self._shared_pids = [p for p in rig.shared_pids() if p]
            for setup, workloads in plan.items():
                missing = {"peer": self.bin.peer, "ceiling": self.bin.ceiling}
                if setup in missing and missing[setup] is None:
                    what = "opa-envoy-plugin" if setup == "peer" else "bench/ceiling"
                    self._error(setup, f"no {what} binary (see scripts/bench --help)")
                    continue
                for workload in workloads:
                    self._guarded(setup, partial(self._workload_session, rig, setup, workload))
            for setup in o.scale_setups():
                if setup == "peer" and self.bin.peer is None:
                    continue
                for size in o.scale_sizes:
                    if size not in self._scaled.get(setup, set()):
                        self._guarded(setup, partial(self._scale_session, rig, setup, size))
            if o.runs("hostile"):
                self._guarded("authz", partial(self._hostile_session, rig))
        self.results["ratios"] = report.ratios(self.results)
        self.results["workload_ratios"] = report.workload_ratios(self.results)
        self.results["noisy_steps"] = report.noisy_steps(self.results, FOREIGN_CPU_WARN)
        self.results["elapsed_s"] = round(time.monotonic() - started, 1)
        if not o.keep_run:
            shutil.rmtree(self.run_dir / "bundles", ignore_errors=True)
            shutil.rmtree(self.run_dir / "data", ignore_errors=True)
            shutil.rmtree(self.run_dir / "targets", ignore_errors=True)
            # authz's working directories: its audit database grows by every decision.
            for workdir in self.run_dir.glob("*-authz"):
                shutil.rmtree(workdir, ignore_errors=True)
        return self.results

    def _guarded(self, setup: str, session: Callable[[], None]) -> None:
        self.wait_quiet(setup)
        try:
            session()
        except (StackError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self._error(setup, str(exc))

    def _error(self, setup: str, message: str) -> None:
        log(f"{setup}: FAILED: {message}")
        self.results["errors"].append({"setup": setup, "error": message})

    def save(self) -> tuple[Path, Path | None]:
        """Write the JSON results and the PNG plot (None when matplotlib is missing)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"results-{self.stamp}.json"
        path.write_text(json.dumps(self.results, indent=1, default=str), encoding="utf-8")
        if not self.results["setups"]:  # the hostile step alone: nothing to draw
            return path, None
        try:
            png = report.plot(
                self.results, self.opt.rates, self.out_dir / f"latency-{self.stamp}.png"
            )
        except ImportError:
            log("matplotlib not installed: no plot")
            png = None
        return path, png
