"""A run that starts from another run's checkpoint instead of step 0: a branch of a trunk.

The WSD frontier trains one constant-LR trunk per learning rate and, for every shorter budget,
a branch that forks from the trunk's checkpoint at that budget's decay start and decays from
there. Up to that step the branch and the trunk are the same run (same data order, dropout
stream and LR), so the branch ends bit-identical to the same run trained alone, for a fraction
of its cost. The trunk keeps those checkpoints (`train.branch_steps`, tag `branch`), each with
the trunk's metrics rows so far; a branch names one in `train.fork_from`.
"""

from __future__ import annotations

import io
from typing import Any

from apollo_ray.config import ConfigError, RunConfig, TrainConfig
from apollo_ray.storage import read_bytes, redact
from apollo_ray.training.checkpoints import load
from apollo_ray.training.optim import lr_at

__all__ = ["FREE", "load_fork"]

FREE = ("steps", "branch_steps", "fork_from")  # what a branch may change of its trunk's `train`


def load_fork(cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint `cfg.train.fork_from`, checked to be where `cfg` would be at its step: a
    run with the same config but for name, out_dir and `FREE`, whose LR matched `cfg`'s at every
    step before it. A `ConfigError` names `train.fork_from` and what differs."""
    location = str(cfg.train.fork_from)
    where = f"train.fork_from: {redact(location)}"
    try:
        ckpt = load(io.BytesIO(read_bytes(location)), name=redact(location))
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{where}: cannot load it ({e})") from None
    if "rows" not in ckpt:
        raise ConfigError(f"{where}: not a branch checkpoint (a trunk's train.branch_steps)")
    saved, mine = dict(ckpt["run_config"]), cfg.model_dump(mode="json")
    changed = sorted(
        k for k in mine.keys() - {"name", "out_dir", "train"} if saved.get(k) != mine[k]
    )
    changed += sorted(
        f"train.{k}"
        for k in mine["train"].keys() - set(FREE)
        if saved["train"].get(k) != mine["train"][k]
    )
    if changed:
        raise ConfigError(f"{where}: a run with different {', '.join(changed)}")
    step, trunk = ckpt["state"]["step"], TrainConfig.model_validate(saved["train"])
    if step > cfg.train.steps:
        raise ConfigError(f"{where}: step {step} is past this run's {cfg.train.steps} steps")
    differ = next((s for s in range(step) if lr_at(s, trunk) != lr_at(s, cfg.train)), None)
    if differ is not None:
        raise ConfigError(
            f"{where}: the trunk's LR differs from this run's at step {differ} "
            f"({lr_at(differ, trunk):.3g} vs {lr_at(differ, cfg.train):.3g}): fork before "
            "this run's decay starts"
        )
    return ckpt
