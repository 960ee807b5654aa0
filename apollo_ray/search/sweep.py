"""The scratch baseline's sweep: the runs that tune scratch per budget, and the choice among them.

Scratch gets the tuning the method gets (issue 26): per budget, the best of a sweep of peak
learning rates and schedule families, chosen on the validation split on a seed of its own (so
no reading seed keeps the sweep's selection luck), then trained on the reading seeds.

- **wsd** (warmup-stable-decay: one warmup in steps for every budget, constant LR, a linear
  decay to zero over the last `decay_fraction`): every budget of one LR comes from one run, the
  trunk (the largest budget), and one branch per shorter budget that forks from the trunk's
  checkpoint at its own decay start (`training/fork.py`): a branch is bit-identical to the same
  run trained alone and shares its cache key, for a fraction of its cost.
- **cosine** (decay over the whole run), at the LR wsd chose, for the budgets around the full
  one, kept where it ends lower.

A chosen LR at the edge of its sweep extends the sweep by a factor of 2 beyond that edge. The
runs of different settings do not depend on each other: `sweep` hands them over in batches
(every LR of a round, every cosine run), which the study trains side by side as far as the
cluster's resources allow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from apollo_ray.config import RunConfig
from apollo_ray.training.checkpoints import checkpoint_name
from apollo_ray.training.optim import decay_start

__all__ = [
    "Job",
    "Setting",
    "Sweep",
    "alone",
    "choose",
    "cosine_jobs",
    "edge_lrs",
    "scratch_run",
    "sweep",
    "wsd_runs",
]

Family = Literal["wsd", "cosine"]
KEEP_ALL = 10**6  # train.keep_checkpoints of a scratch run: every evaluation's checkpoint


@dataclass(frozen=True, order=True)
class Setting:
    """How a scratch run is tuned: its schedule family and peak learning rate."""

    family: Family
    lr: float

    def __str__(self) -> str:
        return f"{self.family} lr {self.lr:.3g}"


Job = tuple[Setting, Sequence[float]]  # a setting's runs at these budgets


def scratch_run(
    base: RunConfig,
    budget: float,
    setting: Setting,
    seed: int,
    warmup_steps: int,
    decay_fraction: float = 0.2,
) -> RunConfig:
    """The scratch run of `budget` times base's steps with `setting` on `seed`: base without a
    schedule, its warmup `warmup_steps` long whatever the budget, named for what it is. It
    keeps the checkpoint of every evaluation: a point the any-checkpoint check flags is read
    from it on validation and test like a finished run (`Trainer.read_checkpoint`)."""
    data = base.model_dump()
    steps = round(budget * base.train.steps)
    data["train"] |= {
        "steps": steps,
        "lr": setting.lr,
        "decay": setting.family,
        "warmup_steps": warmup_steps,
        "decay_fraction": decay_fraction,
        "min_lr_ratio": 0.0,
        "checkpoint_every": base.train.eval_every,
        "keep_checkpoints": KEEP_ALL,
    }
    name = f"scratch-{budget:g}x-{setting.family}-lr{setting.lr:.3g}-seed{seed}"
    return RunConfig.model_validate(data | {"schedule": None, "seed": seed, "name": name})


def wsd_runs(
    runs: Mapping[float, RunConfig], where: Callable[[RunConfig, str], str]
) -> dict[float, RunConfig]:
    """The wsd `runs` of one LR and seed (budget -> run), as one trunk (the largest budget)
    that keeps a branch checkpoint at each shorter budget's decay start, and branches that fork
    from it (`where(trunk, checkpoint name)`: the checkpoint's location once the trunk saved it).
    Train the trunk first."""
    top = max(runs)
    starts = {b: decay_start(cfg.train) for b, cfg in runs.items() if b != top}
    trunk = runs[top]
    trunk = trunk.model_copy(
        update={"train": trunk.train.model_copy(update={"branch_steps": sorted(starts.values())})}
    )
    out = {top: trunk}
    for budget, step in starts.items():
        cfg = runs[budget]
        fork = where(trunk, checkpoint_name(step, "branch"))
        out[budget] = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"fork_from": fork})}
        )
    return out


def alone(cfg: RunConfig) -> RunConfig:
    """Branch `cfg` trained from step 0 instead of from its trunk's checkpoint: the same run
    (for a trunk found cached without that checkpoint)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"fork_from": None})})


@dataclass
class Sweep:
    """What a sweep found: per budget the chosen setting, and wsd's choice before cosine was
    tried; the validation loss of every (budget, setting) it trained."""

    chosen: dict[float, Setting]
    chosen_wsd: dict[float, Setting]
    losses: dict[tuple[float, Setting], float] = field(repr=False)


def sweep(
    train: Callable[[Sequence[Job]], Sequence[Mapping[float, float]]],
    lrs: Sequence[float],
    budgets: Sequence[float],
    extend: int = 2,
    cosine: bool = True,
) -> Sweep:
    """Tune scratch per budget: wsd at every LR of `lrs` over every budget, the LRs extended
    past a chosen edge up to `extend` times; then, with `cosine`, cosine at wsd's chosen LR for
    the budgets from 1/4 to 1x, kept where it ends lower. `train(jobs)` trains (or reuses) a
    batch of independent jobs and returns, per job, budget -> the validation loss of its run."""
    lrs, losses = list(lrs), {}
    swept: set[float] = set()

    def run(jobs: list[Job]) -> None:
        for (setting, _), result in zip(jobs, train(jobs), strict=True):
            losses.update({(b, setting): loss for b, loss in result.items()})

    for _ in range(extend + 1):
        run([(Setting("wsd", lr), budgets) for lr in lrs if lr not in swept])
        swept.update(lrs)
        extra = edge_lrs(choose(losses, budgets), lrs)
        if not extra:
            break
        lrs += extra
    chosen_wsd = choose(losses, budgets)
    if cosine:
        run(cosine_jobs(chosen_wsd))
    return Sweep(choose(losses, budgets), chosen_wsd, losses)


def cosine_jobs(chosen_wsd: Mapping[float, Setting]) -> list[Job]:
    """Cosine at wsd's chosen LR, one run per budget from 1/4 to 1x (the rest keep wsd's
    choice whatever cosine does)."""
    return [(Setting("cosine", s.lr), [b]) for b, s in chosen_wsd.items() if 0.25 <= b <= 1.0]


def choose(
    losses: Mapping[tuple[float, Setting], float], budgets: Iterable[float]
) -> dict[float, Setting]:
    """Per budget, the setting whose run ended with the lowest validation loss (ties: the
    smaller LR, then wsd)."""
    chosen = {}
    for budget in budgets:
        tried = {s: loss for (b, s), loss in losses.items() if b == budget}
        if not tried:
            raise ValueError(f"no sweep run at {budget:g}x")
        chosen[budget] = min(tried, key=lambda s: (tried[s], s.lr, s.family != "wsd"))
    return chosen


def edge_lrs(chosen: Mapping[float, Setting], lrs: Sequence[float]) -> list[float]:
    """The LRs that extend the sweep: half the smallest when a budget chose it, twice the
    largest when a budget chose that (none when every choice lies inside the sweep)."""
    low, high = min(lrs), max(lrs)
    picked = {s.lr for s in chosen.values()}
    return [lr for lr, edge in ((low / 2, low), (high * 2, high)) if edge in picked]
