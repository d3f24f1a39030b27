"""authz.runtime.metrics: the decision cache's bounds are visible (issue #13, finding 3)."""

from __future__ import annotations

from authz.core.cache import DecisionCache
from authz.core.decision import Decision
from authz.core.opa import Evaluation
from authz.runtime.metrics import Metrics
from tests.helpers.fakes import ManualClock


def test_decision_cache_metrics_show_bytes_entries_and_dropped_puts() -> None:
    cache = DecisionCache(max_bytes=1 << 20, clock=ManualClock(100.0))
    metrics = Metrics()
    metrics.watch_decision_cache(cache)
    started = cache.generation
    decision = Decision(allowed=True, identity={"key_id": "k1"})
    cache.put(b"a" * 32, decision, Evaluation(True, {"b": "r1"}), "d1", generation=started)
    cache.get(b"a" * 32)
    cache.get(b"b" * 32)
    cache.clear("overrides changed")
    cache.put(b"a" * 32, decision, Evaluation(True, {"b": "r1"}), "d2", generation=started)
    cache.put(b"c" * 32, decision, Evaluation(True, {"b": "r1"}), "d3", generation=cache.generation)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("authz_decision_cache_bytes") == cache.bytes > 0
    assert value("authz_decision_cache_max_bytes") == 1 << 20
    assert value("authz_decision_cache_entries") == 1
    assert value("authz_decision_cache_lookups_total", result="hit") == 1
    assert value("authz_decision_cache_lookups_total", result="miss") == 1
    assert value("authz_decision_cache_stale_puts_total") == 1
