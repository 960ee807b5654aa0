"""The scratch frontier: what training from scratch reaches with a given compute, read from
scratch runs that each finished their own learning-rate schedule (docs/method.md, section 8).

A method's final loss is read against it: its compute-equivalent FLOPs are where the frontier
reaches that loss, speedup = compute-equivalent FLOPs / the method's FLOPs, and saving =
1 - 1 / speedup; the same in seconds. An intermediate point of one long scratch run is no
substitute: its learning rate has not decayed, so it overstates what a method saves.

    frontier = Frontier([FrontierPoint(budget=b, flops=f, wall=w, loss=l) for ...])
    reading = frontier.read(final_loss=3.1, flops=2.0e15, wall=600.0)
    reading.speedup, reading.bound   # bound: None, "lower" or "upper"

Between two budgets the frontier is linear in (loss, log FLOPs), as scaling curves are close to
straight there; it is monotone (a larger budget that ended worse, by noise, does not count as a
step back: the envelope keeps the better, cheaper point). A loss below the largest budget's is
beyond the frontier: its compute-equivalent is at least the largest budget's, so the speedup is
a lower bound; a loss above the smallest budget's gives an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Frontier", "FrontierPoint", "Reading", "rank_key"]

Bound = Literal["lower", "upper"] | None


@dataclass(frozen=True)
class FrontierPoint:
    """One scratch run, fully decayed at its own budget (`budget`: a multiple of the study's
    step budget): its total FLOPs and seconds and its final held-out loss."""

    budget: float
    flops: float
    wall: float
    loss: float


@dataclass(frozen=True)
class Reading:
    """A final loss read against the frontier. `bound` says what the figures are: exact
    (None), lower bounds on speedup and saving ("lower": the loss is below the frontier's
    best) or upper bounds ("upper": above its worst)."""

    loss: float
    flops: float
    wall: float
    equivalent_flops: float
    equivalent_wall: float
    bound: Bound

    @property
    def speedup(self) -> float:
        return self.equivalent_flops / self.flops

    @property
    def wall_speedup(self) -> float:
        return self.equivalent_wall / self.wall

    @property
    def saving(self) -> float:
        return 1.0 - 1.0 / self.speedup

    @property
    def wall_saving(self) -> float:
        return 1.0 - 1.0 / self.wall_speedup


class Frontier:
    """Final loss against total compute of scratch runs at several budgets."""

    def __init__(self, points: Sequence[FrontierPoint]) -> None:
        if len(points) < 2:
            raise ValueError(f"a frontier needs at least 2 scratch runs, got {len(points)}")
        for p in points:
            if not (p.flops > 0 and p.wall > 0 and math.isfinite(p.loss)):
                raise ValueError(f"frontier point {p}: needs positive FLOPs and seconds, a loss")
        self.points = sorted(points, key=lambda p: (p.flops, p.loss))
        # the monotone envelope: each point's loss is the best reached with at most its compute
        best, self.envelope = math.inf, []
        for p in self.points:
            best = min(best, p.loss)
            self.envelope.append(best)

    @property
    def best_loss(self) -> float:
        return self.envelope[-1]

    @property
    def worst_loss(self) -> float:
        return self.envelope[0]

    def budget(self, multiple: float) -> FrontierPoint:
        """The scratch run of a given budget (1.0: the study's own)."""
        for p in self.points:
            if math.isclose(p.budget, multiple):
                return p
        raise KeyError(f"no scratch run at {multiple} x the budget")

    def equivalent(self, loss: float) -> tuple[float, float, Bound]:
        """(FLOPs, seconds) that scratch needs to reach `loss`, and the bound they are: the
        cheapest compute at which the envelope is at or below `loss`, log-linear in between."""
        if loss < self.best_loss:
            last = self.points[-1]
            return last.flops, last.wall, "lower"
        if loss > self.worst_loss:
            first = self.points[0]
            return first.flops, first.wall, "upper"
        for i, (p, env) in enumerate(zip(self.points, self.envelope, strict=True)):
            if env <= loss:
                if i == 0 or env == loss:
                    return p.flops, p.wall, None
                q, above = self.points[i - 1], self.envelope[i - 1]  # above > loss > env
                frac = (above - loss) / (above - env)
                return _log_lerp(q.flops, p.flops, frac), _log_lerp(q.wall, p.wall, frac), None
        raise AssertionError("unreachable: loss within the envelope's range")

    def loss_at(self, flops: float) -> float | None:
        """The envelope's loss at `flops` (linear in log FLOPs between budgets); None outside
        the budgets' range, where the frontier says nothing."""
        first, last = self.points[0].flops, self.points[-1].flops
        if not first <= flops <= last:
            return None
        for i, p in enumerate(self.points[1:], 1):
            if flops <= p.flops:
                q = self.points[i - 1]
                if p.flops == q.flops:
                    return self.envelope[i]
                frac = math.log(flops / q.flops) / math.log(p.flops / q.flops)
                return self.envelope[i - 1] + frac * (self.envelope[i] - self.envelope[i - 1])
        return self.envelope[-1]

    def read(self, final_loss: float, flops: float, wall: float) -> Reading:
        """A run's final loss and total cost read against the frontier."""
        if not (flops > 0 and wall > 0):
            raise ValueError(f"a run needs positive FLOPs and seconds, got {flops}, {wall}")
        eq_flops, eq_wall, bound = self.equivalent(final_loss)
        return Reading(final_loss, flops, wall, eq_flops, eq_wall, bound)


def _log_lerp(a: float, b: float, frac: float) -> float:
    return math.exp(math.log(a) + frac * (math.log(b) - math.log(a)))


def rank_key(
    bound: Bound, loss: float, flops: float, speedup: float
) -> tuple[int, float, float, float]:
    """Sort key, best first, of a run read against one frontier (its `Reading`'s fields).

    Runs beyond the frontier (lower-bound speedups, which do not compare with each other) come
    first, by final loss and then FLOPs; the others by speedup, then final loss, then FLOPs. A
    run with lower-or-equal loss at lower-or-equal FLOPs than another (and not both equal)
    always ranks strictly above it."""
    if bound == "lower":
        return (0, loss, flops, 0.0)
    return (1, -speedup, loss, flops)
