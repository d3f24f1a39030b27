"""One load step's results: parse vegeta's per-request records, summarize, judge.

vegeta writes every request's result; ``vegeta encode --to csv`` gives one CSV row per
request: ``timestamp`` (ns since the epoch, when the request was sent), ``code`` (HTTP
status, 0 on a transport error), ``latency`` (ns), ``bytes_out``, ``bytes_in``,
``error``, then body, attack name, sequence, method, URL and headers (unused here).
Percentiles are computed here from every latency (nearest rank), not from a histogram.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

__all__ = [
    "PERCENTILES",
    "Record",
    "Step",
    "parse_csv",
    "percentile",
    "summarize",
    "sustained",
]

# Reported for every step (and drawn in the plot).
PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)
# A step sustains its rate when responses and sends both kept up to within this share.
KEEP_UP: Final = 0.95


@dataclass(frozen=True, slots=True)
class Record:
    """One request: sent at ``start_ns``, answered ``code`` after ``latency_ns``."""

    start_ns: int
    code: int
    latency_ns: int
    error: str = ""

    @property
    def ok(self) -> bool:
        """A 2xx answer with no transport error."""
        return 200 <= self.code < 300 and not self.error


def parse_csv(lines: Iterable[str]) -> list[Record]:
    """Records from ``vegeta encode --to csv`` output (no header row). Raises ValueError
    on a row with fewer than 6 fields or non-integer timestamp, code or latency."""
    records = []
    for row in csv.reader(lines):
        if not row:
            continue
        if len(row) < 6:
            raise ValueError(f"vegeta csv row has {len(row)} fields, expected >= 6: {row!r}")
        records.append(Record(int(row[0]), int(row[1]), int(row[2]), row[5]))
    return records


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 < q <= 100) of ascending ``sorted_values`` by the
    nearest-rank method: the smallest value with at least q% of values <= it. Raises
    ValueError on an empty sequence or q out of range."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    # Rounded first so float error (99.9 / 100 * 1000 = 999.0000000000001) cannot
    # push the rank up by one.
    rank = math.ceil(round(q / 100 * len(sorted_values), 9))
    return sorted_values[max(rank, 1) - 1]


@dataclass(frozen=True, slots=True)
class Step:
    """Summary of one load step.

    ``rate`` is the target (0 = closed loop, as fast as ``workers`` allow); ``sent_rps``
    the rate requests actually went out; ``throughput`` successful answers per second
    from the first send to the last answer. Latencies are milliseconds over all requests
    (``latency_ms`` maps ``"p50"``, ``"p90"``, ``"p99"``, ``"p99.9"``, ``"max"``,
    ``"mean"``).
    """

    name: str
    rate: int
    duration_s: float
    requests: int
    ok: int
    errors: int
    sent_rps: float
    throughput: float
    latency_ms: dict[str, float]
    codes: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _label(q: float) -> str:
    return f"p{q:g}"


def summarize(name: str, rate: int, duration_s: float, records: Sequence[Record]) -> Step:
    """Summarize ``records`` of a step that targeted ``rate`` rps for ``duration_s``."""
    if not records:
        return Step(name, rate, duration_s, 0, 0, 0, 0.0, 0.0, {}, {}, ["no requests"])
    ok = sum(1 for r in records if r.ok)
    first = min(r.start_ns for r in records)
    last_sent = max(r.start_ns for r in records)
    last_done = max(r.start_ns + r.latency_ns for r in records)
    sent_span_s = max((last_sent - first) / 1e9, 1e-9)
    span_s = max((last_done - first) / 1e9, 1e-9)
    # n requests span n-1 intervals at a constant rate.
    sent_rps = (len(records) - 1) / sent_span_s if len(records) > 1 else 0.0
    latencies = sorted(r.latency_ns / 1e6 for r in records)
    latency_ms = {_label(q): round(percentile(latencies, q), 3) for q in PERCENTILES}
    latency_ms["max"] = round(latencies[-1], 3)
    latency_ms["mean"] = round(sum(latencies) / len(latencies), 3)
    codes = Counter(str(r.code) for r in records)
    errors = Counter(r.error for r in records if r.error)
    return Step(
        name=name,
        rate=rate,
        duration_s=duration_s,
        requests=len(records),
        ok=ok,
        errors=len(records) - ok,
        sent_rps=round(sent_rps, 1),
        throughput=round(ok / span_s, 1),
        latency_ms=latency_ms,
        codes=dict(sorted(codes.items())),
        error_samples=[f"{count}x {text}" for text, count in errors.most_common(3)],
    )


def sustained(step: Step, max_p99_ms: float) -> tuple[bool, str]:
    """Whether an open-loop ``step`` sustained its rate: zero errors, requests sent and
    answered at >= 95% of the target rate (no backlog left to drain), and p99 within
    ``max_p99_ms`` (no queue building up). Returns (verdict, reason)."""
    if step.requests == 0:
        return False, "no requests"
    if step.errors:
        return False, f"{step.errors} errors {step.codes}"
    if step.rate and step.sent_rps < KEEP_UP * step.rate:
        return False, f"sent only {step.sent_rps:.0f} rps"
    if step.rate and step.throughput < KEEP_UP * step.rate:
        return False, f"answered only {step.throughput:.0f} rps"
    p99 = step.latency_ms.get("p99", math.inf)
    if p99 > max_p99_ms:
        return False, f"p99 {p99:.1f} ms > {max_p99_ms:g} ms"
    return True, "ok"
