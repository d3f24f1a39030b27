"""Max sustained rate: a closed-loop probe for the ceiling, then a bisection of
open-loop constant-rate steps below it.

The probe (``workers`` connections sending back to back) measures what the setup
answers when saturated, ``C``. Open-loop steps then bisect between an assumed-good lower
bound and ``C``: a step that sustains its rate (``stats.sustained``) raises the lower
bound, one that does not lowers the upper bound. The answer is the highest rate that
sustained; the caller bounds the number of steps, and so the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = ["GRANULARITY", "Bisection"]

# Rates are tried in multiples of this many rps.
GRANULARITY: Final = 10


@dataclass
class Bisection:
    """Bisect between ``lo`` (assumed sustainable, not yet measured) and ``hi`` (assumed
    not) rps, until the bounds are within ``tolerance`` of ``hi`` (or one granularity).

    Call :meth:`next_rate`, run the step, :meth:`record` the verdict. ``best`` is the
    highest rate measured as sustained (None until one is). A failure at or below ``lo``
    proves the assumption wrong, so ``lo`` halves and the search goes on downward; once
    the bounds meet without any success, ``lo`` itself is tried, so ``best`` is always a
    measured rate. A failure below a rate that sustained (noise) ends the search. While
    no rate has failed, ``hi`` is only a guess: a success that brings the bounds
    together raises it by half (``ceiling_measured`` says whether a failure bounds the
    answer from above).
    """

    lo: float
    hi: float
    tolerance: float = 0.03
    best: int | None = None
    tried: list[tuple[int, bool]] = field(default_factory=list)
    ceiling_measured: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.lo < self.hi:
            raise ValueError(f"need 0 < lo < hi, got lo={self.lo} hi={self.hi}")

    def next_rate(self) -> int | None:
        """The next rate to try (rps), or None when the search has converged."""
        tried = {rate for rate, _ in self.tried}
        mid = _round((self.lo + self.hi) / 2)
        if self._converged() or mid in tried:
            floor = _round(self.lo)
            if self.best is None and floor >= GRANULARITY and floor not in tried:
                return floor
            return None
        return mid if mid >= GRANULARITY else None

    def record(self, rate: int, ok: bool) -> None:
        """Record the verdict of a step at ``rate`` rps."""
        self.tried.append((rate, ok))
        if ok:
            self.lo = max(self.lo, rate)
            self.best = rate if self.best is None else max(self.best, rate)
            if not self.ceiling_measured and self._converged():
                self.hi *= 1.5
        else:
            self.ceiling_measured = True
            self.hi = min(self.hi, rate)
            if self.hi <= self.lo:
                if self.best is None:
                    self.lo = self.hi / 2
                else:  # a lower rate failed after a higher one sustained: noise, stop
                    self.hi = self.lo

    def _converged(self) -> bool:
        return self.hi - self.lo <= max(GRANULARITY, self.tolerance * self.hi)


def _round(rate: float) -> int:
    return round(rate / GRANULARITY) * GRANULARITY
