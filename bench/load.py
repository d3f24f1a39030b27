"""Drive load with vegeta: constant-rate open loop, or closed loop with N workers.

Open loop (``rate > 0``): vegeta sends at the target rate whatever the answers do,
adding workers (connections) as needed, so queueing shows in the latencies instead of
slowing the sender (no coordinated omission). The workers are capped at
``OPEN_LOOP_MAX_WORKERS``: an overloaded setup would otherwise get thousands of new
connections, hit Envoy's default circuit breakers (1,024 pending requests: 503s) and
leave the kernel full of TIME_WAIT sockets that slow the next step. At the cap vegeta
falls behind its schedule, which the step reports (``sent_rps``) and
``stats.sustained`` rejects. Closed loop (``rate == 0``): ``workers`` connections send
back to back, which finds the saturation throughput.

Results are decoded (``vegeta encode --to csv``) straight into the summary; the CPU
vegeta used (its own rusage) is returned with it, since the load generator shares the
machine's cores with the setup under test.
"""

from __future__ import annotations

import io
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.stats import Step, parse_csv, summarize

__all__ = ["OPEN_LOOP_MAX_WORKERS", "Attack", "LoadRun", "attack_argv", "run_attack"]

# In flight at most, open loop: 512 requests at 1,000 rps is half a second of queue.
OPEN_LOOP_MAX_WORKERS: Final = 512


@dataclass(frozen=True, slots=True)
class Attack:
    """One load step: ``rate`` rps (0 = closed loop with ``workers``) for
    ``duration_s`` seconds over the requests in ``targets`` (a vegeta http targets file,
    cycled), each request timing out after ``timeout_s``."""

    name: str
    rate: int
    duration_s: float
    targets: Path
    workers: int = 32
    timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class LoadRun:
    """A finished step: its summary and the CPU seconds vegeta used."""

    step: Step
    loadgen_cpu_s: float


def attack_argv(vegeta: str, attack: Attack, output: Path) -> list[str]:
    """The ``vegeta attack`` command line for ``attack``, writing results to ``output``."""
    argv = [
        vegeta,
        "attack",
        f"-name={attack.name}",
        f"-targets={attack.targets}",
        "-format=http",
        f"-duration={attack.duration_s:g}s",
        f"-timeout={attack.timeout_s:g}s",
        "-keepalive=true",
        f"-output={output}",
    ]
    if attack.rate > 0:
        argv += [f"-rate={attack.rate}/1s", f"-max-workers={OPEN_LOOP_MAX_WORKERS}"]
    else:
        argv += ["-rate=0", f"-workers={attack.workers}", f"-max-workers={attack.workers}"]
    return argv


def run_attack(
    vegeta: str, attack: Attack, out_dir: Path, *, keep_results: bool = False
) -> LoadRun:
    """Run ``attack`` to completion and summarize it; vegeta's binary results stay in
    ``out_dir`` when ``keep_results``. Raises RuntimeError if vegeta fails (the message
    holds its stderr)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / f"{attack.name}.bin"
    proc = subprocess.Popen(
        attack_argv(vegeta, attack, results),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    # wait4 gives the child's own rusage (the CPU it burned sending the load).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"vegeta attack {attack.name} failed: {stderr.decode(errors='replace')}")
    encoder = subprocess.Popen(
        [vegeta, "encode", "--to", "csv", str(results)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert encoder.stdout is not None
    with io.TextIOWrapper(encoder.stdout, encoding="utf-8", newline="") as lines:
        records = parse_csv(lines)
    if encoder.wait() != 0:
        raise RuntimeError(f"vegeta encode {results} failed")
    if not keep_results:
        results.unlink()
    step = summarize(attack.name, attack.rate, attack.duration_s, records)
    return LoadRun(step, round(usage.ru_utime + usage.ru_stime, 2))
