"""Data-parallel training with Ray Train: the TorchTrainer a run starts, and what each worker runs.

    python -m apollo_ray.train RUN.yaml --workers 2               # local Ray, started for you
    python -m apollo_ray.train RUN.yaml --workers 8 --address auto   # an existing cluster

Two of the three Ray tiers live here (Ray's train_tune_interop pattern): `build_trainer` makes
the `TorchTrainer` for one run (the Tune driver in `apollo_ray.search.tuner` calls it per
trial), and
`train_worker` is the per-worker function: it turns the config dict back into a validated
`RunConfig` and runs the ordinary `Trainer` as one DDP rank (gloo on CPU, NCCL on GPU, bf16
autocast on GPU). Checkpoints go through `ray.train.report` (`RayStore`); a
restarted worker group resumes from the latest one, so with `resources.max_failures` a killed
worker costs the steps since the last checkpoint, not the run.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from apollo_ray.config import RunConfig
from apollo_ray.launch.preflight import join_ray
from apollo_ray.records.mirror import RunMirror, Target, Uploader, head_local
from apollo_ray.storage import absolute, join_uri
from apollo_ray.training.checkpoints import CHECKPOINT_FILE, StorageStore, is_periodic
from apollo_ray.training.faults import FaultInjection
from apollo_ray.training.runlog import DIVERGED, METRICS, NonFiniteLossError
from apollo_ray.training.trainer import Trainer

__all__ = [
    "HEAD_NODE",
    "HeadRelay",
    "build_trainer",
    "check_finished",
    "mirror_for",
    "on_head_node",
    "run",
    "set_threads",
    "train_worker",
]

HEAD_NODE = "node:__internal_head__"  # Ray's resource of the head node (ray._common.constants)


class RayStore(StorageStore):
    """Checkpoints reported to Ray Train (rank 0 writes the file; every rank reports), in the
    same layout as `StorageStore`.

    Retention is ours, not Ray's `CheckpointConfig(num_to_keep)`, which after a worker-group
    restart tried to delete an already deleted checkpoint and failed the run: rank 0 keeps the
    newest `keep` periodic checkpoints in the run's storage folder, and every stage-boundary
    one, as on one process. `latest` reads the storage, not `ray.train.get_checkpoint()`: Ray
    registers a checkpoint only once its controller processes the report, so a worker group that
    died right after persisting one would restart from an older one."""

    def __init__(self, storage: str, keep: int, rank: int) -> None:
        super().__init__(storage, keep)
        self.rank = rank

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
                ray_checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=ray_checkpoint, checkpoint_dir_name=name)
        if self.rank == 0 and is_periodic(name):
            self._prune()


def train_worker(config: dict[str, Any]) -> None:
    """Tier 3, what every Ray Train worker runs: one rank of `Trainer.fit()`."""
    cfg = RunConfig.model_validate(config["run"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    faults = config.get("faults")
    set_threads(cfg)
    _quiet_reports()
    trainer = Trainer(
        cfg,
        ray.train.torch.get_device(),
        progress=config.get("progress", True),
        rank=rank,
        world_size=world_size,
        store=RayStore(config["storage"], cfg.train.keep_checkpoints, rank),
        tracker=mirror_for(config.get("tracking"), cfg) if rank == 0 else None,
        faults=FaultInjection(cfg.output_dir, **faults)
        if faults and rank == world_size - 1
        else None,
    )
    try:
        trainer.fit()
    except NonFiniteLossError as e:  # every rank sees the same all-reduced loss
        # End the run cleanly rather than fail it: a retry would diverge again at the same step.
        if rank == 0:
            (trainer.run_dir / DIVERGED).write_text(str(e) + "\n")
        trainer.store.report({"step": trainer.state.step, "error": str(e)})


def _quiet_reports(level: int = logging.WARNING) -> None:
    """Ray Train 2.60 logs each `ray.train.report` ("Reporting training result ...") at INFO
    on a logger named after its file (`logging.getLogger(__file__)` in its context module), not
    under `ray.train`, so `LoggingConfig(log_level=...)` does not reach it: set its level here,
    in the worker."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # moved in another Ray version: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(level)


