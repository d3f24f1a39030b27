"""Reading a process's CPU time and memory from /proc text."""

from __future__ import annotations

import os

import pytest

from bench.procstat import (
    parse_cpu_ticks,
    parse_status_kb,
    parse_switches,
    read_cpu_seconds,
    read_memory,
    read_switches,
)

# proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
# cmajflt utime stime ...; the command name may hold spaces and parentheses.
STAT = "4242 (python3 -m (x) y) S 1 4242 4242 0 -1 4194560 2573 0 0 0 150 25 0 0 20 0 3 0"


def test_cpu_ticks_is_utime_plus_stime() -> None:
    assert parse_cpu_ticks(STAT) == 175


@pytest.mark.parametrize("text", ["", "4242 (x) S 1 2", "no parenthesis at all"])
def test_cpu_ticks_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="stat"):
        parse_cpu_ticks(text)


STATUS = """Name:\topa
VmPeak:\t 1331940 kB
VmHWM:\t   91252 kB
VmRSS:\t   80120 kB
Threads:\t14
"""


@pytest.mark.parametrize(
    ("field", "kb"), [("VmHWM", 91252), ("VmRSS", 80120), ("VmSwap", None), ("Threads", None)]
)
def test_status_kb(field: str, kb: int | None) -> None:
    assert parse_status_kb(STATUS, field) == kb


def test_reads_this_process() -> None:
    assert read_cpu_seconds(os.getpid()) > 0
    memory = read_memory(os.getpid())
    assert memory["rss_kb"] is not None
    assert memory["hwm_kb"] is not None
    assert memory["hwm_kb"] >= memory["rss_kb"]


def test_switches_are_voluntary_and_involuntary_of_the_status_text() -> None:
    text = STATUS + "voluntary_ctxt_switches:\t1234\nnonvoluntary_ctxt_switches:\t56\n"
    assert parse_switches(text) == (1234, 56)
    assert parse_switches(STATUS) == (0, 0)


def test_switches_of_this_process_grow_when_it_sleeps() -> None:
    import time

    before = read_switches(os.getpid())
    for _ in range(3):
        time.sleep(0.005)  # each sleep gives up the CPU: a voluntary switch
    voluntary, involuntary = read_switches(os.getpid())
    assert voluntary >= before[0] + 3
    assert involuntary >= before[1]
