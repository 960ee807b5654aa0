"""Train one model from a run YAML, locally on one process.

    python -m apollo_ray.train configs/bert-tiny.yaml
    python -m apollo_ray.train configs/bert-tiny.yaml --set train.steps=50 --set name=quick

A run directory that already holds checkpoints is resumed from the newest one. Metrics go to
`<out_dir>/metrics.jsonl`, checkpoints to `<out_dir>/checkpoints/`.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from apollo_ray.config import ConfigError, load_run_config
from apollo_ray.data import DataError
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
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config, parse_overrides(args.overrides))
        trainer = Trainer(cfg, device=args.device, progress=not args.no_progress)
        if trainer.state.step:
            print(f"resuming {cfg.name} from step {trainer.state.step}", file=sys.stderr)
        state = trainer.fit()
    except (ConfigError, DataError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{cfg.name}: {state.step} steps, {state.tokens:,} tokens, {state.flops:.3e} FLOPs, "
        f"{state.wall_time:.0f} s, final eval loss {state.eval_loss:.4f}\n"
        f"metrics: {trainer.run_dir / 'metrics.jsonl'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
