"""One-worker runs without a worker group: the trainer in the calling process.

A run with `resources.workers: 1` needs no process group, so a Tune trial trains it in the
trial's own process (`train`, with `tune.report` as its `report`) and a scratch run of the
frontier in one Ray task (`run`). Ray Train would start a controller, a worker and five helper
actors per run for nothing but DDP; this path skips them and keeps everything else: checkpoints
in the same storage folder (`checkpoints.StorageStore`), the same metrics.jsonl, the same MLflow
mirror, and resume from the newest checkpoint when Tune retries a trial or Ray a task
(`resources.max_failures` times). Runs of several workers go through
`apollo_ray.launch.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from apollo_ray.config import RunConfig
from apollo_ray.launch.distributed import check_finished, mirror_for, set_threads
from apollo_ray.records.mirror import Target
from apollo_ray.storage import absolute, join_uri
from apollo_ray.training.checkpoints import StorageStore
from apollo_ray.training.faults import FaultInjection
from apollo_ray.training.runlog import DIVERGED, NonFiniteLossError
from apollo_ray.training.trainer import Trainer

__all__ = ["applies", "run", "train"]


def train(
    cfg: RunConfig,
    storage_path: str,
    *,
    tracking: Target | None = None,
    faults: dict[str, int | None] | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train `cfg` here, its checkpoints under `storage_path/<run dir name>/` (resuming from the
    newest), every row the store is handed passed to `report`; returns the last such row. A
    loss that goes NaN/inf ends the run with the marker `check_finished` reads, and a retry of
    such a run stops at once (it would diverge again at the same step)."""
    if (cfg.output_dir / DIVERGED).exists():
        return {}
    set_threads(cfg)
    last: dict[str, Any] = {}

    def on_report(row: dict[str, Any]) -> None:
        last.clear()
        last.update(row)
        if report is not None:
            report(row)

    folder = join_uri(storage_path, cfg.output_dir.name)
    trainer = Trainer(
        cfg,
        progress=False,
        store=StorageStore(folder, cfg.train.keep_checkpoints, on_report),
        tracker=mirror_for(asdict(tracking) if tracking else None, cfg),
        faults=FaultInjection(cfg.output_dir, **faults) if faults else None,
    )
    try:
        trainer.fit()
    except NonFiniteLossError as e:
        (trainer.run_dir / DIVERGED).write_text(str(e) + "\n")
    return dict(last)


def applies(cfg: RunConfig) -> bool:
    """Whether `cfg` trains here rather than in a Ray Train worker group: one worker, and
    `resources.worker_group` not `always`."""
    return cfg.resources.workers == 1 and cfg.resources.worker_group == "auto"


def run(
    cfg: RunConfig,
    *,
    storage_path: str,
    tracking: Target | None = None,
    faults: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """`train` in one Ray task with the worker's resources (Ray is initialised by the caller),
    retried `resources.max_failures` times if its process dies; returns the last row reported.
    Raises `NonFiniteLossError` if the loss diverged."""
    import ray

    data = cfg.data.model_copy(update={"path": absolute(cfg.data.path)})
    cfg = cfg.model_copy(update={"out_dir": str(cfg.output_dir), "data": data})
    resources = cfg.resources.per_worker
    task = ray.remote(train).options(
        num_cpus=resources.pop("CPU"),
        num_gpus=resources.pop("GPU"),
        resources=resources or None,
        max_retries=cfg.resources.max_failures,
        retry_exceptions=False,
    )
    last = ray.get(task.remote(cfg, storage_path, tracking=tracking, faults=faults))
    check_finished(cfg)
    return last
