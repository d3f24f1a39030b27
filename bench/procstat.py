"""CPU time and memory of a process, from its own counters in ``/proc`` (Linux).

CPU is ``utime + stime`` of ``/proc/<pid>/stat`` (all threads, in clock ticks; see
proc(5)); memory is ``VmRSS`` (now) and ``VmHWM`` (peak resident set) of
``/proc/<pid>/status``, in KiB; context switches are ``voluntary_ctxt_switches`` and
``nonvoluntary_ctxt_switches`` of each thread's ``/proc/<pid>/task/<tid>/status``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = [
    "cpu_seconds",
    "parse_cpu_ticks",
    "parse_status_kb",
    "parse_switches",
    "read_cpu_seconds",
    "read_memory",
    "read_switches",
]

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
# Fields 14 and 15 of proc(5)'s stat line, counted from the first field after "(comm)".
_UTIME: Final = 14 - 3
_STIME: Final = 15 - 3


def parse_cpu_ticks(stat: str) -> int:
    """``utime + stime`` (clock ticks) from the text of ``/proc/<pid>/stat``. The command
    name (field 2) may hold spaces and parentheses, so fields count from its last ``)``.
    Raises ValueError on text of another shape."""
    _, paren, rest = stat.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) <= _STIME:
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}")
    return int(fields[_UTIME]) + int(fields[_STIME])


def cpu_seconds(ticks: int) -> float:
    """Clock ticks as seconds."""
    return ticks / CLOCK_TICKS


def read_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used so far."""
    return cpu_seconds(parse_cpu_ticks(Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")))


def parse_status_kb(status: str, field: str) -> int | None:
    """The value in KiB of ``field`` (e.g. ``VmHWM``) in the text of
    ``/proc/<pid>/status``, or None when absent."""
    prefix = f"{field}:"
    for line in status.splitlines():
        if line.startswith(prefix):
            parts = line[len(prefix) :].split()
            if parts and parts[-1].lower() == "kb":
                return int(parts[0])
    return None


def read_memory(pid: int) -> dict[str, int | None]:
    """``{"rss_kb": VmRSS, "hwm_kb": VmHWM}`` of process ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    return {"rss_kb": parse_status_kb(status, "VmRSS"), "hwm_kb": parse_status_kb(status, "VmHWM")}


def parse_switches(status: str) -> tuple[int, int]:
    """``(voluntary, involuntary)`` context switches from the text of a
    ``/proc/<pid>/task/<tid>/status`` (proc(5)); (0, 0) for fields absent."""
    counts = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in counts:
            counts[name] = int(value)
    return counts["voluntary_ctxt_switches"], counts["nonvoluntary_ctxt_switches"]


def read_switches(pid: int) -> tuple[int, int]:
    """``(voluntary, involuntary)`` context switches of every live thread of process
    ``pid`` so far (a thread that has exited no longer counts)."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            v, n = parse_switches((task / "status").read_text(encoding="utf-8"))
        except OSError:  # the thread exited meanwhile
            continue
        voluntary += v
        involuntary += n
    return voluntary, involuntary
