"""The hostile step: legitimate throughput and p99 with and without hostile load.

One authz setup, fresh (its caches empty), serves the skewed legitimate workload at a
fixed rate twice, ``step_s`` seconds each: *quiet* (alone), then *loaded* (while a
second vegeta sends hostile requests at a fixed rate and slow clients hold connections
open). The hostile requests are the attack suite's own (``tests/helpers/hostile.py``,
:func:`~tests.helpers.hostile.gateway_mix`: one in five a body bomb, the rest distinct
keyless requests with ~48 KB of random headers, unknown keys, header floods and huge
headers, all without a valid credential). The result, from that one run::

    hostile/quiet throughput 0.97, p99 1.4x

is the loaded step's successful legitimate answers per second and p99 over the quiet
step's. It also counts how the hostile requests were answered; any 2xx among them is a
request without a valid credential that got through (printed as ``allowed``).

Pure functions here (targets, ratios, formatting); ``bench.run`` runs the steps.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from tests.helpers.hostile import gateway_mix, vegeta_targets

__all__ = [
    "HOSTILE_SEED",
    "format_hostile",
    "hostile_ratios",
    "write_hostile_targets",
]

HOSTILE_SEED: Final = 13
NA: Final = "n/a"


def write_hostile_targets(
    path: Path, url: str, count: int, seed: int = HOSTILE_SEED, body_dir: Path | None = None
) -> Path:
    """Write ``count`` requests of :func:`~tests.helpers.hostile.gateway_mix` (seeded) as a
    vegeta ``http`` targets file at ``path`` against gateway base ``url``; bodies go to
    ``body_dir`` (default: ``<path's directory>/bodies``). Returns ``path``."""
    rng = random.Random(seed)  # noqa: S311 (reproducible load, not security)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = vegeta_targets(gateway_mix(rng, count), url, body_dir or path.parent / "bodies")
    path.write_text(text, encoding="utf-8")
    return path


def _number(step: Mapping[str, Any] | None, *keys: str) -> float | None:
    node: Any = step
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def hostile_ratios(
    quiet: Mapping[str, Any] | None, loaded: Mapping[str, Any] | None
) -> dict[str, float | None]:
    """``hostile/quiet throughput`` and ``hostile/quiet p99`` from the two legitimate
    steps (``Step.to_json()`` dicts); None where either side is missing or zero."""
    return {
        "hostile/quiet throughput": _ratio(
            _number(loaded, "throughput"), _number(quiet, "throughput")
        ),
        "hostile/quiet p99": _ratio(
            _number(loaded, "latency_ms", "p99"), _number(quiet, "latency_ms", "p99")
        ),
    }


def allowed(hostile_step: Mapping[str, Any] | None) -> int:
    """Hostile requests answered 2xx (``codes`` of a ``Step.to_json()``)."""
    codes = (hostile_step or {}).get("codes") or {}
    return sum(n for code, n in codes.items() if str(code).isdigit() and 200 <= int(code) < 300)


def format_hostile(result: Mapping[str, Any]) -> str:
    """The hostile step's summary line, e.g. ``hostile/quiet throughput 0.97, p99 1.4x
    (legitimate 100 rps, hostile 10 rps: 110 sent, 0 allowed, codes {...}; 20 slow
    clients; authz RSS 64 -> 66 MB)``; ``result``
    is ``results["hostile"]`` as ``bench.run`` saves it."""
    values = hostile_ratios(_step(result, "quiet"), _step(result, "loaded"))
    throughput, p99 = values["hostile/quiet throughput"], values["hostile/quiet p99"]
    bad = result.get("hostile") or {}
    slow = result.get("slow") or {}
    answers = slow.get("answers") or {}
    return (
        f"hostile/quiet throughput {NA if throughput is None else f'{throughput:.2f}'}, "
        f"p99 {NA if p99 is None else f'{p99:.1f}x'} "
        f"(legitimate {result.get('legit_rate', NA)} rps, hostile {result.get('hostile_rate', NA)}"
        f" rps: {bad.get('requests', 0)} sent, {allowed(bad)} allowed, codes "
        f"{bad.get('codes', {})}; {slow.get('opened', 0)} slow clients"
        + (f", answered {answers}" if answers else "")
        + f"; authz RSS {_rss_mb(result, 'memory_before')} -> {_rss_mb(result, 'memory_after')}"
        " MB)"
    )


def _rss_mb(result: Mapping[str, Any], when: str) -> str:
    kb = _number(result.get(when), "authz", "rss_kb")
    return NA if kb is None else f"{kb / 1024:.0f}"


def _step(result: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    record = result.get(name)
    if not isinstance(record, Mapping):
        return None
    step = record.get("step")
    return step if isinstance(step, Mapping) else None
