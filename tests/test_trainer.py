"""The single-process loop: LR schedule, FLOPs accounting, bit-identical resume, NaN handling."""

import itertools
import json
import math

import pytest
import torch

from apollo_ray.config import RunConfig, TrainConfig
from apollo_ray.model import flops_per_microbatch
from apollo_ray.trainer import (
    NonFiniteLossError,
    Trainer,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
)


def make_cfg(data, out, kind="bert", **train) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "t",
            "out_dir": str(out),
            "seed": 3,
            "model": {
                "kind": kind,
                "n_layer": 2,
                "d_model": 32,
                "n_head": 2,
                "max_seq_len": 32,
                "dropout": 0.1,
            },
            "data": {"path": str(data), "seq_len": 32},
            "train": {
                "steps": 12,
                "micro_batch": 4,
                "lr": 3e-3,
                "eval_every": 6,
                "eval_batches": 2,
                "checkpoint_every": 6,
                "log_every": 1,
                **train,
            },
        }
    )


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=0.1, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    linear = cfg.model_copy(update={"decay": "linear"})
    assert lr_at(55, linear) == pytest.approx(0.1 + 0.9 * (1 - 45 / 90))


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_resume_is_bit_identical(kind, bert_data, gpt_data, tmp_path):
    data = bert_data if kind == "bert" else gpt_data
    straight = Trainer(make_cfg(data, tmp_path / "a", kind), progress=False)
    straight.fit()

    crashing = Trainer(make_cfg(data, tmp_path / "b", kind), progress=False)
    step = crashing.train_step

    def crash_after_step_8():
        if crashing.state.step == 8:  # two steps past the step-6 checkpoint
            raise KeyboardInterrupt
        return step()

    crashing.train_step = crash_after_step_8
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert sorted(losses(tmp_path / "b")) == list(range(1, 9))
    resumed = Trainer(make_cfg(data, tmp_path / "b", kind), progress=False)
    assert resumed.state.step == 6
    resumed.fit()

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 13))  # rows 7-8 of the crashed run were rewritten
    assert all(a[s] == b[s] for s in b), {s: (a[s], b[s]) for s in b}
    assert straight.state.eval_loss == resumed.state.eval_loss
    assert straight.state.flops == resumed.state.flops


def test_flops_and_tokens_are_counted_per_micro_batch(bert_data, tmp_path):
    trainer = Trainer(make_cfg(bert_data, tmp_path, steps=3, grad_accum=2), progress=False)
    state = trainer.fit()
    per_micro = flops_per_microbatch(trainer.model_cfg, 4, 32, 2)
    assert state.flops == 3 * 2 * per_micro
    assert state.tokens == 3 * 2 * 4 * 32


def test_loss_falls(gpt_data, tmp_path):
    cfg = make_cfg(gpt_data, tmp_path, "gpt", steps=40, eval_every=40, warmup=0.1)
    trainer = Trainer(cfg, progress=False)
    before = trainer.evaluate()
    after = trainer.fit().eval_loss
    assert after < before - 0.5, (before, after)


def test_checkpoint_is_weights_only_and_pruned(bert_data, tmp_path):
    trainer = Trainer(
        make_cfg(bert_data, tmp_path, steps=4, checkpoint_every=1, keep_checkpoints=2),
        progress=False,
    )
    trainer.fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert names == ["step-0000003.pt", "step-0000004.pt"]
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))  # torch.load(weights_only=True) inside
    assert ckpt["state"]["step"] == 4 and ckpt["plan"] == [0, 1]


def test_non_finite_loss_stops_cleanly(bert_data, tmp_path, monkeypatch):
    trainer = Trainer(make_cfg(bert_data, tmp_path, steps=10, checkpoint_every=2), progress=False)
    forward = trainer.model.forward

    def poisoned(input_ids, labels=None, plan=None):
        logits, loss = forward(input_ids, labels, plan=plan)
        return logits, loss * math.nan if trainer.state.step == 5 else loss

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="step 5"):
        trainer.fit()
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5]
    assert load_checkpoint(latest_checkpoint(tmp_path))["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
