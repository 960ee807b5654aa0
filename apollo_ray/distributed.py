"""Data-parallel training with Ray Train: the TorchTrainer a run starts, and what each worker runs.

    python -m apollo_ray.train RUN.yaml --workers 2               # local Ray, started for you
    python -m apollo_ray.train RUN.yaml --workers 8 --address auto   # an existing cluster

Two of the three Ray tiers live here (Ray's train_tune_interop pattern): `build_trainer` makes
the `TorchTrainer` for one run (the Tune driver in `apollo_ray.tune` calls it per trial), and
`train_worker` is the per-worker function: it turns the config dict back into a validated
`RunConfig` and runs the ordinary `Trainer` as one DDP rank (gloo on CPU, NCCL on GPU, bf16
autocast on GPU). Checkpoints go through `ray.train.report` (`RayStore`); a restarted worker
group resumes from the latest one, so with `resources.max_failures` a killed worker costs the
steps since the last checkpoint, not the run.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import signal
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from apollo_ray.config import RunConfig
from apollo_ray.data.shards import join_uri
from apollo_ray.tracking import RunMirror, Target, Uploader, head_local
from apollo_ray.trainer import (
    NonFiniteLossError,
    Trainer,
    checkpoint_order,
    is_periodic,
    load_checkpoint,
)

__all__ = [
    "HeadRelay",
    "RayStore",
    "build_trainer",
    "check_finished",
    "fetch",
    "run",
    "train_worker",
]

CHECKPOINT_FILE = "checkpoint.pt"
HEAD_NODE = "node:__internal_head__"  # Ray's resource of the head node (ray._common.constants)
FAULT_MARKER = ".fault-injected"
DIVERGED = "diverged.txt"  # written by rank 0 when the loss became NaN/inf
CHECKPOINT_NAME = re.compile(r"step-\d{7}(\.pre-growth|\.post-growth)?")


class RayStore:
    """Checkpoints reported to Ray Train (rank 0 writes the file; every rank reports).

    Retention is ours, not Ray's `CheckpointConfig(num_to_keep)`: after a worker-group restart,
    Ray 2.60 tried to delete an already deleted checkpoint and failed the run (seen in
    tests/test_ray_train.py). Rank 0 keeps the newest `keep` periodic checkpoints in the run's
    storage folder; stage-boundary ones (pre/post growth) are all kept, as on one process."""

    def __init__(self, storage: str, keep: int, rank: int) -> None:
        if "://" in storage:
            self.fs, self.root = pyarrow.fs.FileSystem.from_uri(storage)
        else:
            self.fs, self.root = pyarrow.fs.LocalFileSystem(), storage
        self.uri, self.keep, self.rank = storage, keep, rank

    def location(self, name: str) -> str:
        return join_uri(self.uri, name, CHECKPOINT_FILE)

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint in the run's storage that loads. Not `ray.train.get_checkpoint()`:
        Ray registers a checkpoint only when its controller processes the report, so a worker
        group that dies right after persisting one (a node lost) restarted from an older one
        or from scratch (seen in tests/test_multinode.py). A file cut short is skipped."""
        found = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        names = [i.base_name for i in found if CHECKPOINT_NAME.fullmatch(i.base_name)]
        for name in sorted(names, key=checkpoint_order, reverse=True):
            path = f"{self.root}/{name}/{CHECKPOINT_FILE}"
            try:
                with self.fs.open_input_file(path) as f:
                    return load_checkpoint(io.BytesIO(f.read()), name=path)
            except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
                print(f"skipping checkpoint {path}: {e}")
        return None

    def report(
        self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None, name: str = ""
    ) -> None:
        if not name:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            ray_checkpoint = None
            if checkpoint is not None:
                torch.save(checkpoint, Path(directory) / CHECKPOINT_FILE)
                ray_checkpoint = Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=ray_checkpoint, checkpoint_dir_name=name)
        if self.rank == 0 and is_periodic(name):
            self._prune()

    def _prune(self) -> None:
        found = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root))
        periodic = sorted(i.path for i in found if is_periodic(i.base_name))
        for path in periodic[: -self.keep]:
            self.fs.delete_dir(path)


