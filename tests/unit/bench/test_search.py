"""The max-sustained-rate bisection, against simulated setups."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.search import GRANULARITY, Bisection


def run(search: Bisection, sustains: Callable[[int], bool], budget: int = 20) -> list[int]:
    rates = []
    for _ in range(budget):
        rate = search.next_rate()
        if rate is None:
            break
        rates.append(rate)
        search.record(rate, sustains(rate))
    return rates


@pytest.mark.parametrize("capacity", [450, 800, 1234, 1990])
def test_converges_to_the_capacity(capacity: int) -> None:
    search = Bisection(lo=400, hi=2000)
    rates = run(search, lambda r: r <= capacity)
    assert search.best is not None
    assert search.best <= capacity
    assert capacity - search.best <= max(GRANULARITY, 0.03 * 2000)
    assert len(rates) <= 12


def test_five_steps_give_a_few_percent() -> None:
    search = Bisection(lo=0.4 * 3000, hi=1.05 * 3000)
    run(search, lambda r: r <= 2500, budget=5)
    assert search.best is not None
    assert 2500 - search.best <= 0.03 * 3150


def test_a_wrong_lower_bound_is_searched_below() -> None:
    search = Bisection(lo=400, hi=1000)
    rates = run(search, lambda r: r <= 150)
    assert min(rates) < 400
    assert search.best is not None
    assert search.best <= 150
    assert search.best >= 100


def test_best_is_always_measured() -> None:
    # The bounds are already within tolerance: the assumed lower bound is measured.
    search = Bisection(lo=400, hi=410)
    rates = run(search, lambda r: r <= 400)
    assert rates[0] == 400
    assert search.best == 400
    assert search.ceiling_measured


def test_nothing_sustains() -> None:
    search = Bisection(lo=40, hi=100)
    rates = run(search, lambda r: False)
    assert search.best is None
    assert rates  # it tried, going down
    assert min(rates) <= 20


def test_noise_below_a_success_stops_the_search() -> None:
    search = Bisection(lo=400, hi=1000)
    search.record(700, ok=True)
    search.record(650, ok=False)
    assert search.best == 700
    assert search.next_rate() is None


@pytest.mark.parametrize(
    ("lo", "hi"), [(0, 10), (10, 10), (20, 10)], ids=["zero", "equal", "inverted"]
)
def test_rejects_bad_bounds(lo: float, hi: float) -> None:
    with pytest.raises(ValueError, match="lo < hi"):
        Bisection(lo=lo, hi=hi)


def test_a_ceiling_guess_that_is_too_low_is_raised() -> None:
    search = Bisection(lo=400, hi=1000)
    run(search, lambda r: r <= 1300, budget=12)
    assert search.ceiling_measured
    assert search.best is not None
    assert 1000 < search.best <= 1300


def test_out_of_steps_going_up_leaves_the_ceiling_unmeasured() -> None:
    search = Bisection(lo=400, hi=1000)
    run(search, lambda r: True, budget=3)
    assert not search.ceiling_measured
