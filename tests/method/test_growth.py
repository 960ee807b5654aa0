"""Growth operators: one conformance suite that every operator runs through, then the
properties particular to each (function preservation, blending, optimizer-state policies)."""

import pytest
import torch

from apollo_ray.config import ModelConfig, TrainConfig
from apollo_ray.method.growth import Interpolate, RandomInit, Stack, grow
from apollo_ray.method.model import TransformerLM
from apollo_ray.method.schedule import interp_plan, stack_plan
from apollo_ray.training.optim import build_optimizer

OPERATORS = [
    Interpolate(0.0),
    Interpolate(0.5),
    Interpolate(0.3, noise=0.05),
    Stack(),
    RandomInit(),
]
SIZES = [(1, 3), (3, 6), (2, 3), (3, 5), (6, 12)]
L = 12


def tiny(kind: str = "bert", n_physical: int = 3, seed: int = 0) -> TransformerLM:
    cfg = ModelConfig(
        kind=kind, n_layer=L, d_model=32, n_head=2, max_seq_len=16, vocab_size=50, dropout=0.0
    )
    torch.manual_seed(seed)
    return TransformerLM(cfg, n_physical).eval()


def trained(kind: str = "bert", n_physical: int = 3):
    """A model and an AdamW that has taken one step (so every parameter has moments)."""
    model = tiny(kind, n_physical)
    opt = build_optimizer(model, TrainConfig(lr=1e-3))
    x = torch.randint(0, 50, (2, 16))
    _, loss = model(x, x, plan=interp_plan(n_physical, L))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt, x


def do_grow(model, opt, op, n_new, policy="fresh", seed=0):
    return grow(
        model,
        opt,
        op,
        n_new,
        lambda m: build_optimizer(m, TrainConfig(lr=1e-3)),
        policy,
        torch.Generator().manual_seed(seed),
    )


# ---- conformance: every operator ------------------------------------------------------------


