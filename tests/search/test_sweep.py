"""The scratch sweep's plan and choice: one wsd trunk per LR with a branch per shorter budget
(the branches train bit-identical to the same runs alone: tests/training/test_fork.py), the
best setting per budget on validation, and a sweep that extends past a chosen edge."""

from __future__ import annotations

import math

import pytest
from conftest import timeless, tiny_run

from apollo_ray.search.baseline import baseline_key
from apollo_ray.search.sweep import Setting, choose, edge_lrs, scratch_run, sweep, wsd_runs
from apollo_ray.training.trainer import Trainer


def test_a_trunk_and_its_branches_give_every_budget(gpt_data, tmp_path):
    base = tiny_run(gpt_data, tmp_path / "base", train={"steps": 20, "eval_every": 5})
    lr = Setting("wsd", 3.0e-3)
    alone = {b: scratch_run(base, b, lr, seed=7, warmup_steps=2) for b in (0.5, 1.0)}
    for b, cfg in alone.items():
        alone[b] = cfg.model_copy(update={"out_dir": str(tmp_path / f"alone-{b:g}")})
    assert alone[0.5].train.steps == 10 and alone[0.5].seed == 7 and alone[0.5].schedule is None
    assert alone[0.5].name == "scratch-0.5x-wsd-lr0.003-seed7"

    def where(trunk, name):
        return str(trunk.output_dir / "checkpoints" / f"{name}.pt")

    planned = wsd_runs(
        {
            b: cfg.model_copy(update={"out_dir": str(tmp_path / f"sweep-{b:g}")})
            for b, cfg in alone.items()
        },
        where,
    )
    assert planned[1.0].train.branch_steps == [8]  # 10 steps decay over their last 2
    assert planned[0.5].train.fork_from.endswith("sweep-1/checkpoints/step-0000008.branch.pt")
    for budget in (1.0, 0.5):  # the trunk first
        Trainer(planned[budget], "cpu", progress=False).fit()
        Trainer(alone[budget], "cpu", progress=False).fit()
        assert timeless(planned[budget].output_dir) == timeless(alone[budget].output_dir)
        assert baseline_key(planned[budget]) == baseline_key(alone[budget])


def test_each_budget_takes_its_best_setting_and_the_sweep_extends_past_an_edge():
    lrs = [1e-3, 2e-3, 4e-3, 8e-3]
    losses = {
        (0.5, Setting("wsd", 1e-3)): 2.6,
        (0.5, Setting("wsd", 2e-3)): 2.5,
        (0.5, Setting("wsd", 4e-3)): 2.55,
        (0.5, Setting("cosine", 2e-3)): 2.45,
        (1.0, Setting("wsd", 4e-3)): 2.2,
        (1.0, Setting("wsd", 8e-3)): 2.1,
        (1.0, Setting("cosine", 8e-3)): 2.1,  # a tie: wsd
    }
    chosen = choose(losses, [0.5, 1.0])
    assert chosen == {0.5: Setting("cosine", 2e-3), 1.0: Setting("wsd", 8e-3)}
    assert edge_lrs(chosen, lrs) == [1.6e-2]
    assert edge_lrs({0.5: Setting("wsd", 1e-3)}, lrs) == [5e-4]
    assert edge_lrs({0.5: Setting("wsd", 2e-3)}, lrs) == []
    with pytest.raises(ValueError, match="no sweep run at 2x"):
        choose(losses, [2.0])


def test_the_sweep_extends_past_a_chosen_edge_then_tries_cosine_near_1x():
    """The loop on a known loss surface (each LR's loss is its distance from the best LR per
    budget, in octaves): the sweep extends until every choice lies inside it."""
    best = {0.25: 4e-3, 1.0: 3.2e-2, 2.0: 3.2e-2}  # 1x and 2x: two octaves past the top
    trained = []

    batches = []

    def loss(setting, budget):  # cosine wins at 1x only
        bonus = 0.01 if setting.family == "cosine" and budget == 1.0 else 0.0
        return 3 + abs(math.log2(setting.lr / best[budget])) - bonus

    def train(jobs):
        batches.append([setting for setting, _ in jobs])
        trained.extend(batches[-1])
        return [{b: loss(setting, b) for b in budgets} for setting, budgets in jobs]

    found = sweep(train, [1e-3, 2e-3, 4e-3, 8e-3], list(best), extend=2)
    assert found.chosen_wsd == {b: Setting("wsd", lr) for b, lr in best.items()}
    assert found.chosen == {**found.chosen_wsd, 1.0: Setting("cosine", 3.2e-2)}
    assert [s.lr for s in trained if s.family == "wsd"] == [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]
    assert {s for s in trained if s.family == "cosine"} == {
        Setting("cosine", 4e-3),
        Setting("cosine", 3.2e-2),
    }
    # independent runs come as one batch: every LR of a round, then every cosine run
    assert [len(b) for b in batches] == [4, 1, 1, 2]
    found = sweep(train, [1e-3, 2e-3, 4e-3, 8e-3], list(best), extend=1, cosine=False)
    assert found.chosen[2.0] == Setting("wsd", 1.6e-2)  # still at the edge: extend ran out
