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
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import yaml

from apollo_ray.config import ConfigError, load_run_config
from apollo_ray.data import DataError, check_data
from apollo_ray.trainer import NonFiniteLossError, Trainer

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
    chaos = parser.add_argument_group(
        "fault injection (chaos testing, on Ray: the run must resume from its last checkpoint)"
    )
    chaos.add_argument(
        "--kill-at-step",
        type=int,
        default=None,
        metavar="STEP",
        help="SIGKILL the last worker once, right after optimizer step STEP",
    )
    chaos.add_argument(
        "--kill-after-checkpoint",
        type=int,
        default=None,
        metavar="STEP",
        help="SIGKILL the last worker once, right after the checkpoint of step STEP is saved",
    )
    parser.add_argument(
        "--device", default=None, help="torch device without Ray (default: cuda if available)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        if args.workers is not None:
            overrides["resources.workers"] = args.workers
        cfg = load_run_config(args.config, overrides)
        check_data(cfg.data, cfg.model.kind)
        kills = {"kill_at_step": args.kill_at_step}
        kills["kill_after_checkpoint"] = args.kill_after_checkpoint
        faults = {k: v for k, v in kills.items() if v is not None}
        if cfg.resources.workers > 1 or args.workers or args.address or faults:
            from apollo_ray import distributed  # imports Ray: only when asked for

            metrics = distributed.run(cfg, args.address, faults or None).metrics
        else:
            trainer = Trainer(cfg, device=args.device, progress=not args.no_progress)
            if trainer.state.step:
                print(f"resuming {cfg.name} from step {trainer.state.step}", file=sys.stderr)
            metrics = asdict(trainer.fit())
    except (ConfigError, DataError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{cfg.name}: {metrics['step']} steps, {metrics['tokens']:,} tokens, "
        f"{metrics['flops']:.3e} FLOPs, {metrics['wall_time']:.0f} s, "
        f"final eval loss {metrics['eval_loss']:.4f}\nmetrics: {cfg.output_dir / 'metrics.jsonl'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