@pytest.mark.parametrize("op", OPERATORS, ids=lambda o: f"{o.name}-{getattr(o, 'alpha', '')}")
@pytest.mark.parametrize(("n_old", "n_new"), SIZES)
def test_rows_are_convex_combinations(op, n_old, n_new):
    rows = op.coefficients(n_old, n_new)
    assert len(rows) == n_new
    for row in rows:
        if row is not None:
            assert all(0 <= i < n_old and w >= 0 for i, w in row.items())
            assert sum(row.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("op", OPERATORS, ids=lambda o: f"{o.name}-{getattr(o, 'alpha', '')}")
@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_grow_replaces_layers_and_keeps_the_rest(op, kind):
    model, opt, x = trained(kind, 3)
    old_layers = model.layers
    emb = model.wte.weight
    new_opt = do_grow(model, opt, op, 6)
    assert len(model.layers) == 6 and model.wte.weight is emb
    old_ids = {id(p) for p in old_layers.parameters()}
    assert not old_ids & {id(p) for p in model.layers.parameters()}  # no aliasing of old layers
    in_opt = [p for g in new_opt.param_groups for p in g["params"]]
    assert len(in_opt) == len({id(p) for p in in_opt}) == len(list(model.parameters()))
    assert torch.equal(new_opt.state[emb]["exp_avg"], opt.state[emb]["exp_avg"])
    logits, _ = model(x, plan=interp_plan(6, L))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("op", OPERATORS, ids=lambda o: f"{o.name}-{getattr(o, 'alpha', '')}")
def test_grow_is_deterministic(op):
    grown = []
    for _ in range(2):
        model, opt, _ = trained("gpt", 2)
        with torch.random.fork_rng():
            torch.manual_seed(5)
            do_grow(model, opt, op, 5, seed=1)
        grown.append(model.layers.state_dict())
    assert all(torch.equal(grown[0][k], grown[1][k]) for k in grown[0])


@pytest.mark.parametrize("op", OPERATORS, ids=lambda o: f"{o.name}-{getattr(o, 'alpha', '')}")
def test_growth_must_add_layers(op):
    model, opt, _ = trained("bert", 3)
    with pytest.raises(ValueError, match="add layers"):
        do_grow(model, opt, op, 3)


# ---- particular properties ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt"])
@pytest.mark.parametrize(("n_old", "n_new"), [(1, 3), (3, 6), (6, 12), (2, 6), (1, 12)])
def test_interpolate_alpha0_preserves_every_depth(kind, n_old, n_new):
    model, opt, x = trained(kind, n_old)
    with torch.no_grad():
        before = {d: model(x, plan=interp_plan(n_old, d))[0] for d in range(n_new, L + 1)}
    do_grow(model, opt, Interpolate(0.0), n_new)
    with torch.no_grad():
        for d, logits in before.items():
            diff = (model(x, plan=interp_plan(n_new, d))[0] - logits).abs().max().item()
            assert diff <= 1e-6, (d, diff)


def test_stack_preserves_stack_plans_of_whole_cycles():
    # StackBERT's copy is function-preserving for depths that are whole cycles of the new bank;
    # at other depths the cyclic remainder ([..., 2] vs [..., 3, 4, 5]) differs.
    model, opt, x = trained("gpt", 3)
    with torch.no_grad():
        before = {d: model(x, plan=stack_plan(3, d))[0] for d in (6, 12)}
    do_grow(model, opt, Stack(), 6)
    with torch.no_grad():
        for d, logits in before.items():
            assert torch.allclose(model(x, plan=stack_plan(6, d))[0], logits, atol=1e-6)


def test_interpolate_blends_neighbours_and_changes_the_function():
    rows = Interpolate(alpha=1.0).coefficients(2, 3)
    assert rows == [{0: 1.0}, {0: pytest.approx(1 / 3), 1: pytest.approx(2 / 3)}, {1: 1.0}]
    model, opt, x = trained("bert", 2)
    old = [layer.mlp.fc.weight.detach().clone() for layer in model.layers]
    before = model(x, plan=interp_plan(2, L))[0].detach()
    do_grow(model, opt, Interpolate(alpha=0.6), 4)  # j=1: a=0, f=1/2 -> 0.7 old0 + 0.3 old1
    assert torch.allclose(model.layers[1].mlp.fc.weight, 0.7 * old[0] + 0.3 * old[1], atol=1e-7)
    after = model(x, plan=interp_plan(4, L))[0].detach()
    assert (after - before).abs().max() > 1e-4


def test_random_keeps_old_layers_at_the_bottom():
    model, opt, _ = trained("bert", 2)
    old = [layer.attn.qkv.weight.detach().clone() for layer in model.layers]
    do_grow(model, opt, RandomInit(), 4)
    assert torch.equal(model.layers[0].attn.qkv.weight, old[0])
    assert torch.equal(model.layers[1].attn.qkv.weight, old[1])
    assert not torch.equal(model.layers[2].attn.qkv.weight, old[0])


def test_noise_is_relative_to_tensor_std():
    model, opt, _ = trained("bert", 1)
    w = model.layers[0].mlp.fc.weight.detach().clone()
    do_grow(model, opt, Interpolate(0.0, noise=0.1), 2)
    delta = model.layers[0].mlp.fc.weight.detach() - w
    assert delta.std().item() == pytest.approx(0.1 * w.std().item(), rel=0.1)


def test_optimizer_state_fresh_and_copy():
    model, opt, _ = trained("gpt", 2)
    moments = [opt.state[layer.mlp.fc.weight]["exp_avg"].clone() for layer in model.layers]
    fresh = do_grow(model, opt, Interpolate(0.0), 4, "fresh")
    assert all(p not in fresh.state for p in model.layers.parameters())

    model, opt, _ = trained("gpt", 2)
    copied = do_grow(model, opt, Interpolate(alpha=1.0), 3, "copy")
    state = copied.state[model.layers[1].mlp.fc.weight]  # 1/3 old0 + 2/3 old1
    assert torch.allclose(state["exp_avg"], moments[0] / 3 + 2 * moments[1] / 3, atol=1e-8)
    assert state["step"].item() == 1
    assert all(p in copied.state for p in model.layers.parameters())


def test_optimizer_state_slot_is_the_releases_slot_model():
    """`slot` against the release's mechanics, rebuilt here: a model that holds all L layer
    slots under one AdamW, trained on its first N_old slots, grown by assigning `.data` into
    the slots (`stack_model`, top slot first). One more identical step must give the same
    weights and moments, slot by slot."""
    n_old, n_new = 2, 4
    model, opt, x = trained("gpt", n_old)
    slots = tiny("gpt", L)  # the release's model: L slots, the first n_old trained
    slots.load_state_dict(model.state_dict(), strict=False)  # all but slots n_old..L-1
    release_opt = build_optimizer(slots, TrainConfig(lr=1e-3))
    ours_params = dict(model.named_parameters())
    for name, p in slots.named_parameters():
        if name in ours_params and ours_params[name] in opt.state:
            release_opt.state[p] = {k: v.clone() for k, v in opt.state[ours_params[name]].items()}
    sources = [j * n_old // n_new for j in range(n_new)]  # the release's extend_meta_layer
    with torch.no_grad():
        for tgt in reversed(range(n_new)):
            for src_p, tgt_p in zip(
                slots.layers[sources[tgt]].parameters(), slots.layers[tgt].parameters(), strict=True
            ):
                tgt_p.data = src_p.data.clone()

    opt = do_grow(model, opt, Interpolate(0.0), n_new, "slot")
    for j in range(n_new):
        fc = model.layers[j].mlp.fc.weight
        if j < n_old:
            assert opt.state[fc]["step"].item() == 1
        else:
            assert fc not in opt.state
    for net, optimizer in ((model, opt), (slots, release_opt)):
        net.train()
        _, loss = net(x, x, plan=interp_plan(n_new, L))
        loss.backward()
        optimizer.step()
    for j in range(n_new):
        for a, b in zip(model.layers[j].parameters(), slots.layers[j].parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-7)
            assert torch.allclose(opt.state[a]["exp_avg"], release_opt.state[b]["exp_avg"])