def train_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: one rank of `Trainer.fit()`."""
    cfg = RunConfig.model_validate(config["run"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    trainer = Trainer(
        cfg,
        ray.train.torch.get_device(),
        progress=config.get("progress", True),
        rank=rank,
        world_size=world_size,
        store=RayStore(config["storage"], cfg.train.keep_checkpoints, rank),
        tracker=_mirror(config.get("tracking"), cfg) if rank == 0 else None,
    )
    if config.get("kill_at_step") is not None and rank == world_size - 1:
        _inject_fault(trainer, config["kill_at_step"])
    try:
        trainer.fit()
    except NonFiniteLossError as e:  # every rank sees the same all-reduced loss
        # End the run cleanly rather than fail it: a retry would diverge again at the same step.
        if rank == 0:
            (trainer.run_dir / DIVERGED).write_text(str(e) + "\n")
        trainer.store.report({"step": trainer.state.step, "error": str(e)})


def _mirror(tracking: dict[str, Any] | None, cfg: RunConfig) -> RunMirror | None:
    if tracking is None:
        return None
    target = Target(**tracking)
    uploader = HeadRelay(target.uri, target.run_id) if head_local(target.uri) else None
    return RunMirror(target, cfg.output_dir, cfg.train.steps, uploader=uploader)


class HeadRelay:
    """An `Uploader` that runs in an actor on the head node, where a head-local MLflow (the
    cluster's server on 127.0.0.1, or a SQLite store on the head's disk) is reachable; rank 0
    on a GPU node sends its rows and checkpoint locations there over Ray, and nothing has to
    listen on another interface. Each call waits at most `timeout_s`: the mirror counts a
    call that does not answer as a failed upload and tries again later."""

    def __init__(self, uri: str, run_id: str, timeout_s: float = 120.0) -> None:
        actor = ray.remote(Uploader).options(
            name=f"apollo-mlflow-{run_id}",
            get_if_exists=True,  # a restarted rank 0 finds the relay still there, or makes one
            num_cpus=0,
            resources={HEAD_NODE: 0.001},
            scheduling_strategy="DEFAULT",  # not in the calling worker's placement group
        )
        self.actor, self.timeout_s = actor.remote(uri), timeout_s

    def log_batch(self, run_id: str, metrics: list, patient: bool) -> None:
        ray.get(self.actor.log_batch.remote(run_id, metrics, patient), timeout=self.timeout_s)

    def log_checkpoint(
        self, run_id: str, name: str, location: str, meta: dict[str, Any], patient: bool
    ) -> None:
        call = self.actor.log_checkpoint.remote(run_id, name, location, meta, patient)
        ray.get(call, timeout=self.timeout_s)


def _inject_fault(trainer: Trainer, step: int) -> None:
    """Kill this worker process (SIGKILL) once, right after optimizer step `step` (testing)."""
    marker = trainer.run_dir / FAULT_MARKER
    train_step = trainer.train_step

    def step_then_die() -> dict[str, Any]:
        row = train_step()
        if trainer.state.step == step and not marker.exists():
            marker.write_text(f"killed rank {trainer.rank} after step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return row

    trainer.train_step = step_then_die


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Workers may run in another directory (or node): pin relative local paths down."""
    data = cfg.data.path
    if "://" not in data:
        data = str(Path(data).resolve())
    return cfg.model_copy(
        update={
            "out_dir": str(cfg.output_dir),
            "data": cfg.data.model_copy(update={"path": data}),
        }
    )


def build_trainer(
    cfg: RunConfig,
    *,
    storage_path: str | None = None,
    callbacks: list | None = None,
    kill_at_step: int | None = None,
    progress: bool = True,
    tracking: Target | None = None,
) -> TorchTrainer:
    """The TorchTrainer for one run. Ray Train stores its checkpoints under
    `storage_path/<run dir name>/` (default: beside the run's own files, in its `out_dir`).
    With `tracking`, rank 0 mirrors the run into that MLflow run while it trains."""
    cfg = absolute_paths(cfg)
    storage_path = storage_path or str(cfg.output_dir.parent)
    res = cfg.resources
    per_worker = {"CPU": res.cpus_per_worker, **res.worker_resources}
    if res.gpus_per_worker:
        per_worker["GPU"] = res.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "run": cfg.model_dump(mode="json"),
            "kill_at_step": kill_at_step,
            "progress": progress,
            "storage": join_uri(storage_path, cfg.output_dir.name),
            "tracking": asdict(tracking) if tracking else None,
        },
        scaling_config=ScalingConfig(
            num_workers=res.workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker=per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.output_dir.name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # RayStore prunes
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),  # not every report and upload
        ),
    )


def run(
    cfg: RunConfig,
    address: str | None = None,
    kill_at_step: int | None = None,
    tracking: Target | None = None,
    storage_path: str | None = None,
):
    """Train `cfg` on Ray (starting a local instance unless `address`/RAY_ADDRESS names one) and
    return the Ray Train `Result`. Raises `NonFiniteLossError` if the loss diverged."""
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    trainer = build_trainer(
        cfg, storage_path=storage_path, kill_at_step=kill_at_step, tracking=tracking
    )
    result = trainer.fit()
    check_finished(cfg)
    return result


def fetch(location: str, dest: Path) -> bool:
    """Copy the file at `location` (a path or a pyarrow.fs URI) to `dest`; False if none."""
    if "://" in location:
        fs, path = pyarrow.fs.FileSystem.from_uri(location)
    else:
        fs, path = pyarrow.fs.LocalFileSystem(), location
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return False
    pyarrow.fs.copy_files(
        path, str(dest), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem()
    )
    return True


def check_finished(cfg: RunConfig) -> None:
    """After `fit()`, on the driver: turn a run that stopped on a NaN/inf loss back into
    `NonFiniteLossError`, and fail clearly if rank 0's log is not where the driver looks."""
    marker = cfg.output_dir / DIVERGED
    if marker.exists():
        raise NonFiniteLossError(marker.read_text().strip())
    if not (cfg.output_dir / "metrics.jsonl").exists():
        raise RuntimeError(
            f"{cfg.output_dir / 'metrics.jsonl'} is missing after training: rank 0 writes it on "
            "its own node, so the run's folder must be one every node sees (on a cluster: the "
            "study's output_dir on the shared file system, see cluster/README.md)"
        )
