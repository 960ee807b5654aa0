"""Fault injection for chaos testing: kill a training process once, at a chosen point.

    python -m apollo_ray.train RUN.yaml --workers 2 --kill-at-step 7
    python -m apollo_ray.train RUN.yaml --workers 2 --kill-after-checkpoint 6

The trainer calls `step_done` after every optimizer step and `checkpoint_saved` right after a
checkpoint reached its store (before anything else learns of it). The process dies by SIGKILL,
as on a lost node; a marker file in the run's folder keeps the restarted run from dying again.
"""

from __future__ import annotations

import argparse
import os
import signal
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FAULT_MARKER", "FaultInjection", "add_arguments", "requested"]

FAULT_MARKER = ".fault-injected"


@dataclass(frozen=True)
class FaultInjection:
    """Kill this process once: after optimizer step `kill_at_step` (before that step's row is
    logged), or right after the first checkpoint of step `kill_after_checkpoint` is saved (at
    a stage boundary that is the periodic one if the step has one, else the pre-growth one).
    Either may be None."""

    run_dir: Path
    kill_at_step: int | None = None
    kill_after_checkpoint: int | None = None

    def step_done(self, step: int) -> None:
        if step == self.kill_at_step:
            self._kill(f"after step {step}")

    def checkpoint_saved(self, step: int) -> None:
        if step == self.kill_after_checkpoint:
            self._kill(f"after the checkpoint of step {step}")

    def _kill(self, when: str) -> None:
        marker = self.run_dir / FAULT_MARKER
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed pid {os.getpid()} {when}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def add_arguments(parser: argparse.ArgumentParser, resumes: str, killed: str) -> None:
    """The command line's `--kill-at-step` and `--kill-after-checkpoint`: `resumes` says what must
    resume from its last checkpoint, `killed` whose process is killed."""
    chaos = parser.add_argument_group(f"fault injection (chaos testing: {resumes})")
    chaos.add_argument(
        "--kill-at-step",
        type=int,
        default=None,
        metavar="STEP",
        help=f"SIGKILL {killed} once, right after optimizer step STEP",
    )
    chaos.add_argument(
        "--kill-after-checkpoint",
        type=int,
        default=None,
        metavar="STEP",
        help=f"SIGKILL {killed} once, right after the checkpoint of step STEP is saved",
    )


def requested(args: argparse.Namespace) -> dict[str, int]:
    """The faults `add_arguments`' options asked for, as `FaultInjection` keywords."""
    kills = {"kill_at_step": args.kill_at_step, "kill_after_checkpoint": args.kill_after_checkpoint}
    return {k: v for k, v in kills.items() if v is not None}
