"""A queued step read one step late, and the clock of training time.

The trainer queues step s+1 before it reads step s, so the device never waits for the host; a
step that evaluates, checkpoints, ends or precedes a growth is read at once (its weights are
needed as they are). `LateRead` carries a step's loss and gradient norm to the host (`pending`),
reads them (`settle`: `NonFiniteLossError` if either is not finite), and keeps the clock of
training time: it runs from the first queued step to the moment its step was done (on a GPU when
its values reached the host, on the CPU, which computes as it queues, when it was queued), so
each step is charged its own time, and evaluation and saving between reads do not count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from apollo_ray.training.runlog import NonFiniteLossError

__all__ = ["LateRead"]


class _State(Protocol):
    step: int
    wall_time: float


class LateRead:
    """The late read of a run's queued steps and its clock of training time."""

    def __init__(self, run_dir: Path, clock: Callable[[], float] = time.perf_counter) -> None:
        self.run_dir = run_dir  # what the NaN/inf message names
        self.clock = clock
        self._busy_since: float | None = None  # the clock of training time not yet accounted

    def start(self) -> None:
        """A step is being queued: start the clock if it stands."""
        if self._busy_since is None:
            self._busy_since = self.clock()

    def pending(self, values: torch.Tensor) -> tuple[Any, ...]:
        """What a queued step's row carries as `pending`: `values` (loss, gradient norm) on their
        way to the host, and the event that marks them there (GPU) or the time they were done
        (CPU)."""
        host, done = _to_host(values)
        return host, done if done is not None else self.clock()

    def settle(self, row: dict[str, Any], state: _State) -> dict[str, Any]:
        """The row of a queued step with its loss, gradient norm and wall time read;
        `NonFiniteLossError` if the loss or the norm is not finite (the step left the weights
        untouched). `state.wall_time` gains the training time up to this read."""
        values, done = row.pop("pending")
        if isinstance(done, torch.cuda.Event):
            done.synchronize()
            done = self.clock()
        loss, norm = values.tolist()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise NonFiniteLossError(
                f"loss is {loss} (gradient norm {norm}) at step {row['step'] - 1}; the last "
                f"checkpoint and the metrics written so far in {self.run_dir} are intact"
            )
        dt = done - self._busy_since
        self._busy_since = done if state.step > row["step"] else None  # one more queued
        state.wall_time += dt
        return {
            "step": row["step"],
            "loss": loss,
            **{k: row[k] for k in ("stage", "n_physical", "depth", "lr")},
            "grad_norm": norm,
            "tokens": row["tokens"],
            "flops": row["flops"],
            "wall_time": state.wall_time,
        }


def _to_host(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying `values` to the host: the copy, and on a GPU the event that marks it done
    (waiting on it waits for this step only, not for what was queued after it)."""
    if values.device.type != "cuda":
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done
