"""Depth samplers: which depth L(t) in [N, L] a micro-batch runs when the model owns N layers.

Every sampler is a distribution over depths with an exact `probs(n, full)` and a deterministic
`sample(n, full, seed, step, micro)`: the draw is a pure function of (seed, step, micro-batch), so
every data-parallel rank draws the same depth without communicating and a resumed run draws
what the uninterrupted run would have (nothing to checkpoint beyond the seed).

- `apollo`: the released LVPS formula, unchanged (docs/method.md, section 3).
- `lvps`: the searchable family with a temperature tau, p(d) ∝ (d - N + 1)^(-1/tau).
  Non-increasing in d; all mass on N as tau -> 0; uniform as tau -> inf. tau = 0.52 is the
  closest member to the released LVPS (mean KL 0.047 nats over N = 1, 3, 6 at L = 12; see
  `closest_tau`).
- `uniform`: uniform over [N, L] (released alternative); `full`: always L ("constant_high");
  `physical`: always N, no sharing (plain progressive stacking, the StackBERT baseline).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

__all__ = [
    "DepthSampler",
    "FullDepth",
    "PhysicalDepth",
    "ReleasedLVPS",
    "TemperedLVPS",
    "UniformDepth",
    "closest_tau",
    "make_sampler",
]


class DepthSampler(ABC):
    """A distribution over depths N..L; subclasses define `probs`."""

    name: str

    @abstractmethod
    def probs(self, n: int, full: int) -> np.ndarray:
        """P(depth = n + k) for k = 0 .. full - n (sums to 1)."""

    def sample(self, n: int, full: int, seed: int, step: int, micro: int) -> int:
        """The depth for micro-batch `micro` of optimizer step `step`: inverse CDF of one uniform
        drawn from a generator seeded by (seed, step, micro)."""
        u = np.random.default_rng([seed, step, micro]).random()
        return n + int(
            np.searchsorted(np.cumsum(self.probs(n, full)), u, side="right").clip(max=full - n)
        )

    def mean(self, n: int, full: int) -> float:
        return float(np.arange(n, full + 1) @ self.probs(n, full))


class ReleasedLVPS(DepthSampler):
    """The release's LVPS: r = L/N, b = r + 0.4, e = 0.6, x ~ U(x_min, 1), y = m / (x + n),
    clip y to [1, r], depth = int(y * N). 1/y is uniform on [1/b, 1/e], which gives `probs`
    in closed form; `sample` runs the released formula itself on the same uniform."""

    name = "apollo"
    x_min = 1e-6
    e = 0.6

    def _b(self, n: int, full: int) -> float:
        return full / n + 0.4

    def probs(self, n: int, full: int) -> np.ndarray:
        b, e = self._b(n, full), self.e
        lo, hi = 1 / b, 1 / e  # support of u = 1/y
        p = []
        for d in range(n, full + 1):
            # depth d <=> d/N <= y < (d+1)/N, open-ended at both clipped ends
            u_low = 0.0 if d == full else n / (d + 1)
            u_high = np.inf if d == n else n / d
            p.append(max(0.0, min(u_high, hi) - max(u_low, lo)) / (hi - lo))
        return np.array(p)

    def sample(self, n: int, full: int, seed: int, step: int, micro: int) -> int:
        b, e, x_min = self._b(n, full), self.e, self.x_min
        nn = (b * x_min - e) / (e - b)
        m = e * (nn + 1)
        x = x_min + (1 - x_min) * np.random.default_rng([seed, step, micro]).random()
        y = min(max(m / (x + nn), 1.0), full / n)
        return int(y * n)


class TemperedLVPS(DepthSampler):
    """p(d) ∝ (d - N + 1)^(-1/tau): a low-value-prioritised family with one temperature."""

    name = "lvps"

    def __init__(self, tau: float) -> None:
        if not tau > 0:
            raise ValueError(f"LVPS temperature must be > 0, got {tau}")
        self.tau = tau

    def probs(self, n: int, full: int) -> np.ndarray:
        w = np.arange(1, full - n + 2, dtype=np.float64) ** (-1 / self.tau)
        return w / w.sum()


class UniformDepth(DepthSampler):
    name = "uniform"

    def probs(self, n: int, full: int) -> np.ndarray:
        return np.full(full - n + 1, 1 / (full - n + 1))


class FullDepth(DepthSampler):
    name = "full"

    def probs(self, n: int, full: int) -> np.ndarray:
        p = np.zeros(full - n + 1)
        p[-1] = 1.0
        return p


class PhysicalDepth(DepthSampler):
    name = "physical"

    def probs(self, n: int, full: int) -> np.ndarray:
        p = np.zeros(full - n + 1)
        p[0] = 1.0
        return p


def make_sampler(kind: str, tau: float | None = None) -> DepthSampler:
    """Build a sampler by name: apollo | lvps (needs tau) | uniform | full | physical."""
    if kind == "lvps":
        if tau is None:
            raise ValueError("the lvps sampler needs a temperature tau")
        return TemperedLVPS(tau)
    samplers = {c.name: c for c in (ReleasedLVPS, UniformDepth, FullDepth, PhysicalDepth)}
    if kind not in samplers:
        raise ValueError(f"unknown depth sampler {kind!r}; allowed: lvps, {', '.join(samplers)}")
    return samplers[kind]()


def closest_tau(full: int = 12, physical: tuple[int, ...] = (1, 3, 6)) -> tuple[float, float]:
    """The tau whose `lvps` is closest to the released LVPS: argmin of the mean KL(released ||
    lvps_tau) over the given stage sizes, by a log-spaced grid search. Returns (tau, mean KL)."""
    released = ReleasedLVPS()

    def kl(tau: float) -> float:
        q = TemperedLVPS(tau)
        total = 0.0
        for n in physical:
            p, r = released.probs(n, full), q.probs(n, full)
            mask = p > 0
            total += float(np.sum(p[mask] * np.log(p[mask] / r[mask])))
        return total / len(physical)

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    kls = [kl(t) for t in grid]
    best = int(np.argmin(kls))
    return float(grid[best]), float(kls[best])
