"""Checkpoints: their names, saving and loading, and the stores a run writes them to.

Names: `step-0000150` (periodic), `step-0000150.pre-growth` and `step-0000150.post-growth` (a
stage boundary, before and after growing the layers). On one process a checkpoint is the file
`<run_dir>/checkpoints/<name>.pt` (`LocalStore`); in a study it is `<name>/checkpoint.pt` in the
run's storage folder or bucket, written by a one-worker run itself (`StorageStore`) or reported
to Ray Train (`apollo_ray.launch.distributed.RayStore`). Either way it holds model, optimizer,
`TrainState`, per-rank RNG states and the run config, and loads with `weights_only=True`.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, Protocol

import pyarrow.fs
import torch
import torch.distributed as dist

from apollo_ray.config import ConfigError, RunConfig
from apollo_ray.storage import filesystem, join_uri

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "LocalStore",
    "StorageStore",
    "Store",
    "check_same_run",
    "checkpoint_name",
    "is_growth",
    "is_periodic",
    "latest_local",
    "load",
    "local_checkpoints",
    "name_order",
    "rng_states",
    "set_rng_state",
]

CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = "checkpoint.pt"  # inside a Ray Train checkpoint folder
TAGS = ("", "branch", "pre-growth", "post-growth")  # at one step, in the order they are written
NAME = re.compile(r"step-(?P<step>\d{7})(\.(?P<tag>branch|pre-growth|post-growth))?")


def checkpoint_name(step: int, tag: str = "") -> str:
    """`step-0000150`, or with a tag `step-0000150.pre-growth` (`pre-growth`, `post-growth`: a
    stage boundary; `branch`: where a shorter run forks from a trunk, `train.branch_steps`)."""
    if tag not in TAGS:
        raise ValueError(f"checkpoint tag must be one of {TAGS}, got {tag!r}")
    return f"step-{step:07d}" + (f".{tag}" if tag else "")


def _match(name: str) -> re.Match[str] | None:
    return NAME.fullmatch(name.removesuffix(".pt"))


def is_checkpoint(name: str) -> bool:
    """Whether `name` (with or without `.pt`) is a checkpoint's name."""
    return _match(name) is not None


def is_periodic(name: str) -> bool:
    """A periodic checkpoint's name (no growth tag), with or without `.pt`."""
    match = _match(name)
    return match is not None and match["tag"] is None


def is_growth(name: str) -> bool:
    """A stage-boundary checkpoint's name (pre- or post-growth)."""
    match = _match(name)
    return match is not None and match["tag"] in ("pre-growth", "post-growth")


def name_order(name: str) -> tuple[int, int]:
    """Sort key of checkpoint names: by step, and at one step periodic, pre-, post-growth."""
    match = _match(name)
    if match is None:
        raise ValueError(f"not a checkpoint name: {name!r}")
    return int(match["step"]), TAGS.index(match["tag"] or "")


