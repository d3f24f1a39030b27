"""authz's decision-cache hit rate over a load step, from its metrics endpoint.

authz counts every cache lookup in ``authz_decision_cache_lookups_total{result="hit"}``
and ``{result="miss"}`` (:mod:`authz.runtime.metrics`, served at ``GET /metrics`` on the
admin port in the Prometheus text format,
https://prometheus.io/docs/instrumenting/exposition_formats/). The benchmark reads both
before and after each step; the difference is that step's lookups. Steps add up
(:func:`combine`) to a workload's hit rate.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["LOOKUPS_METRIC", "Lookups", "combine", "lookups", "parse_lookups", "read_lookups"]

# The counter's family name (the parser strips the ``_total`` suffix).
LOOKUPS_METRIC: Final = "authz_decision_cache_lookups"

Lookups = tuple[int, int]  # (hits, misses)


def parse_lookups(text: str) -> Lookups:
    """(hits, misses) from a Prometheus text exposition; (0, 0) when authz exposes no
    cache counter (a build without a decision cache). Raises ValueError on text that is
    not the exposition format."""
    counts = {"hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != LOOKUPS_METRIC:
            continue
        for sample in family.samples:
            result = sample.labels.get("result")
            if sample.name.endswith("_total") and result in counts:
                counts[result] += sample.value
    return int(counts["hit"]), int(counts["miss"])


def read_lookups(admin_url: str, timeout_s: float = 5.0) -> Lookups:
    """:func:`parse_lookups` of ``GET <admin_url>/metrics``. Raises OSError when authz
    does not answer."""
    request = urllib.request.Request(admin_url + "/metrics")  # noqa: S310 (loopback http)
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310
        return parse_lookups(resp.read().decode("utf-8"))


def lookups(before: Lookups, after: Lookups) -> dict[str, Any]:
    """A step's record: ``{"hits", "misses", "hit_rate"}`` between two readings
    (``hit_rate`` None when there was no lookup)."""
    hits, misses = after[0] - before[0], after[1] - before[1]
    total = hits + misses
    return {"hits": hits, "misses": misses, "hit_rate": hits / total if total else None}


def combine(records: Iterable[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The sum of step records (None ones skipped) as one record; None without any."""
    present = [r for r in records if r]
    if not present:
        return None
    hits = sum(int(r["hits"]) for r in present)
    misses = sum(int(r["misses"]) for r in present)
    total = hits + misses
    return {"hits": hits, "misses": misses, "hit_rate": hits / total if total else None}
