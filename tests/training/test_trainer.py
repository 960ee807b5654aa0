"""The single-process loop: LR schedule, FLOPs accounting, bit-identical resume, NaN handling."""

import itertools
import math

import pytest
import torch
from conftest import metrics_rows, timeless, tiny_run

from apollo_ray.config import ConfigError, RunConfig, TrainConfig
from apollo_ray.method.model import flops_per_microbatch
from apollo_ray.training.checkpoints import latest_local as latest_checkpoint
from apollo_ray.training.checkpoints import load as load_checkpoint
from apollo_ray.training.late_read import LateRead
from apollo_ray.training.optim import lr_at
from apollo_ray.training.runlog import NonFiniteLossError
from apollo_ray.training.trainer import Trainer


def make_cfg(data, out, kind="bert", n_layer=2, schedule=None, **train) -> RunConfig:
    """The tiny run at 2 layers from scratch, with dropout (whose RNG a resume must restore)."""
    return tiny_run(
        data,
        out,
        kind,
        name="t",
        seed=3,
        model={"n_layer": n_layer, "dropout": 0.1},
        train={"eval_every": 6, **train},
        schedule=schedule,
    )


def losses(run_dir):
    return {r["step"]: r["loss"] for r in metrics_rows(run_dir) if "loss" in r}


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=0.1, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    # the last step is 89/90 of the way down the cosine: just above the floor of 0.1
    assert lr_at(99, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
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
    # step 8's row was still waiting for its loss to be read (once step 9 is queued)
    assert sorted(losses(tmp_path / "b")) == list(range(1, 8))
    resumed = Trainer(make_cfg(data, tmp_path / "b", kind), progress=False)
    assert resumed.state.step == 6
    resumed.fit()

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 13))  # row 7 of the crashed run was rewritten
    assert all(a[s] == b[s] for s in b), {s: (a[s], b[s]) for s in b}
    assert straight.state.eval_loss == resumed.state.eval_loss
    assert straight.state.flops == resumed.state.flops


def test_flops_and_tokens_are_counted_per_micro_batch(bert_data, tmp_path):
    trainer = Trainer(make_cfg(bert_data, tmp_path, steps=3, grad_accum=2), progress=False)
    state = trainer.fit()
    per_micro = flops_per_microbatch(trainer.model_cfg, 4, 32, 2)
    assert state.flops == 3 * 2 * per_micro
    assert state.tokens == 3 * 2 * 4 * 32


def test_each_rows_tokens_per_s_is_the_throughput_of_the_steps_it_covers(gpt_data, tmp_path):
    """On an injected clock where a micro-batch takes 1 s and each evaluation and checkpoint 5 s
    (which training time leaves out), every row reads the same throughput: rows read one step
    late, at once (evaluation, checkpoint, growth) or right after another row alike."""
    cfg = apollo_cfg(
        gpt_data, tmp_path, "gpt", steps=30, grad_accum=2, eval_every=5, checkpoint_every=7,
        log_every=2,
    )  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    now = [0.0]
    trainer.late = LateRead(trainer.run_dir, clock=lambda: now[0])

    def slow(function, seconds):
        def call(*args, **kwargs):
            now[0] += seconds
            return function(*args, **kwargs)

        return call

    trainer.batches.get = slow(trainer.batches.get, 1.0)
    trainer.evaluate = slow(trainer.evaluate, 5.0)
    trainer.save_checkpoint = slow(trainer.save_checkpoint, 5.0)
    state = trainer.fit()
    rows = [r for r in metrics_rows(tmp_path) if "tokens_per_s" in r]
    assert len(rows) > 15 and rows[-1]["step"] == 30
    per_second = 4 * 32  # a micro-batch of 4 x 32 tokens a second
    assert all(r["tokens_per_s"] == pytest.approx(per_second, rel=0.01) for r in rows), rows
    assert state.wall_time == pytest.approx(30 * 2, rel=0.01)  # growth's own time is real


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


