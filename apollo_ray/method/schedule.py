"""The progressive schedule: which stage a step is in, and which layer plan each micro-batch runs.

Layer plans map the N physical layers onto a depth d (docs/method.md, section 2):
- `interp_plan(N, d)`: consecutive repeats, layer floor(i N / d) at position i (Apollo);
- `stack_plan(N, d)`: cyclic, as the release's `stack_meta_layer` (StackBERT-like).

`Schedule` turns a `ScheduleConfig` and the step budget into stage boundaries (derived, not
configured) and answers, as a pure function of (step, micro-batch), the stage, the number of
physical layers and the plan. Every data-parallel rank computes the same answer without
communicating, and a resumed run continues the same sequence.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from apollo_ray.config import ScheduleConfig, stage_starts
from apollo_ray.method.depth import DepthSampler, make_sampler

__all__ = ["Schedule", "Step", "interp_plan", "stack_plan"]


def interp_plan(n: int, depth: int) -> list[int]:
    """The n layers each repeated in a consecutive block: n=3, d=7 -> [0,0,0,1,1,2,2]."""
    _check(n, depth)
    return [i * n // depth for i in range(depth)]


def stack_plan(n: int, depth: int) -> list[int]:
    """The n layers cycled, the remainder taken from the top: n=3, d=7 -> [0,1,2,0,1,2,2]."""
    _check(n, depth)
    rest = depth % n
    return [i % n for i in range(depth - rest)] + list(range(n - rest, n))


def _check(n: int, depth: int) -> None:
    if not 1 <= n <= depth:
        raise ValueError(f"a plan needs 1 <= physical layers <= depth, got {n} and {depth}")


PLANS = {"interp": interp_plan, "stack": stack_plan}


@dataclass(frozen=True)
class Step:
    """What one micro-batch runs."""

    stage: int
    n_physical: int
    depth: int
    plan: list[int]


class Schedule:
    """Stages, depths and plans of one run of `total_steps` optimizer steps."""

    def __init__(self, cfg: ScheduleConfig | None, n_layer: int, total_steps: int, seed: int):
        cfg = cfg or ScheduleConfig(depths=[n_layer], stage_ends=[])
        self.cfg, self.n_layer, self.seed = cfg, n_layer, seed
        self.sampler: DepthSampler = make_sampler(cfg.sampler, cfg.tau)
        self.plan_fn = PLANS[cfg.plan]
        self.starts = stage_starts(cfg.stage_ends, total_steps)

    @property
    def depths(self) -> list[int]:
        return self.cfg.depths

    def stage_at(self, step: int) -> int:
        return bisect.bisect_right(self.starts, step)

    def n_physical(self, step: int) -> int:
        return self.depths[self.stage_at(step)]

    def step(self, step: int, micro: int) -> Step:
        """Stage, N, sampled depth and plan for micro-batch `micro` of optimizer step `step`."""
        stage = self.stage_at(step)
        n = self.depths[stage]
        depth = self.sampler.sample(n, self.n_layer, self.seed, step, micro)
        return Step(stage, n, depth, self.plan_fn(n, depth))

    def eval_plan(self, n_physical: int) -> list[int]:
        """Evaluation always runs the full depth L (docs/method.md, section 8)."""
        return self.plan_fn(n_physical, self.n_layer)
