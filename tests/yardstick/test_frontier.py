"""The scratch frontier on synthetic curves: interpolation, bounds, envelope and ranking."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from apollo_ray.yardstick.frontier import Frontier, FrontierPoint, rank_key


def frontier(*losses: float, budgets=(0.25, 0.5, 1.0, 2.0), flops0=1e12, wall0=10.0) -> Frontier:
    return Frontier(
        [
            FrontierPoint(budget=b, flops=flops0 * b, wall=wall0 * b, loss=loss)
            for b, loss in zip(budgets, losses, strict=True)
        ]
    )


def test_a_budgets_own_loss_reads_as_its_own_compute():
    f = frontier(4.0, 3.5, 3.2, 3.0)
    for point in f.points:
        flops, wall, bound = f.equivalent(point.loss)
        assert (flops, wall, bound) == (point.flops, point.wall, None)
    assert f.budget(1.0).loss == 3.2
    with pytest.raises(KeyError):
        f.budget(4.0)


def test_between_budgets_the_frontier_is_linear_in_log_flops():
    f = frontier(4.0, 3.5, 3.2, 3.0)
    flops, wall, bound = f.equivalent(3.35)  # halfway between the 0.5 and 1.0 budgets
    assert bound is None
    assert flops == pytest.approx(math.sqrt(0.5e12 * 1.0e12))
    assert wall == pytest.approx(math.sqrt(5.0 * 10.0))
    reading = f.read(3.35, flops=flops / 2, wall=wall)
    assert reading.speedup == pytest.approx(2.0) and reading.saving == pytest.approx(0.5)
    assert reading.wall_speedup == pytest.approx(1.0) and reading.wall_saving == pytest.approx(0)


def test_beyond_the_frontier_the_figures_are_bounds():
    f = frontier(4.0, 3.5, 3.2, 3.0)
    better = f.read(2.9, flops=1e12, wall=10.0)  # below the 2x budget's loss
    assert better.bound == "lower" and better.speedup == pytest.approx(2.0)
    worse = f.read(4.5, flops=1e12, wall=10.0)  # above the 1/4 budget's loss
    assert worse.bound == "upper" and worse.speedup == pytest.approx(0.25)
    assert worse.saving == pytest.approx(-3.0)


def test_a_larger_budget_that_ended_worse_is_no_step_back():
    f = frontier(4.0, 3.5, 3.6, 3.0)  # the 1x run ended worse than the 0.5x one (noise)
    assert f.envelope == [4.0, 3.5, 3.5, 3.0]
    flops, _, _ = f.equivalent(3.5)
    assert flops == 0.5e12  # the cheaper run already reached it
    flops, _, _ = f.equivalent(3.25)
    assert 1.0e12 < flops < 2.0e12  # between the envelope's 3.5 (at 1x) and 3.0 (at 2x)


def test_the_equivalent_compute_never_rises_with_the_loss():
    rng = np.random.default_rng(0)
    for _ in range(50):
        f = frontier(*sorted(rng.uniform(2.0, 5.0, 4), reverse=True))
        losses = np.linspace(1.5, 5.5, 200)
        flops = [f.equivalent(loss)[0] for loss in losses]
        assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(flops))


def key(reading):
    return rank_key(reading.bound, reading.loss, reading.flops, reading.speedup)


def test_ranking_puts_a_dominating_run_strictly_above():
    rng = np.random.default_rng(1)
    for _ in range(200):
        f = frontier(*sorted(rng.uniform(2.0, 5.0, 4), reverse=True))
        runs = []
        for _ in range(8):
            loss = float(rng.choice([rng.uniform(1.5, 5.5), f.points[rng.integers(4)].loss]))
            flops = float(rng.choice([rng.uniform(0.1e12, 3e12), 1e12]))
            runs.append(f.read(loss, flops, wall=10.0))
        for a, b in itertools.permutations(runs, 2):
            dominates = a.loss <= b.loss and a.flops <= b.flops
            if dominates and (a.loss, a.flops) != (b.loss, b.flops):
                assert key(a) < key(b), (a, b)


def test_a_frontier_needs_two_finished_runs():
    with pytest.raises(ValueError, match="at least 2"):
        Frontier([FrontierPoint(1.0, 1e12, 1.0, 3.0)])
    with pytest.raises(ValueError, match="positive"):
        Frontier([FrontierPoint(1.0, 1e12, 1.0, 3.0), FrontierPoint(2.0, 0.0, 1.0, 2.0)])