def test_a_kept_checkpoint_is_read_like_the_finished_run(gpt_data, tmp_path):
    """A scratch run mid-way is read on validation and test like a finished one (the
    any-checkpoint check's flagged points): the last checkpoint reads the final row's losses."""
    cfg = make_cfg(gpt_data, tmp_path, "gpt", steps=8, checkpoint_every=4, keep_checkpoints=9)
    Trainer(cfg, progress=False).fit()
    final = metrics_rows(tmp_path)[-1]
    reader = Trainer(cfg.model_copy(update={"out_dir": str(tmp_path / "reader")}), progress=False)
    at = {
        n: reader.read_checkpoint(load_checkpoint(tmp_path / "checkpoints" / n))
        for n in (
            "step-0000004.pt",
            "step-0000008.pt",
        )
    }
    end = at["step-0000008.pt"]
    assert end["test_loss"] == final["test_loss"] and end["eval_loss"] == final["eval_loss"]
    assert at["step-0000004.pt"]["test_loss"] > end["test_loss"]


def test_optimizer_is_fused_adamw(bert_data, tmp_path):
    # one kernel over all tensors, and the route by which a non-finite step is skipped on the
    # device (found_inf) without the host waiting for the loss
    trainer = Trainer(make_cfg(bert_data, tmp_path, steps=1), progress=False)
    assert trainer.optimizer.defaults["fused"] is True


def test_non_finite_gradient_skips_the_optimizer_step_and_stops(bert_data, tmp_path):
    trainer = Trainer(make_cfg(bert_data, tmp_path, steps=10), progress=False)
    for _ in range(3):
        trainer.settle(trainer.train_step())
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    adam_steps = [float(s["step"]) for s in trainer.optimizer.state.values()]
    trainer.model.wte.weight.register_hook(lambda g: g * math.inf)  # the loss stays finite
    row = trainer.train_step()  # queued, and skipped on the device
    with pytest.raises(NonFiniteLossError, match=r"gradient norm (nan|inf)\) at step 3"):
        trainer.settle(row)
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert (
        [float(s["step"]) for s in trainer.optimizer.state.values()]
        == adam_steps
        == [3.0] * len(adam_steps)
    )


def apollo_cfg(data, out, kind="bert", schedule=None, **train) -> RunConfig:
    """`make_cfg` at 6 layers in 3 stages (N = 1, 3, 6): growths at steps 3 and 6."""
    stages = {"depths": [1, 3, 6], **(schedule or {})}
    return make_cfg(data, out, kind, n_layer=6, schedule=stages, **train)


def test_apollo_schedule_stages_depths_flops_and_growth(bert_data, tmp_path):
    trainer = Trainer(apollo_cfg(bert_data, tmp_path, grad_accum=2), progress=False)
    state = trainer.fit()
    log = metrics_rows(tmp_path)
    steps = [r for r in log if "loss" in r]
    assert [r["n_physical"] for r in steps] == [1] * 3 + [3] * 3 + [6] * 6  # starts at 3 and 6
    assert all(r["n_physical"] <= r["depth"] <= 6 for r in steps)
    assert len({r["depth"] for r in steps[:6]}) > 1  # depths are sampled, not fixed
    growths = [r for r in log if r.get("event") == "growth"]
    assert [(r["step"], r["n_from"], r["n_physical"]) for r in growths] == [(3, 1, 3), (6, 3, 6)]
    for r in growths:  # alpha = 0 and N_new a multiple of N_old: the function is unchanged
        assert r["eval_loss_before"] == r["eval_loss_after"]  # copies run the same arithmetic
    # FLOPs are those of what ran: one micro-batch at each sampled depth
    depths = [trainer.schedule.step(s, m).depth for s in range(12) for m in range(2)]
    assert state.flops == sum(flops_per_microbatch(trainer.model_cfg, 4, 32, d) for d in depths)
    names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert {
        "step-0000003.pre-growth.pt",
        "step-0000003.post-growth.pt",
        "step-0000006.pre-growth.pt",
        "step-0000006.post-growth.pt",
    } <= names
    post = load_checkpoint(tmp_path / "checkpoints" / "step-0000003.post-growth.pt")
    assert post["n_physical"] == 3 and post["plan"] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("restart_from", ["post-growth", "pre-growth"])
