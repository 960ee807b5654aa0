"""Growth operators: how N_old physical layers become N_new at a stage boundary, and what happens
to their AdamW moments.

Every operator is a linear map given by `coefficients(n_old, n_new)`: for each new layer j a row
{old index i: weight w_i} meaning new_j = sum_i w_i * old_i, or None for a freshly initialised
layer. One shared mechanism, `grow`, applies the rows to the weights (plus optional noise) and,
with the `copy` optimizer-state policy, to the AdamW moments, so each operator is a few lines
and all of them run through one conformance suite (tests/method/test_growth.py).

AdamW moments of the grown layers (`optimizer_state`):
- `slot`, the release's behaviour: its model holds L layer slots and a growth copies weights
  into them (`stack_model`, `.data` assignment), so the AdamW state stays with the slot: new
  layer j keeps the moments (and step count) of old layer j, whatever weights it now holds, and
  layers beyond the old depth start empty;
- `fresh`: every grown layer starts empty;
- `copy`: the moments are combined by the same rows as the weights.

- `interpolate` (docs/method.md, section 7): a_j = floor(j N_old / N_new),
  f_j its fractional part, new_j = (1 - alpha f_j) old_{a_j} + alpha f_j old_{a_j + 1}.
  alpha = 0 is the released copy; with N_new a multiple of N_old, the `interp` plan of every
  depth then computes exactly the same function after growth as before.
- `stack` (StackBERT): the old block copied on top of itself, new_j = old_{j mod N_old}.
- `random`: the old layers kept at the bottom, the new ones freshly initialised on top.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from apollo_ray.config import ScheduleConfig
from apollo_ray.method.model import TransformerLM

__all__ = ["GrowthOperator", "Interpolate", "RandomInit", "Stack", "grow", "make_growth"]

Row = dict[int, float] | None


class GrowthOperator(ABC):
    """Maps a bank of n_old layers to n_new > n_old layers by per-layer linear combinations."""

    name: str
    noise: float = 0.0  # std of added Gaussian noise, relative to each tensor's std

    @abstractmethod
    def coefficients(self, n_old: int, n_new: int) -> list[Row]:
        """One row per new layer: {old index: weight} (weights sum to 1) or None (fresh init)."""


class Interpolate(GrowthOperator):
    name = "interpolate"

    def __init__(self, alpha: float = 0.0, noise: float = 0.0) -> None:
        if not 0.0 <= alpha <= 1.0 or noise < 0:
            raise ValueError(f"need 0 <= alpha <= 1 and noise >= 0, got {alpha}, {noise}")
        self.alpha, self.noise = alpha, noise

    def coefficients(self, n_old: int, n_new: int) -> list[Row]:
        rows: list[Row] = []
        for j in range(n_new):
            a, rem = divmod(j * n_old, n_new)
            w = self.alpha * rem / n_new  # alpha * f_j
            rows.append({a: 1.0} if w == 0 or a + 1 == n_old else {a: 1 - w, a + 1: w})
        return rows


class Stack(GrowthOperator):
    name = "stack"

    def coefficients(self, n_old: int, n_new: int) -> list[Row]:
        return [{j % n_old: 1.0} for j in range(n_new)]


class RandomInit(GrowthOperator):
    name = "random"

    def coefficients(self, n_old: int, n_new: int) -> list[Row]:
        return [{j: 1.0} if j < n_old else None for j in range(n_new)]


def make_growth(cfg: ScheduleConfig) -> GrowthOperator:
    if cfg.growth == "interpolate":
        return Interpolate(cfg.alpha, cfg.noise)
    return {"stack": Stack, "random": RandomInit}[cfg.growth]()


def grow(
    model: TransformerLM,
    optimizer: torch.optim.Optimizer,
    op: GrowthOperator,
    n_new: int,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    optimizer_state: str = "slot",
    generator: torch.Generator | None = None,
) -> torch.optim.Optimizer:
    """Replace `model.layers` by `n_new` grown layers and return a new optimizer over the model.

    Embedding and head parameters keep their moments; the grown layers' moments follow
    `optimizer_state` (`slot`, `fresh` or `copy`: see the module docstring). Fresh layers (row
    None) come from `model.new_layer()`, which draws from the global torch RNG: seed it (or fork
    it) around this call for reproducibility.
    """
    old = model.layers
    if n_new <= len(old):
        raise ValueError(f"growth must add layers: {len(old)} -> {n_new}")
    rows = op.coefficients(len(old), n_new)
    model.layers = nn.ModuleList(
        model.new_layer() if row is None else _combine(old, row, op.noise, generator)
        for row in rows
    )
    new_optimizer = make_optimizer(model)
    layer_params = {id(p) for p in old.parameters()}
    for p, state in optimizer.state.items():
        if id(p) not in layer_params:
            new_optimizer.state[p] = state
    if optimizer_state == "copy":
        for layer, row in zip(model.layers, rows, strict=True):
            if row is not None:
                _copy_moments(optimizer, new_optimizer, old, layer, row)
    elif optimizer_state == "slot":
        for old_layer, layer in zip(old, model.layers, strict=False):
            for p_old, p_new in zip(old_layer.parameters(), layer.parameters(), strict=True):
                if p_old in optimizer.state:
                    new_optimizer.state[p_new] = optimizer.state[p_old]
    elif optimizer_state != "fresh":
        raise ValueError(f"optimizer_state must be slot, fresh or copy, got {optimizer_state!r}")
    return new_optimizer


@torch.no_grad()
def _combine(old: nn.ModuleList, row: dict[int, float], noise: float, gen) -> nn.Module:
    layer = copy.deepcopy(old[next(iter(row))])
    for name, p in layer.named_parameters():
        p.copy_(sum(w * old[i].get_parameter(name) for i, w in row.items()))
        if noise > 0 and p.numel() > 1:
            eps = torch.randn(p.shape, generator=gen).to(p.device)
            p.add_(eps * (noise * p.std()))
    return layer


def _copy_moments(old_opt, new_opt, old: nn.ModuleList, layer: nn.Module, row) -> None:
    for name, p in layer.named_parameters():
        states = [old_opt.state.get(old[i].get_parameter(name)) for i in row]
        if any(not s for s in states):
            continue
        new_opt.state[p] = {
            "step": max(s["step"] for s in states).clone(),
            "exp_avg": sum(w * s["exp_avg"] for w, s in zip(row.values(), states, strict=True)),
            "exp_avg_sq": sum(
                w * s["exp_avg_sq"] for w, s in zip(row.values(), states, strict=True)
            ),
        }
