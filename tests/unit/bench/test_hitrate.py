"""authz's decision-cache hit rate from its /metrics text, per step and per workload."""

from __future__ import annotations

import pytest

from bench.hitrate import combine, lookups, parse_lookups

EXPOSITION = """\
# HELP authz_decisions_total Decisions.
# TYPE authz_decisions_total counter
authz_decisions_total{mode="enforce",path="authz/gateway/decision",reason="ok",result="allow"} 990.0
# HELP authz_decision_cache_lookups_total Decision cache lookups.
# TYPE authz_decision_cache_lookups_total counter
authz_decision_cache_lookups_total{result="hit"} 900.0
authz_decision_cache_lookups_total{result="miss"} 90.0
# HELP authz_decision_cache_entries Entries.
# TYPE authz_decision_cache_entries gauge
authz_decision_cache_entries 85.0
"""


def test_parse_lookups_reads_hits_and_misses_only() -> None:
    assert parse_lookups(EXPOSITION) == (900, 90)


def test_parse_lookups_without_a_cache_counter_is_zero() -> None:
    assert parse_lookups('# TYPE authz_mode gauge\nauthz_mode{mode="enforce"} 1.0\n') == (0, 0)


def test_parse_lookups_rejects_text_that_is_not_the_exposition_format() -> None:
    with pytest.raises(ValueError, match="metric"):
        parse_lookups("<html>not metrics</html>\n")


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ((900, 90), (1800, 190), {"hits": 900, "misses": 100, "hit_rate": 0.9}),
        ((5, 5), (5, 15), {"hits": 0, "misses": 10, "hit_rate": 0.0}),
        ((5, 5), (5, 5), {"hits": 0, "misses": 0, "hit_rate": None}),
    ],
    ids=["mostly-hits", "every-key-new", "no-lookup"],
)
def test_step_lookups_are_the_difference_of_two_readings(
    before: tuple[int, int], after: tuple[int, int], expected: dict[str, object]
) -> None:
    assert lookups(before, after) == expected


def test_a_workload_hit_rate_weighs_steps_by_their_lookups() -> None:
    # Not the mean of the steps' rates (0.5 and 0.9): 100 + 9,000 of 200 + 10,000.
    steps = [
        {"hits": 100, "misses": 100, "hit_rate": 0.5},
        None,  # a step without a reading (a setup without authz)
        {"hits": 9_000, "misses": 1_000, "hit_rate": 0.9},
    ]
    combined = combine(steps)
    assert combined is not None
    assert (combined["hits"], combined["misses"]) == (9_100, 1_100)
    assert combined["hit_rate"] == pytest.approx(9_100 / 10_200)
    assert combine([None, None]) is None
