"""Tests for apollo_ray.method.model: shapes, loss masking, layer plans, attention direction, init.

Run: `pytest tests/method/test_model.py` (tiny CPU configs, a few seconds).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from apollo_ray.config import ModelConfig
from apollo_ray.method.model import TransformerLM

KINDS = ["bert", "gpt"]
V, B, T = 100, 2, 16


def tiny(kind: str, **kw) -> ModelConfig:
    args = dict(kind=kind, n_layer=3, d_model=64, n_head=4, vocab_size=V, max_seq_len=32)
    return ModelConfig(**(args | kw))


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_loss_ignores_minus_100(kind: str) -> None:
    torch.manual_seed(0)
    model = TransformerLM(tiny(kind)).eval()
    x = ids()
    logits, loss = model(x)
    assert logits.shape == (B, T, V) and loss is None
    labels = ids(1)
    labels[:, ::2] = -100
    logits, loss = model(x, labels)
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert loss.shape == () and torch.allclose(loss, expected)
    assert math.isclose(loss.item(), math.log(V), rel_tol=0.1)  # near-uniform at init


@pytest.mark.parametrize("kind", KINDS)
def test_plan_with_repeats_runs_the_same_layer_again(kind: str) -> None:
    torch.manual_seed(0)
    shared = TransformerLM(tiny(kind), n_physical=2).eval()
    # The same function with the repeats materialised as separate copies of layer 0.
    unrolled = copy.deepcopy(shared)
    l0, l1 = shared.layers
    unrolled.layers = torch.nn.ModuleList([copy.deepcopy(l0), copy.deepcopy(l0), copy.deepcopy(l1)])
    x = ids()
    with torch.no_grad():
        assert torch.equal(shared(x, plan=[0, 0, 1])[0], unrolled(x)[0])
        assert torch.equal(shared(x)[0], shared(x, plan=[0, 1])[0])  # default plan: identity


def test_shared_layer_accumulates_gradient_from_each_use() -> None:
    torch.manual_seed(0)
    model = TransformerLM(tiny("gpt"), n_physical=2)
    _, loss = model(ids(), ids(1), plan=[1, 1])
    loss.backward()
    assert model.layers[0].attn.qkv.weight.grad is None
    assert model.layers[1].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("plan", "error"),
    [
        ([3], ValueError),
        ([-1], ValueError),
        ([], ValueError),
        ([0.5], TypeError),
        (["0"], TypeError),
    ],
)
def test_bad_plan_is_rejected(plan: list, error: type[Exception]) -> None:
    model = TransformerLM(tiny("bert"))
    with pytest.raises(error, match="plan"):
        model(ids(), plan=plan)


def test_bad_construction_and_inputs() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        TransformerLM(tiny("gpt", vocab_size=None))
    with pytest.raises(ValueError, match="n_physical"):
        TransformerLM(tiny("gpt"), n_physical=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        TransformerLM(tiny("gpt"))(torch.zeros(1, 33, dtype=torch.long))


def test_gpt_is_causal_and_bert_is_bidirectional() -> None:
    x = ids()
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % V  # change one token in the middle
    for kind in KINDS:
        torch.manual_seed(0)
        model = TransformerLM(tiny(kind)).eval()
        with torch.no_grad():
            diff = (model(x)[0] - model(y)[0]).abs().amax(dim=(0, 2))  # (T,)
        assert (diff[10:] > 0).all()
        if kind == "gpt":
            assert (diff[:10] == 0).all()
        else:
            assert (diff[:10] > 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_only_in_training(kind: str) -> None:
    torch.manual_seed(0)
    model = TransformerLM(tiny(kind, dropout=0.1))
    x = ids()
    with torch.no_grad():
        assert not torch.equal(model(x)[0], model(x)[0])  # training: random
        model.eval()
        assert torch.equal(model(x)[0], model(x)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_init_statistics(kind: str) -> None:
    torch.manual_seed(0)
    cfg = tiny(kind, n_layer=12, d_model=256, vocab_size=1000)
    model = TransformerLM(cfg, n_physical=2)  # residual scaling uses the full depth L = 12
    layer = model.layers[1]
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    proj_std = 0.02 / math.sqrt(2 * 12) if kind == "gpt" else 0.02
    assert layer.attn.proj.weight.std().item() == pytest.approx(proj_std, rel=0.05)
    assert layer.mlp.proj.weight.std().item() == pytest.approx(proj_std, rel=0.05)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name  # all biases (incl. the MLM decoder bias) start at zero
        elif p.dim() == 1:
            assert (p == 1).all(), name  # LayerNorm gains