def set_threads(cfg: RunConfig) -> None:
    """As many torch threads as the worker reserved CPUs, whichever process runs it (a Ray
    Train worker or a one-worker trial), so that both compute the same floats."""
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))


def mirror_for(tracking: dict[str, Any] | None, cfg: RunConfig) -> RunMirror | None:
    """Rank 0's MLflow mirror of the run (None without tracking); a head-local MLflow is
    reached through a `HeadRelay` from any other node."""
    if tracking is None:
        return None
    target = Target(**tracking)
    relay = head_local(target.uri) and not on_head_node()
    uploader = HeadRelay(target.uri, target.run_id) if relay else None
    return RunMirror(target, cfg.output_dir, cfg.train.steps, uploader=uploader)


def on_head_node() -> bool:
    """Whether this process runs on the head node of its Ray cluster (where a head-local MLflow
    is reachable directly, without a relay actor to start)."""
    node = ray.get_runtime_context().get_node_id()
    return any(n["NodeID"] == node and HEAD_NODE in n["Resources"] for n in ray.nodes())


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


def build_trainer(
    cfg: RunConfig,
    *,
    storage_path: str | None = None,
    callbacks: list | None = None,
    faults: dict[str, int | None] | None = None,
    progress: bool = True,
    tracking: Target | None = None,
) -> TorchTrainer:
    """Tier 2's call: the TorchTrainer for one run. Ray Train stores its checkpoints under
    `storage_path/<run dir name>/` (default: beside the run's own files, in its `out_dir`).
    With `tracking`, rank 0 mirrors the run into that MLflow run while it trains; `faults`
    (`kill_at_step`, `kill_after_checkpoint`) kills the last worker once, for chaos testing."""
    data = cfg.data.model_copy(update={"path": absolute(cfg.data.path)})
    cfg = cfg.model_copy(update={"out_dir": str(cfg.output_dir), "data": data})
    storage_path = storage_path or str(cfg.output_dir.parent)
    res = cfg.resources
    per_worker = {"CPU": res.cpus_per_worker, **res.worker_resources}
    if res.gpus_per_worker:
        per_worker["GPU"] = res.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "run": cfg.model_dump(mode="json"),
            "faults": faults,
            "progress": progress,
            "storage": join_uri(storage_path, cfg.output_dir.name),
            "tracking": asdict(tracking) if tracking else None,
        },
        scaling_config=ScalingConfig(
            num_workers=res.workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker=per_worker,
            placement_strategy=res.placement,
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
    faults: dict[str, int | None] | None = None,
    tracking: Target | None = None,
    storage_path: str | None = None,
    progress: bool = False,
):
    """Train `cfg` on Ray (starting a local instance unless `address`/RAY_ADDRESS names one) and
    return the Ray Train `Result`. Raises `NonFiniteLossError` if the loss diverged. No progress
    bar on the workers unless `progress`: Ray forwards each redraw of a worker's bar to the
    driver as a line of its own (and a study's scratch runs would print theirs)."""
    join_ray(address, log_to_driver=True)
    trainer = build_trainer(
        cfg, storage_path=storage_path, faults=faults, progress=progress, tracking=tracking
    )
    result = trainer.fit()
    check_finished(cfg)
    return result


def check_finished(cfg: RunConfig) -> None:
    """After `fit()`, on the driver: turn a run that stopped on a NaN/inf loss back into
    `NonFiniteLossError`, and fail clearly if rank 0's log is not where the driver looks."""
    marker = cfg.output_dir / DIVERGED
    if marker.exists():
        raise NonFiniteLossError(marker.read_text().strip())
    if not (cfg.output_dir / METRICS).exists():
        raise RuntimeError(
            f"{cfg.output_dir / METRICS} is missing after training: rank 0 writes it on "
            "its own node, so the run's folder must be one every node sees (on a cluster: the "
            "study's output_dir on the shared file system, see cluster/README.md)"
        )
