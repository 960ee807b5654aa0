"""The any-checkpoint check: is the frontier really the best scratch can do at each compute?

The frontier (`frontier.py`) assumes that a scratch run fully decayed at a budget is scratch's
best at that compute. On an untuned baseline that is false: a longer run mid-way, its LR still
high, can be lower than a shorter run that decayed too early, and a method read against such a
frontier looks faster than it is (Kaddour et al., "No Train No Gain", NeurIPS 2023). So every
evaluation of every scratch run (frontier and sweep runs alike) is held against the frontier at
its compute, all on the same fixed sample of validation sequences (`Evaluator.loss`): a point
more than `tolerance` below it is flagged, and readings switch to the lower envelope of the
frontier and the flagged points.

    flags = check(frontier, points, seed_sd=0.004)   # points: EvalPoint of every scratch eval
    frontier = lower_envelope(frontier, [f.point for f in flags]) if flags else frontier
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from apollo_ray.yardstick.frontier import Frontier, FrontierPoint

__all__ = [
    "MIN_TOLERANCE",
    "EvalPoint",
    "Flag",
    "check",
    "lower_envelope",
    "sample_points",
    "tolerance",
]

MIN_TOLERANCE = 0.01  # nats: below this, a point under the frontier is evaluation noise


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation of a scratch run: which run, at which step and cost, its loss on the
    fixed validation sample."""

    run: str
    step: int
    flops: float
    wall: float
    loss: float


@dataclass(frozen=True)
class Flag:
    """A scratch evaluation below the frontier: the frontier's loss at its compute."""

    point: EvalPoint
    frontier_loss: float

    @property
    def by(self) -> float:
        """How far below the frontier, in nats."""
        return self.frontier_loss - self.point.loss

    def as_dict(self) -> dict[str, Any]:
        p = self.point
        return {
            "run": p.run,
            "step": p.step,
            "flops": p.flops,
            "loss": p.loss,
            "frontier_loss": self.frontier_loss,
            "by": self.by,
        }


def tolerance(seed_sd: float | None) -> float:
    """How far below the frontier a point may lie and still count as on it: twice the
    frontier's seed standard deviation, and never less than `MIN_TOLERANCE`."""
    return max(2 * seed_sd, MIN_TOLERANCE) if seed_sd is not None else MIN_TOLERANCE


def check(
    frontier: Frontier, points: Iterable[EvalPoint], seed_sd: float | None = None
) -> list[Flag]:
    """The points more than `tolerance(seed_sd)` below the frontier at their compute, most
    below first (points outside the frontier's budgets are not judged)."""
    limit = tolerance(seed_sd)
    flags = []
    for point in points:
        at = frontier.loss_at(point.flops)
        if at is not None and at - point.loss > limit:
            flags.append(Flag(point, at))
    return sorted(flags, key=lambda f: -f.by)


def lower_envelope(frontier: Frontier, points: Iterable[EvalPoint]) -> Frontier:
    """The frontier with `points` (the flagged ones, each with the loss it is read by: on
    test, where the frontier is) added as points of their own (budget: their compute as a
    multiple of the 1x run's, when the frontier has one)."""
    try:
        full = frontier.budget(1.0).flops
    except KeyError:
        full = frontier.points[-1].flops / frontier.points[-1].budget
    extra = [FrontierPoint(p.flops / full, p.flops, p.wall, p.loss) for p in points]
    return Frontier([*frontier.points, *extra])


def sample_points(run: str, rows: Iterable[Mapping[str, Any]]) -> list[EvalPoint]:
    """A run's evaluations on the fixed validation sample, from its metrics.jsonl rows: those
    during training (`eval_loss`) and, at the end, `eval_sample_loss` (the final row's
    `eval_loss` reads the whole split, so it is not one of them). Step 0 is left out: it has
    no compute."""
    points = []
    for row in rows:
        if "eval_sample_loss" in row:
            loss = row["eval_sample_loss"]
        elif "eval_loss" in row and "eval_loss_se" not in row:
            loss = row["eval_loss"]
        else:
            continue
        if row["flops"] > 0:
            points.append(EvalPoint(run, row["step"], row["flops"], row["wall_time"], loss))
    return points
