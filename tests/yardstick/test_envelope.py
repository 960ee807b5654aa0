"""The any-checkpoint check on constructed curves: today's failure (a longer scratch run
mid-way below the shorter, fully decayed one at the same compute) is flagged and the reading
moves to the lower envelope; points on the frontier within noise are not."""

from __future__ import annotations

import math

import pytest

from apollo_ray.yardstick.envelope import (
    EvalPoint,
    check,
    lower_envelope,
    sample_points,
    tolerance,
)
from apollo_ray.yardstick.frontier import Frontier, FrontierPoint

F = 1.0e15  # the 1x budget's FLOPs


def frontier() -> Frontier:
    """Fully decayed scratch runs at 1/4, 1/2, 1 and 2 times the budget (the GPT benchmark's
    shape: flat from 1/4 to 1/2, steep from 1/2 to 1)."""
    losses = {0.25: 2.70, 0.5: 2.44, 1.0: 2.097, 2.0: 1.95}
    return Frontier([FrontierPoint(b, b * F, b * 100.0, loss) for b, loss in losses.items()])


def point(budget: float, loss: float, run: str = "scratch-1x") -> EvalPoint:
    return EvalPoint(run, round(1000 * budget), budget * F, budget * 100.0, loss)


def test_a_longer_run_mid_way_below_the_frontier_is_flagged():
    mid_way = [point(0.5, 2.24), point(0.596, 2.16), point(0.25, 2.695)]
    flags = check(frontier(), mid_way)
    assert [f.point.step for f in flags] == [500, 596]  # most below first
    assert flags[0].by == pytest.approx(0.20)
    at = 2.44 + math.log(0.596 / 0.5) / math.log(2) * (2.097 - 2.44)  # log-linear in FLOPs
    assert flags[1].frontier_loss == pytest.approx(at)
    assert flags[0].as_dict()["run"] == "scratch-1x"


def test_points_on_the_frontier_within_noise_are_not_flagged():
    near = [point(0.5, 2.44), point(1.0, 2.097 - 0.009), point(2.0, 1.95 - 0.03)]
    assert tolerance(None) == tolerance(0.001) == 0.01 and tolerance(0.02) == 0.04
    assert [f.point.step for f in check(frontier(), near)] == [2000]
    assert check(frontier(), near, seed_sd=0.02) == []
    outside = [point(0.1, 1.0), point(4.0, 1.0)]  # no frontier there to hold them against
    assert check(frontier(), outside) == []


def test_readings_move_to_the_lower_envelope():
    original = frontier()
    flags = check(original, [point(0.5, 2.24)])
    envelope = lower_envelope(original, [f.point for f in flags])
    # a method at 0.596x of the compute ending at 2.24 looked 1.2x faster than scratch; against
    # the envelope it is where scratch already was at 0.5x
    before = original.read(2.24, 0.596 * F, 59.6)
    after = envelope.read(2.24, 0.596 * F, 59.6)
    assert before.speedup > 1.15 and after.speedup == pytest.approx(0.5 / 0.596)
    assert envelope.loss_at(0.5 * F) == pytest.approx(2.24)
    assert envelope.loss_at(2.0 * F) == original.loss_at(2.0 * F) == 1.95


def test_sample_points_are_the_quick_evaluations_and_the_final_sample():
    rows = [
        {"step": 0, "flops": 0, "wall_time": 0.0, "eval_loss": 7.6},
        {"step": 1, "flops": 10, "wall_time": 1.0, "loss": 7.0},
        {"step": 2, "flops": 20, "wall_time": 2.0, "eval_loss": 6.5},
        {
            "step": 4,
            "flops": 40,
            "wall_time": 4.0,
            "eval_loss": 6.0,
            "eval_loss_se": 0.1,
            "eval_sample_loss": 6.1,
        },
    ]
    points = sample_points("run", rows)
    assert [(p.step, p.loss) for p in points] == [(2, 6.5), (4, 6.1)]
