"""Warmup-stable-decay and branches: a shorter run forked from a constant-LR trunk's checkpoint
at its own decay start ends bit-identical to the same run trained alone, and a fork that would
not be that run is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import timeless, tiny_run

from apollo_ray.config import ConfigError, TrainConfig
from apollo_ray.search.baseline import baseline_key
from apollo_ray.training.checkpoints import load
from apollo_ray.training.optim import decay_start, lr_at
from apollo_ray.training.trainer import Trainer

WSD = {"decay": "wsd", "warmup_steps": 2, "decay_fraction": 0.2, "eval_every": 2}


def test_wsd_is_warmup_then_constant_then_linear_to_zero():
    cfg = TrainConfig(steps=20, lr=1.0, **WSD)
    assert decay_start(cfg) == 16 and decay_start(cfg, 10) == 8
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2:16] == [1.0] * 14
    assert lrs[16:] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    # the warmup is in steps, whatever the budget: every budget's LR is the trunk's until it decays
    assert [lr_at(s, cfg, 10) for s in range(8)] == lrs[:8]


def run(gpt_data, out, steps, **train):
    cfg = tiny_run(
        gpt_data,
        out,
        schedule=None,
        model={"dropout": 0.1},  # the dropout stream must carry over too
        train={**WSD, "steps": steps, "checkpoint_every": 5, **train},
    )
    trainer = Trainer(cfg, "cpu", progress=False)
    trainer.fit()
    return cfg, trainer


def test_a_branch_ends_bit_identical_to_the_run_trained_alone(gpt_data, tmp_path):
    trunk, _ = run(gpt_data, tmp_path / "trunk", 20, branch_steps=[8])
    fork = trunk.output_dir / "checkpoints" / "step-0000008.branch.pt"
    assert fork.exists() and len(load(fork)["rows"]) > 1  # kept, with the trunk's rows so far
    branch, forked = run(gpt_data, tmp_path / "branch", 10, fork_from=str(fork))
    alone, trained = run(gpt_data, tmp_path / "alone", 10)
    assert timeless(branch.output_dir) == timeless(alone.output_dir)
    for name, weight in trained.model.state_dict().items():
        assert torch.equal(forked.model.state_dict()[name], weight), name
    assert not (branch.output_dir / "resumes.jsonl").exists()  # a fork is not a resume
    assert (
        baseline_key(branch)
        == baseline_key(alone)
        == baseline_key(
            alone.model_copy(update={"train": alone.train.model_copy(update={"branch_steps": [3]})})
        )
    )


def test_a_fork_that_would_not_be_the_same_run_is_refused(gpt_data, tmp_path):
    trunk, _ = run(gpt_data, tmp_path / "trunk", 20, branch_steps=[8])
    fork = str(trunk.output_dir / "checkpoints" / "step-0000008.branch.pt")
    with pytest.raises(ConfigError, match=r"train.fork_from: .*different train.lr"):
        run(gpt_data, tmp_path / "other-lr", 10, fork_from=fork, lr=1e-3)
    # 8 steps decay from step 6 (its full LR) and 7: its LR left the trunk's before the fork
    with pytest.raises(ConfigError, match=r"LR differs from this run's at step 7"):
        run(gpt_data, tmp_path / "too-late", 8, fork_from=fork)
    periodic = str(trunk.output_dir / "checkpoints" / "step-0000020.pt")
    with pytest.raises(ConfigError, match="not a branch checkpoint"):
        run(gpt_data, tmp_path / "periodic", 10, fork_from=periodic)
