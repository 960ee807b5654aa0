"""Held-out evaluation: the final loss on the whole validation split, and its standard error,
against a direct computation over every sequence."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run

from apollo_ray.data.batches import Batches
from apollo_ray.method.model import TransformerLM
from apollo_ray.training.evaluation import Evaluator
from apollo_ray.training.trainer import Trainer


def setup(data, tmp_path, kind, **train):
    cfg = tiny_run(data, tmp_path / "run", kind=kind, train=train)
    val = Batches(cfg.data, kind, "val", cfg.seed)
    torch.manual_seed(0)
    model = TransformerLM(cfg.model.model_copy(update={"vocab_size": val.vocab_size}), 2)
    evaluator = Evaluator(val, cfg, torch.device("cpu"), nullcontext())
    return cfg, val, model, evaluator


def per_sequence(model, val, count):
    """(loss sum, predicted tokens) of each of the first `count` validation sequences."""
    rows = []
    with torch.no_grad():
        for i in range(count):
            batch = val.samples(i, 1)
            logits, _ = model(batch["input_ids"], plan=[0, 1])
            labels = batch["labels"][0]
            loss = F.cross_entropy(logits[0], labels, reduction="sum", ignore_index=-100)
            scored = labels != -100
            right = (logits[0].argmax(-1)[scored] == labels[scored]).sum()
            rows.append((loss.item(), int(scored.sum()), int(right)))
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_final_evaluation_reads_the_whole_split(kind, gpt_data, bert_data, tmp_path):
    data = gpt_data if kind == "gpt" else bert_data
    cfg, val, model, evaluator = setup(data, tmp_path, kind, micro_batch=5, final_eval_tokens=10**9)
    result = evaluator.final(model, [0, 1])
    rows = per_sequence(model, val, val.n_sequences)
    loss, n = rows[:, 0], rows[:, 1]
    mean = loss.sum() / n.sum()
    m, nbar = len(rows), n.mean()
    se = math.sqrt(((loss - mean * n) ** 2).sum() / (m * (m - 1))) / nbar
    assert result["eval_tokens"] == n.sum()
    assert result["eval_loss"] == pytest.approx(mean, rel=1e-6)
    assert result["eval_loss_se"] == pytest.approx(se, rel=1e-4)
    assert result["eval_accuracy"] == pytest.approx(rows[:, 2].sum() / n.sum(), rel=1e-9)
    if kind == "gpt":
        assert result["eval_tokens"] == val.n_sequences * cfg.data.seq_len


def test_final_evaluation_stops_once_it_has_enough_tokens(gpt_data, tmp_path):
    cfg, val, model, evaluator = setup(gpt_data, tmp_path, "gpt", final_eval_tokens=200)
    result = evaluator.final(model, [0, 1])
    wanted = math.ceil(1.1 * 200 / cfg.data.seq_len)
    assert wanted < val.n_sequences
    assert result["eval_tokens"] == wanted * cfg.data.seq_len >= 200
    rows = per_sequence(model, val, wanted)
    assert result["eval_loss"] == pytest.approx(rows[:, 0].sum() / rows[:, 1].sum(), rel=1e-6)


def test_a_run_ends_with_the_final_evaluation(gpt_data, tmp_path):
    cfg = tiny_run(gpt_data, tmp_path / "run", schedule=None, train={"steps": 4, "eval_every": 2})
    trainer = Trainer(cfg, "cpu", progress=False)
    trainer.fit()
    lines = (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    last = rows[-1]
    assert last["step"] == 4 and {"eval_loss", "eval_loss_se", "eval_tokens"} <= last.keys()
    assert last["eval_loss"] == trainer.state.eval_loss
    assert "eval_loss_se" not in rows[1]  # the quick evaluation during training has none


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_the_quick_loss_reads_one_sample_spread_over_the_split(kind, gpt_data, bert_data, tmp_path):
    data = gpt_data if kind == "gpt" else bert_data
    cfg, val, model, evaluator = setup(data, tmp_path, kind, micro_batch=2, eval_batches=3)
    sample = evaluator.sample
    n = val.n_sequences
    assert len(sample) == 6 < n and sorted(set(sample)) == sample
    assert all(i * n // 6 <= s < (i + 1) * n // 6 for i, s in enumerate(sample))  # one a stratum
    batch = val.take(sample)
    with torch.no_grad():
        _, loss = model(batch["input_ids"], batch["labels"], plan=[0, 1])
    # the same sequences and masks for a run of another seed: any two runs' evaluations compare
    other = Batches(cfg.data, kind, "val", seed=7)
    assert other.spread(6) == sample
    assert torch.equal(other.take(sample)["labels"], batch["labels"])
    if kind == "bert":  # one mean over all masked tokens of the sample, micro-batch by micro-batch
        parts = [val.take(sample[i : i + 2]) for i in (0, 2, 4)]
        with torch.no_grad():
            sums = [
                (model(p["input_ids"], p["labels"], plan=[0, 1])[1] * (p["labels"] != -100).sum())
                for p in parts
            ]
        count = sum(int((p["labels"] != -100).sum()) for p in parts)
        assert evaluator.loss(model, [0, 1]) == pytest.approx(sum(sums).item() / count, rel=1e-6)
    else:
        assert evaluator.loss(model, [0, 1]) == pytest.approx(loss.item(), rel=1e-6)


def test_the_final_row_holds_the_test_split_and_the_sample(gpt_data, tmp_path):
    cfg = tiny_run(gpt_data, tmp_path / "run", schedule=None, train={"steps": 4, "eval_every": 2})
    trainer = Trainer(cfg, "cpu", progress=False)
    trainer.fit()
    last = json.loads((cfg.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    wanted = math.ceil(1.1 * cfg.train.final_eval_tokens / cfg.data.seq_len)
    assert Batches(cfg.data, "gpt", "test", cfg.seed).n_sequences > wanted
    assert last["test_tokens"] == last["eval_tokens"] == wanted * cfg.data.seq_len
    assert {"test_loss", "test_loss_se", "test_accuracy"} <= last.keys()
    assert last["test_loss"] != last["eval_loss"]
    assert last["eval_sample_loss"] == pytest.approx(trainer.evaluate(), rel=1e-12)
