"""Where authz spends its CPU: py-spy samples of the running process, summarized.

``py-spy record --format raw`` writes collapsed stacks, one line per distinct stack:
``frame;frame;...;leaf <count>``, each frame ``function (path:line)`` with ``path``
relative to its ``sys.path`` entry (``authz/core/input.py``, ``aiohttp/client.py``).

Two views, both as shares of the active samples (samples whose leaf is a thread
waiting on a lock or queue are counted apart as idle):

- **by stage**: each sample goes to the innermost authz frame's file (``authz/core/input.py``
  is input building, ``authz/core/opa.py`` the OPA call, ...), or, with no authz frame on
  the stack, to the library of its leaf (gRPC machinery, the event loop, ...);
- **by library, inclusive**: the share of samples with a frame of that library anywhere
  on the stack (json under the OPA client counts for json *and* for the OPA call).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["Frame", "Profile", "format_profile", "parse_collapsed", "summarize_profile"]

_FRAME: Final = re.compile(r"^(?P<func>.*?) \((?P<path>[^()]*?)(?::\d+)?\)$")

# authz files -> stage names (innermost authz frame wins).
STAGES: Final = {
    "authz/core/input.py": "input building (CheckRequest -> input)",
    "authz/core/opa.py": "OPA call (HTTP client, JSON)",
    "authz/core/http1.py": "OPA call (HTTP client, JSON)",
    "authz/core/decision.py": "decision parsing",
    "authz/core/response.py": "response building",
    "authz/core/ratelimit.py": "rate limiting",
    "authz/runtime/servicer.py": "gRPC servicer",
    "authz/core/authorizer.py": "pipeline glue (authorizer)",
}
# Library path prefixes, first match wins.
LIBRARIES: Final = (
    ("grpc", ("grpc/", "grpc_health/")),
    ("protobuf", ("google/protobuf/",)),
    ("aiohttp", ("aiohttp/", "yarl/", "multidict/")),
    ("httptools", ("httptools/",)),
    ("json", ("json/", "orjson")),
    ("asyncio/uvloop", ("asyncio/", "uvloop/")),
    ("logging", ("logging/",)),
    ("prometheus", ("prometheus_client/",)),
    ("uuid", ("uuid.py",)),
    ("authz", ("authz/",)),
)
# A Python frame that is the leaf while the interpreter runs native code under the event
# loop: uvloop's I/O and grpc.aio's server (Cython over gRPC C-core), which py-spy cannot
# see into.
_NATIVE_LOOP: Final = frozenset(
    {
        ("asyncio/runners.py", "Runner.run"),
        ("asyncio/base_events.py", "BaseEventLoop.run_until_complete"),
        ("asyncio/base_events.py", "BaseEventLoop.run_forever"),
    }
)
NATIVE_LOOP_STAGE: Final = "native under the event loop (uvloop I/O, grpc.aio Cython/C-core)"
# Frames every sample of the main thread has: never a stage.
_ENTRY_POINTS: Final = frozenset({"authz/tools/cli.py", "authz/__main__.py"})
_IDLE_LEAVES: Final = frozenset(
    {("threading.py", "wait"), ("threading.py", "Condition.wait"), ("queue.py", "Queue.get")}
)


@dataclass(frozen=True, slots=True)
class Frame:
    """One stack frame: function name and module-relative path."""

    func: str
    path: str


@dataclass(frozen=True, slots=True)
class Profile:
    """Collapsed stacks (outermost frame first) with their sample counts."""

    stacks: list[tuple[tuple[Frame, ...], int]]

    @property
    def samples(self) -> int:
        """All samples."""
        return sum(count for _, count in self.stacks)


def _frame(text: str) -> Frame:
    match = _FRAME.match(text.strip())
    if match is None:
        return Frame(text.strip(), "")
    return Frame(match["func"], match["path"])


def parse_collapsed(lines: Iterable[str]) -> Profile:
    """Parse py-spy's raw (collapsed) output. Lines that do not end in a count are
    skipped."""
    stacks = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((tuple(_frame(f) for f in stack.split(";")), int(count)))
    return Profile(stacks)


def library(path: str) -> str:
    """The library a frame's path belongs to (``other`` when none matches)."""
    for name, prefixes in LIBRARIES:
        if path.startswith(prefixes):
            return name
    return "other"


def _idle(frames: tuple[Frame, ...]) -> bool:
    leaf = frames[-1]
    return (leaf.path, leaf.func) in _IDLE_LEAVES or leaf.path == "selectors.py"


def _stage(frames: tuple[Frame, ...]) -> str:
    if (frames[-1].path, frames[-1].func) in _NATIVE_LOOP:
        return NATIVE_LOOP_STAGE
    for frame in reversed(frames):
        if frame.path in STAGES:
            return STAGES[frame.path]
        if frame.path.startswith("authz/") and frame.path not in _ENTRY_POINTS:
            return f"other authz ({frame.path})"
    return f"{library(frames[-1].path)} (no authz frame)"


def _share(counter: Counter[str], total: int) -> dict[str, float]:
    return {name: round(100 * n / total, 1) for name, n in counter.most_common()} if total else {}


def summarize_profile(profile: Profile, top: int = 12) -> dict[str, Any]:
    """``{"samples", "idle_samples", "by_stage": {name: %}, "by_library": {name: %},
    "top_leaf_functions": {"func (path)": %}}``, percentages of active samples."""
    stages: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    active = idle = 0
    for frames, count in profile.stacks:
        if not frames:
            continue
        if _idle(frames):
            idle += count
            continue
        active += count
        stages[_stage(frames)] += count
        for name in {library(f.path) for f in frames if f.path not in _ENTRY_POINTS} - {"other"}:
            libraries[name] += count
        leaf = frames[-1]
        leaves[f"{leaf.func} ({leaf.path})"] += count
    return {
        "samples": profile.samples,
        "idle_samples": idle,
        "by_stage": _share(stages, active),
        "by_library": _share(libraries, active),
        "top_leaf_functions": dict(list(_share(leaves, active).items())[:top]),
    }


def format_profile(summary: Mapping[str, Any]) -> str:
    """The summary as indented text."""
    lines = [
        f"samples: {summary.get('samples', 0)} "
        f"({summary.get('idle_samples', 0)} idle-thread samples left out)"
    ]
    for title, key in (
        ("by stage (innermost authz frame)", "by_stage"),
        ("by library (anywhere on the stack)", "by_library"),
        ("top leaf functions (self time)", "top_leaf_functions"),
    ):
        lines.append(f"{title}:")
        lines.extend(f"  {share:5.1f}%  {name}" for name, share in summary.get(key, {}).items())
    return "\n".join(lines)