def test_resume_across_growth_is_bit_identical(restart_from, gpt_data, tmp_path):
    schedule = {"growth": "random", "optimizer_state": "copy", "rewarmup_steps": 2}
    straight = Trainer(apollo_cfg(gpt_data, tmp_path / "a", "gpt", schedule), progress=False)
    straight.fit()

    crashing = Trainer(apollo_cfg(gpt_data, tmp_path / "b", "gpt", schedule), progress=False)
    step = crashing.train_step

    def crash_after_step_8():
        if crashing.state.step == 8:
            raise KeyboardInterrupt
        return step()

    crashing.train_step = crash_after_step_8
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    if restart_from == "pre-growth":  # the growth at step 6 must then happen again, identically
        (tmp_path / "b" / "checkpoints" / "step-0000006.post-growth.pt").unlink()
    resumed = Trainer(apollo_cfg(gpt_data, tmp_path / "b", "gpt", schedule), progress=False)
    assert len(resumed.model.layers) == (6 if restart_from == "post-growth" else 3)
    resumed.fit()
    # every loss, depth, growth and eval row, bit for bit
    assert timeless(tmp_path / "a") == timeless(tmp_path / "b")


def test_rewarmup_scales_lr_after_growth(bert_data, tmp_path):
    trainer = Trainer(
        apollo_cfg(bert_data, tmp_path, schedule={"rewarmup_steps": 2}, warmup=0.0), progress=False
    )
    assert trainer.lr(3) == pytest.approx(lr_at(3, trainer.cfg.train) / 2)
    assert trainer.lr(4) == pytest.approx(lr_at(4, trainer.cfg.train))
    assert trainer.lr(2) == pytest.approx(lr_at(2, trainer.cfg.train))


def test_lr_rewind_restarts_the_schedule_at_each_growth(bert_data, tmp_path):
    cfg = apollo_cfg(bert_data, tmp_path, schedule={"lr_rewind": True}, warmup=0.25)
    trainer, peak = Trainer(cfg, progress=False), cfg.train.lr
    # 12 steps, growths at 3 and 6; warmup is a quarter of the steps each schedule spans
    assert trainer.lr(2) == pytest.approx(peak)  # stage 0: the global schedule, warmup 3 steps
    assert trainer.lr(3) == pytest.approx(peak / 2)  # 9 steps left: warmup round(2.25) = 2
    assert trainer.lr(6) == pytest.approx(peak / 2)  # 6 steps left: warmup round(1.5) = 2
    assert trainer.lr(7) == pytest.approx(peak)
    assert trainer.lr(11) == pytest.approx(peak * 0.5 * (1 + math.cos(0.75 * math.pi)))


def test_resume_refuses_a_changed_config(bert_data, tmp_path):
    Trainer(make_cfg(bert_data, tmp_path, steps=2), progress=False).fit()
    with pytest.raises(ConfigError, match="different train"):
        Trainer(make_cfg(bert_data, tmp_path, steps=2, lr=1e-2), progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_cuda_trains_and_resumes_identically(gpt_data, tmp_path):
    # bf16 autocast and the device's own dropout RNG, saved and restored with the checkpoint
    def cfg(out):
        return tiny_run(gpt_data, out, model={"dropout": 0.1}, train={"precision": "bf16"})

    straight = Trainer(cfg(tmp_path / "a"), "cuda", progress=False)
    assert straight.autocast.fast_dtype == torch.bfloat16
    straight.fit()
    losses_a = [r.get("loss", r.get("eval_loss")) for r in metrics_rows(tmp_path / "a")]
    assert losses_a and all(math.isfinite(x) for x in losses_a)

    crashing = Trainer(cfg(tmp_path / "b"), "cuda", progress=False)
    step = crashing.train_step

    def crash_after_step_8():
        if crashing.state.step == 8:  # two steps past the step-6 checkpoint (post-growth)
            raise KeyboardInterrupt
        return step()

    crashing.train_step = crash_after_step_8
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    resumed = Trainer(cfg(tmp_path / "b"), "cuda", progress=False)
    assert resumed.state.step == 6 and len(resumed.model.layers) == 4
    resumed.fit()
    assert timeless(tmp_path / "b") == timeless(tmp_path / "a")
