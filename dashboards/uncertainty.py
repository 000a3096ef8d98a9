"""A claim's statistic judged over replicates: the paired t-interval and the verdict it gives.

A rule (`dashboards.claims`) computes one number per replicate for each condition it tests (e.g. C2's
gap at the shortest schedule): pre-trained minus random of the *same* replicate, so the pair shares
its data, its batch order and its evaluation set (a paired design: the seed-to-seed spread that both
arms share cancels). Over N replicates the 95% interval of the mean is the Student t-interval,
mean +- t(0.975, N-1) x sd / sqrt(N). Not the percentile bootstrap: with N = 3 it has only 10
distinct resamples of the mean and understates the interval (docs/reproduction.md, "How certain").

A condition *holds* when its whole interval lies on the claim's side of the threshold, *does not
hold* when it lies wholly on the other side, and is *inconclusive* when it straddles it. One
replicate has no interval: "single run", never conclusive. Pure: numbers in, verdicts out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from scipy import stats

HOLDS, FAILS, INCONCLUSIVE, SINGLE, NOT_MEASURABLE = (
    "holds", "does not hold", "inconclusive", "single run: no interval", "not measurable")
LEVEL = 0.95
METHOD = "paired t-interval over replicates (Student t, 95%)"


@dataclass(frozen=True)
class Interval:
    """The mean of per-replicate values and its two-sided t-interval (None for one value)."""

    n: int
    mean: float
    low: float | None
    high: float | None

    def words(self) -> str:
        if self.low is None:
            return f"{self.mean:+.2f} (one replicate: no interval)"
        return f"{self.mean:+.2f}, 95% CI [{self.low:+.2f}, {self.high:+.2f}], N={self.n}"


def t_interval(values: list[float], level: float = LEVEL) -> Interval:
    """mean +- t((1+level)/2, n-1) x sd/sqrt(n), sd with n-1 in the denominator."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(n, mean, None, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half)


@dataclass
class Condition:
    """One condition of a rule: `what` (words) compared with `threshold` on the claim's side."""

    what: str
    values: dict[str, float]  # replicate label -> the statistic of that replicate's pair
    threshold: float
    above: bool  # True: the claim needs the statistic above the threshold; False: below it
    failure: str = ""  # what a conclusive failure of this condition means, in words ("the gap grew")

    @property
    def interval(self) -> Interval:
        return t_interval(list(self.values.values()))

    @property
    def verdict(self) -> str:
        iv = self.interval
        if iv.low is None:
            return SINGLE
        inside = iv.low > self.threshold if self.above else iv.high < self.threshold
        outside = iv.high < self.threshold if self.above else iv.low > self.threshold
        return HOLDS if inside else FAILS if outside else INCONCLUSIVE

    def words(self) -> str:
        side = ">" if self.above else "<"
        return f"{self.what} {self.interval.words()} (needs {side} {self.threshold:+.2f})"

    def to_json(self) -> dict[str, Any]:
        iv = self.interval
        return {"what": self.what, "failure": self.failure,
                "per_replicate": {k: round(v, 3) for k, v in self.values.items()},
                "n": iv.n, "mean": round(iv.mean, 3), "interval": None if iv.low is None else
                [round(iv.low, 3), round(iv.high, 3)], "threshold": round(self.threshold, 3),
                "claim_side": "above" if self.above else "below", "verdict": self.verdict}


def combine(verdicts: list[str]) -> str:
    """The verdict of several conditions (or cells) that must all hold: one that conclusively fails
    decides; else any undecided one leaves the whole inconclusive; a single run is never conclusive."""
    if not verdicts:
        return NOT_MEASURABLE
    for v in (FAILS, INCONCLUSIVE, SINGLE):
        if v in verdicts:
            return v
    return HOLDS


def failing(conditions: list[Condition]) -> list[Condition]:
    """The conditions that decide a combined verdict (those with the verdict `combine` returns)."""
    verdict = combine([c.verdict for c in conditions])
    return [c for c in conditions if c.verdict == verdict]
