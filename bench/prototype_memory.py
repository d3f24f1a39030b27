"""Memory a cached allow's response prototype takes, against what the cache accounts.

Not a test (numbers, no assertions); backs ``PROTOTYPE_OVERHEAD`` and
``PROTOTYPE_PER_ELEMENT`` in :mod:`authz.core.response`::

    python -m bench.prototype_memory [--number 20000]

For each decision shape, builds ``--number`` :class:`authz.core.response.ResponsePrototype`
objects and prints the growth of the process's resident memory (``/proc/self/statm``;
upb keeps messages in arenas that ``tracemalloc`` does not see) per prototype, next to the
size the decision cache accounts for one (``ResponsePrototype.size``). Linux only.
"""

from __future__ import annotations

import argparse
import gc
import os
from typing import Any, Final

from authz.core.decision import parse_decision
from authz.core.response import ResponsePrototype

# The shipped gateway policy's allow (as bench/hit_cost.py), then the smallest allow and
# 20 headers plus 20 metadata fields of 1 and of 200 characters.
SHAPES: Final[dict[str, Any]] = {
    "gateway allow": {
        "allowed": True,
        "headers": {"x-authz-key-id": "k1", "x-authz-role": "reader", "x-authz-tier": "standard"},
        "request_headers_to_remove": ["authorization", "x-api-key"],
        "dynamic_metadata": {"key_id": "k1", "role": "reader", "tier": "standard"},
    },
    "empty allow": {"allowed": True},
    "40 fields of 1 char": {
        "allowed": True,
        "headers": {f"x-h{i}": "v" for i in range(20)},
        "dynamic_metadata": {f"k{i}": "v" for i in range(20)},
    },
    "40 fields of 200 chars": {
        "allowed": True,
        "headers": {f"x-h{i}": "v" * 200 for i in range(20)},
        "dynamic_metadata": {f"k{i}": "v" * 200 for i in range(20)},
    },
}


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(number: int) -> list[tuple[str, int, float, int]]:
    """``(shape, encoded bytes, resident bytes per prototype, accounted bytes)``."""
    rows = []
    for name, result in SHAPES.items():
        decision = parse_decision(result)
        gc.collect()
        before = _rss()
        kept = [ResponsePrototype(decision) for _ in range(number)]
        gc.collect()
        grown = (_rss() - before) / number
        rows.append((name, kept[0].message.ByteSize(), grown, kept[0].size))
        del kept
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000, help="prototypes per shape")
    args = parser.parse_args(argv)
    print(f"{'shape':28} {'encoded':>8} {'resident':>9} {'accounted':>9}")
    for name, encoded, resident, accounted in measure(args.number):
        print(f"{name:28} {encoded:8d} {resident:9.0f} {accounted:9d}")


if __name__ == "__main__":
    main()
