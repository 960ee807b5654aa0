"""A run's own files in its folder: `metrics.jsonl` (one JSON row per logged step, growth or
evaluation, with the time it was written), `resumes.jsonl` (one row per restart from a
checkpoint) and `diverged.txt` (why a run stopped on a NaN/inf loss: `NonFiniteLossError`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = [
    "DIVERGED",
    "DIVERGED_KEY",
    "METRICS",
    "RESUMES",
    "MetricsLog",
    "NonFiniteLossError",
    "last_eval",
    "read_rows",
    "record_resume",
]

METRICS = "metrics.jsonl"
RESUMES = "resumes.jsonl"
DIVERGED = "diverged.txt"  # written by rank 0 when the loss became NaN/inf
DIVERGED_KEY = "diverged"  # why, in the last Tune report of a trial that ended so


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops before the weights are touched."""


class MetricsLog:
    """Metrics as JSON lines. On resume, rows the checkpoint does not cover (a later step, or a
    growth that happened after a pre-growth checkpoint) are dropped, so the file reads as one
    uninterrupted run; a run forked from a trunk starts from the trunk's rows `fork_rows`. With
    `path=None` (every rank but 0) it does nothing."""

    def __init__(
        self,
        path: Path | None,
        resume_step: int,
        n_physical: int,
        fork_rows: list[dict[str, Any]] | None = None,
    ) -> None:
        self.path = path
        self._file = None
        if path is None:
            return
        if fork_rows is not None:
            path.write_text("".join(json.dumps(r) + "\n" for r in fork_rows))
        rows = []
        if resume_step and path.exists():
            rows = [
                r
                for r in map(json.loads, path.read_text().splitlines())
                if r["step"] < resume_step
                or (r["step"] == resume_step and r.get("n_physical", 0) <= n_physical)
            ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._file = path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        if self._file:
            self._file.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def read_rows(metrics: Path) -> list[dict[str, Any]]:
    """The whole rows of a metrics.jsonl (none if it does not exist; a line still being written
    is left out)."""
    if not metrics.exists():
        return []
    data = metrics.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def record_resume(run_dir: Path, step: int) -> None:
    """Append when and from which step a run resumed to `<run_dir>/resumes.jsonl`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / RESUMES).open("a") as f:
        f.write(json.dumps({"step": step, "time": time.time()}) + "\n")


def last_eval(metrics: Path) -> dict[str, Any]:
    """The last row of a metrics.jsonl that has an `eval_loss` (a finished run's final one)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return next(r for r in reversed(rows) if "eval_loss" in r)
