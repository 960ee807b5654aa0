"""Intervals for speedups measured over seeds (docs/method.md, section 8).

Speedups are ratios, so they are averaged and compared on the log scale: the mean of
log(speedup) over seeds with a Student-t 95% interval, reported back as a geometric mean with
its interval. Two arms run with the same seeds are compared paired by seed: the interval of the
mean of log(speedup_a / speedup_b). An interval that contains 0 (a ratio of 1) is "no
significant difference".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "bootstrap_spearman", "log_interval", "paired_log_interval", "spearman"]


@dataclass(frozen=True)
class Interval:
    """A geometric mean of ratios over `n` seeds and its 95% interval (None with one seed)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def significant(self) -> bool | None:
        """Whether the interval excludes a ratio of 1 (None: no interval with one seed)."""
        if self.low is None or self.high is None:
            return None
        return not self.low <= 1.0 <= self.high

    def describe(self, what: str = "speedup") -> str:
        """`speedup 1.23 (95% CI 1.05-1.44, 3 seeds)`, and whether it differs from 1."""
        if self.low is None:
            return f"{what} {self.mean:.3g} (1 seed: no interval)"
        verdict = "differs from 1" if self.significant else "no significant difference from 1"
        return (
            f"{what} {self.mean:.3g} (95% CI {self.low:.3g}-{self.high:.3g}, {self.n} seeds: "
            f"{verdict})"
        )


def log_interval(ratios: Sequence[float], level: float = 0.95) -> Interval:
    """The geometric mean of positive `ratios` with a t-interval computed on their logs."""
    if not ratios or any(not r > 0 for r in ratios):
        raise ValueError(f"needs positive ratios, got {list(ratios)}")
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = sum(logs) / n
    if n == 1:
        return Interval(math.exp(mean), None, None, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = _t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(math.exp(mean), math.exp(mean - half), math.exp(mean + half), n)


def paired_log_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """The ratio a / b, paired by seed (a[i] and b[i] ran with the same seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired by seed: {len(a)} and {len(b)} values")
    return log_interval([x / y for x, y in zip(a, b, strict=True)], level)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's on the ranks, ties given their mean rank; NaN
    when either side is constant (no ranking to compare)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"needs two paired samples of 2 or more, got {len(x)} and {len(y)}")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def bootstrap_spearman(
    proxy: Sequence[Sequence[float]],
    target: Sequence[Sequence[float]],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Spearman's correlation between the geometric means of `proxy[i]` and `target[i]` (each
    item's ratios over its seeds, on the two sides), with a percentile bootstrap interval over
    items and seeds: each resample draws the items with replacement and, within each drawn item,
    its seeds on each side with replacement. Resamples with no ranking on a side (all items
    alike) are left out. Returns (rho, low, high)."""
    import random

    def gmean(values: Sequence[float]) -> float:
        return math.exp(sum(math.log(v) for v in values) / len(values))

    if len(proxy) != len(target):
        raise ValueError(f"paired items: {len(proxy)} and {len(target)}")
    rho = spearman([gmean(p) for p in proxy], [gmean(t) for t in target])
    rng, draws = random.Random(seed), []
    n = len(proxy)
    for _ in range(resamples):
        items = [rng.randrange(n) for _ in range(n)]
        xs = [gmean(rng.choices(proxy[i], k=len(proxy[i]))) for i in items]
        ys = [gmean(rng.choices(target[i], k=len(target[i]))) for i in items]
        r = spearman(xs, ys)
        if not math.isnan(r):
            draws.append(r)
    if not draws:
        return rho, math.nan, math.nan
    draws.sort()
    tail = (1 - level) / 2
    low = draws[min(len(draws) - 1, int(tail * len(draws)))]
    high = draws[min(len(draws) - 1, int((1 - tail) * len(draws)))]
    return rho, low, high


def _t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, dof))
