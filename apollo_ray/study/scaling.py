"""How a schedule searched on a proxy model is carried to a deeper target (docs/method.md,
section 7, "From a proxy to the target"): stage ends stay fractions of the steps, depths become
the same fractions of the target's layers, rounded to a valid plan; every other knob as is."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["scale_plan", "scale_schedule"]


def scale_plan(
    depths: list[int], stage_ends: list[float], proxy_layers: int, target_layers: int
) -> tuple[list[int], list[float]]:
    """`depths` (of a `proxy_layers`-deep model) and `stage_ends` for `target_layers`: each
    depth d becomes round(d * target / proxy), halves rounded up, within [1, target], and the
    last is the target's depth; two stages that land on the same depth become one, which ends
    where the later one ended (growth must add layers). The ends are unchanged fractions."""
    if depths[-1] != proxy_layers:
        raise ValueError(f"depths {depths} must end at the proxy's {proxy_layers} layers")
    ratio = target_layers / proxy_layers
    scaled = [min(target_layers, max(1, math.floor(d * ratio + 0.5))) for d in depths[:-1]]
    out_depths: list[int] = []
    out_ends: list[float] = []
    for depth, end in zip([*scaled, target_layers], [*stage_ends, 1.0], strict=True):
        if out_depths and depth <= out_depths[-1]:  # the same depth as the stage before: one
            out_ends[-1] = end
        else:
            out_depths.append(depth)
            out_ends.append(end)
    return out_depths, out_ends[:-1]


def scale_schedule(schedule: dict[str, Any], proxy_layers: int, target_layers: int) -> dict:
    """A schedule's fields (`ScheduleConfig` as a dict) carried to `target_layers`."""
    depths, ends = scale_plan(
        schedule["depths"], schedule["stage_ends"], proxy_layers, target_layers
    )
    return {**schedule, "depths": depths, "stage_ends": ends}
