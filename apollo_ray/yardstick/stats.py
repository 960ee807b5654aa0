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

__all__ = ["Interval", "log_interval", "paired_log_interval"]


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


def _t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, dof))
