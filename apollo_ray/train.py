"""Train one model from a run YAML: on this process, or data-parallel on Ray Train workers.

    python -m apollo_ray.train configs/bert-tiny.yaml
    python -m apollo_ray.train configs/bert-tiny.yaml --set train.steps=50 --set name=quick
    python -m apollo_ray.train configs/bert-apollo.yaml --workers 2           # local Ray
    python -m apollo_ray.train configs/bert-apollo.yaml --workers 8 --address auto

Ray is used when `--workers`/`--address` (or a `--kill-*` fault) is given or the YAML asks for
`resources.workers` > 1.
A run directory that already holds checkpoints is resumed from the newest one. Metrics go to
`<out_dir>/metrics.jsonl`; checkpoints to `<out_dir>/checkpoints/` on one process, or to Ray
Train's checkpoint folders in `<out_dir>/` on Ray.

The run is recorded in MLflow like a study's trial (params, per-step metrics, checkpoints, the
loss-vs-FLOPs plot), in experiment `--experiment` (default `runs`): at `--mlflow-uri`, else
MLFLOW_TRACKING_URI, else the local store in `--output-dir` (default `outputs`, where studies
record too), through the server a running study already serves it with, or one started on
127.0.0.1 for the run's duration. `--no-track` records nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, get_args

import yaml

from apollo_ray.config import ConfigError, RunConfig, load_run_config
from apollo_ray.data import DataError, check_data
from apollo_ray.launch.preflight import folder, machine, placeholders, storage
from apollo_ray.storage import is_uri
from apollo_ray.study.schema import TrackingConfig
from apollo_ray.training.faults import add_arguments as add_fault_arguments
from apollo_ray.training.faults import requested
from apollo_ray.training.runlog import METRICS, NonFiniteLossError

if TYPE_CHECKING:  # torch and MLflow: imported once the checks have passed
    from apollo_ray.records.mirror import Target

__all__ = ["main"]


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`key.path=value` pairs; values are parsed as YAML scalars (`100`, `1.0e-4`, `bf16`)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key.path=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apollo_ray.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="run YAML (see configs/ for examples)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 (repeatable)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-parallel Ray Train workers (sets resources.workers; starts Ray)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join, e.g. auto (default: RAY_ADDRESS, else a new local Ray)",
    )
    add_fault_arguments(
        parser, "on Ray, the run must resume from its last checkpoint", "the last worker"
    )
    parser.add_argument(
        "--device", default=None, help="torch device without Ray (default: cuda if available)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    tracking = parser.add_argument_group("MLflow (on by default)")
    tracking.add_argument("--no-track", action="store_true", help="record nothing in MLflow")
    tracking.add_argument(
        "--mlflow-uri",
        default=None,
        help="tracking server or store (default: MLFLOW_TRACKING_URI, else the local store)",
    )
    tracking.add_argument(
        "--output-dir",
        default="outputs",
        help="folder of the local store, as a study's output_dir (default: outputs)",
    )
    tracking.add_argument(
        "--experiment", default="runs", help="MLflow experiment of the run (default: runs)"
    )
    tracking.add_argument(
        "--checkpoints",
        choices=get_args(TrackingConfig.model_fields["checkpoints"].annotation),  # a study's
        default="last",
        help="checkpoints logged to MLflow: all (stage boundaries and the last), the last one, "
        "or none (default: last)",
    )
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        if args.workers is not None:
            overrides["resources.workers"] = args.workers
        cfg = load_run_config(args.config, overrides)
        faults = requested(args)
        on_ray = bool(cfg.resources.workers > 1 or args.workers or args.address or faults)
        placeholders({"data.path": cfg.data.path, "--mlflow-uri": args.mlflow_uri})
        folder("out_dir", cfg.output_dir)
        if not (args.no_track or args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            folder("--output-dir", args.output_dir)  # the local MLflow store
        if on_ray:
            machine(cfg.resources, args.address)
        if not is_uri(cfg.data.path):
            check_data(cfg.data, cfg.model.kind)
        if args.no_track:
            check_remote_data(cfg)
            metrics = train(cfg, args, faults, on_ray, None)
        else:
            metrics = tracked(cfg, args, faults, on_ray)
    except (ConfigError, DataError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{cfg.name}: {metrics['step']} steps, {metrics['tokens']:,} tokens, "
        f"{metrics['flops']:.3e} FLOPs, {metrics['wall_time']:.0f} s, "
        f"final eval loss {metrics['eval_loss']:.4f}\nmetrics: {cfg.output_dir / METRICS}"
    )
    return 0


def check_remote_data(cfg: RunConfig) -> None:
    """Data at a URI: reached within a deadline, then checked (local data is checked first)."""
    if is_uri(cfg.data.path):
        storage("data.path", cfg.data.path)
        check_data(cfg.data, cfg.model.kind)


def train(
    cfg: RunConfig,
    args: argparse.Namespace,
    faults: dict[str, int],
    on_ray: bool,
    target: Target | None,
) -> dict[str, Any]:
    """Train `cfg` here or on Ray, mirrored to `target`; the last metrics."""
    if on_ray:
        from apollo_ray.launch import distributed  # imports Ray: only when asked for

        return distributed.run(cfg, args.address, faults or None, tracking=target).metrics
    from apollo_ray.records.mirror import RunMirror
    from apollo_ray.training.trainer import Trainer

    tracker = RunMirror(target, cfg.output_dir, cfg.train.steps) if target else None
    trainer = Trainer(cfg, device=args.device, progress=not args.no_progress, tracker=tracker)
    if trainer.state.step:
        print(f"resuming {cfg.name} from step {trainer.state.step}", file=sys.stderr)
    return asdict(trainer.fit())


def tracked(
    cfg: RunConfig, args: argparse.Namespace, faults: dict[str, int], on_ray: bool
) -> dict[str, Any]:
    """`train`, recorded in MLflow as a study records a trial."""
    from mlflow import MlflowClient

    from apollo_ray.records.mlflow_server import check_tracking, tracking_uri
    from apollo_ray.records.results import log_run_results
    from apollo_ray.records.tracking import single_run
    from apollo_ray.training.checkpoints import LocalStore, StorageStore

    keep = cfg.train.keep_checkpoints
    # where the checkpoints are: Ray Train's folders in out_dir, or out_dir/checkpoints/
    store = StorageStore(str(cfg.output_dir), keep) if on_ray else LocalStore(cfg.output_dir, keep)
    with tracking_uri(args.mlflow_uri, args.output_dir) as uri:
        check_tracking(uri, "--mlflow-uri" if args.mlflow_uri else None)
        check_remote_data(cfg)
        with single_run(uri, args.experiment, cfg, args.checkpoints, store) as target:
            metrics = train(cfg, args, faults, on_ray, target)
            client = MlflowClient(uri)
            log_run_results(client, target.run_id, cfg, cfg.output_dir / METRICS, None, None)
        print(f"mlflow: run {target.run_id} in experiment {args.experiment!r} at {uri}")
    return metrics


if __name__ == "__main__":
    status = main()
    # exit at once, without the final collection over every object of torch, Ray and MLflow
    # (seconds on a small machine); atexit handlers (Ray's shutdown among them) still run
    gc.freeze()
    sys.exit(status)