def load(source: Path | str | IO[bytes], name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint (a path or an open binary file) safely (`weights_only=True`: tensors
    and plain Python types only). ValueError if it is not an apollo_ray checkpoint."""
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{name or source}: not an apollo_ray checkpoint (format {CHECKPOINT_FORMAT})"
        )
    return ckpt


def local_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoint files on one process, oldest first."""
    found = [p for p in (run_dir / "checkpoints").glob("step-*.pt") if is_checkpoint(p.name)]
    return sorted(found, key=lambda p: name_order(p.name))


def latest_local(run_dir: Path) -> Path | None:
    found = local_checkpoints(run_dir)
    return found[-1] if found else None


def check_same_run(saved: dict[str, Any], cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume a checkpoint written by a run with another config (name and out_dir
    aside, and where a run keeps or takes branch checkpoints, which changes nothing it
    computes): it would mix two runs."""
    now = cfg.model_dump(mode="json")
    free = ("branch_steps", "fork_from")
    saved = {**saved, "train": {k: v for k, v in saved.get("train", {}).items() if k not in free}}
    now["train"] = {k: v for k, v in now["train"].items() if k not in free}
    changed = sorted(k for k in now.keys() - {"name", "out_dir"} if saved.get(k) != now[k])
    if changed:
        raise ConfigError(
            f"{run_dir} holds checkpoints of a run with different {', '.join(changed)}; "
            "resuming would mix two runs: use another `name`/`out_dir` or remove the old run"
        )


def rng_states(device: torch.device, world_size: int) -> list[dict[str, Any]]:
    """Every rank's RNG states (CPU, and the device's on a GPU), gathered from all ranks, so
    that each resumes its own dropout stream. Every rank calls it at the same point."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    mine = {"cpu": torch.get_rng_state(), "cuda": cuda}
    if world_size == 1:
        return [mine]
    states = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


def set_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


class Store(Protocol):
    """Where checkpoints go and where a resumed run finds them."""

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads, or None."""

    def names(self) -> list[str]:
        """The names of the checkpoints saved, oldest first."""

    def location(self, name: str) -> str:
        """Where checkpoint `name` lies once reported (a path or a URI)."""

    def report(
        self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None, name: str = ""
    ) -> None:
        """Called by every rank at the same points; `checkpoint` is given on rank 0 only."""


class LocalStore:
    """Checkpoints as files `<run_dir>/checkpoints/<name>.pt`, written atomically; the newest
    `keep` periodic ones are kept, stage-boundary ones all. Metrics are ignored here (they go to
    metrics.jsonl)."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir, self.keep = run_dir, keep

    def latest(self) -> dict[str, Any] | None:
        path = latest_local(self.run_dir)
        return load(path) if path else None

    def names(self) -> list[str]:
        return [p.name.removesuffix(".pt") for p in local_checkpoints(self.run_dir)]

    def location(self, name: str) -> str:
        return str(self.run_dir / "checkpoints" / f"{name}.pt")

    def report(
        self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None, name: str = ""
    ) -> None:
        if checkpoint is None:
            return
        path = Path(self.location(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
        periodic = [p for p in local_checkpoints(self.run_dir) if is_periodic(p.name)]
        for old in periodic[: -self.keep]:
            old.unlink()


class StorageStore:
    """Checkpoints as `<name>/checkpoint.pt` in a run's storage folder or bucket, written by this
    process (a one-worker run without Ray Train, `apollo_ray.launch.solo`); every metrics row it is
    handed goes on to `on_report` (a Tune trial's `tune.report`). A file is written under a
    temporary name and then moved into place, so a checkpoint that is there is whole. The
    newest `keep` periodic checkpoints are kept, stage-boundary ones all."""

    def __init__(
        self,
        storage: str,
        keep: int,
        on_report: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.fs, self.root = filesystem(storage)
        self.uri, self.keep, self.on_report = storage, keep, on_report

    def location(self, name: str) -> str:
        return join_uri(self.uri, name, CHECKPOINT_FILE)

    def names(self) -> list[str]:
        """The checkpoints whose file is in place (a folder still being written is left out)."""
        selector = pyarrow.fs.FileSelector(self.root, allow_not_found=True, recursive=True)
        files = [i.path for i in self.fs.get_file_info(selector)]
        names = [p.rsplit("/", 2)[-2] for p in files if p.endswith(f"/{CHECKPOINT_FILE}")]
        return sorted((n for n in names if is_checkpoint(n)), key=name_order)

    def drop(self, names: Iterable[str]) -> None:
        """Delete these checkpoints from the run's storage."""
        for name in names:
            self.fs.delete_dir(f"{self.root}/{name}")

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint in the run's storage that loads (a file cut short is skipped)."""
        for name in reversed(self.names()):
            path = f"{self.root}/{name}/{CHECKPOINT_FILE}"
            try:
                with self.fs.open_input_file(path) as f:
                    return load(io.BytesIO(f.read()), name=path)
            except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
                print(f"skipping checkpoint {path}: {e}")
        return None

    def report(
        self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None, name: str = ""
    ) -> None:
        if checkpoint is not None:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            folder = f"{self.root}/{name}"
            self.fs.create_dir(folder)
            with self.fs.open_output_stream(f"{folder}/{CHECKPOINT_FILE}.tmp") as f:
                f.write(buffer.getvalue())
            self.fs.move(f"{folder}/{CHECKPOINT_FILE}.tmp", f"{folder}/{CHECKPOINT_FILE}")
            if is_periodic(name):
                self._prune()
        if self.on_report is not None:
            self.on_report(metrics)

    def _prune(self) -> None:
        found = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root))
        periodic = sorted(i.path for i in found if is_periodic(i.base_name))
        for path in periodic[: -self.keep]:
            self.fs.delete_dir(path)
