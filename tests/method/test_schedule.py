"""Layer plans (docs/method.md examples) and stage arithmetic of the progressive schedule."""

import pytest

from apollo_ray.config import ScheduleConfig
from apollo_ray.method.schedule import Schedule, interp_plan, stack_plan


def test_plans_match_the_release_examples():
    assert interp_plan(3, 7) == [0, 0, 0, 1, 1, 2, 2]
    assert stack_plan(3, 6) == [0, 1, 2, 0, 1, 2]
    assert stack_plan(3, 7) == [0, 1, 2, 0, 1, 2, 2]
    assert stack_plan(3, 8) == [0, 1, 2, 0, 1, 2, 1, 2]  # release's stack_meta_layer(3, 8)
    assert interp_plan(12, 12) == list(range(12)) == stack_plan(12, 12)


def test_plans_use_every_layer_in_range():
    for n in range(1, 13):
        for d in range(n, 25):
            for plan in (interp_plan(n, d), stack_plan(n, d)):
                assert len(plan) == d and sorted(set(plan)) == list(range(n))
    with pytest.raises(ValueError):
        interp_plan(4, 3)


def test_released_recipe_stage_boundaries():
    sched = Schedule(ScheduleConfig(), n_layer=12, total_steps=400, seed=0)
    assert sched.starts == [20, 40, 100]  # 5%, 10%, 25% of 400
    assert [sched.n_physical(s) for s in (0, 19, 20, 39, 40, 99, 100, 399)] == [
        1,
        1,
        3,
        3,
        6,
        6,
        12,
        12,
    ]
    last = sched.step(399, 0)
    assert (last.stage, last.depth, last.plan) == (3, 12, list(range(12)))
    assert sched.eval_plan(3) == interp_plan(3, 12)


def test_scratch_is_one_stage_at_full_depth():
    sched = Schedule(None, n_layer=6, total_steps=10, seed=0)
    assert sched.depths == [6] and sched.step(0, 0).plan == list(range(6))


def test_depths_are_deterministic_and_vary():
    a = Schedule(ScheduleConfig(), 12, 1000, seed=3)
    b = Schedule(ScheduleConfig(), 12, 1000, seed=3)
    depths = [a.step(s, m).depth for s in range(40) for m in range(2)]
    assert depths == [b.step(s, m).depth for s in range(40) for m in range(2)]
    assert len(set(depths)) > 3 and min(depths) == 1


def test_stage_too_short_for_budget():
    with pytest.raises(ValueError, match="empty stage"):
        Schedule(ScheduleConfig(), 12, 10, seed=0)  # 5% and 10% of 10 steps round to 0 and 1
    late = ScheduleConfig(stage_ends=[0.1, 0.2, 0.95])  # the last stage would start at step 10
    with pytest.raises(ValueError, match="empty stage"):
        Schedule(late, 12, 10, seed=0)
