"""Apollo against training from scratch and StackBERT-style stacking, at one equal step budget.

    python -m benchmarks.acceleration                    # BERT and GPT, 12 x 128, 400 steps
    python -m benchmarks.acceleration --kinds gpt --steps 200

For each model kind, trains on the demo corpus (same data, batch, budget, optimizer, seed):
- scratch: the full 12-layer model from step 0 (the baseline);
- apollo: the released recipe, N = 1, 3, 6, 12 with stages ending at 5%, 10%, 25% of the steps,
  released LVPS, interpolation plan and growth (alpha = 0), fresh optimizer state;
- stack: the same stages, each N-layer model trained at its own depth (no sharing), grown by
  stacking copies (StackBERT).
Prints a table (final eval loss, FLOPs, FLOPs and wall-time saving to the scratch run's loss),
and writes benchmarks/results/acceleration.json and acceleration-<kind>.png (loss vs FLOPs).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from apollo_ray.acceleration import Curve, compare, plot_loss_vs_flops
from apollo_ray.config import RunConfig
from apollo_ray.trainer import Trainer
from benchmarks.common import RESULTS, print_table, save
from benchmarks.throughput import demo_data

__all__ = ["main", "run_config"]

STAGES = {"depths": [1, 3, 6, 12], "stage_ends": [0.05, 0.10, 0.25]}
METHODS = {
    "scratch": None,
    "apollo": {**STAGES, "sampler": "apollo", "plan": "interp", "growth": "interpolate"},
    "stack": {**STAGES, "sampler": "physical", "plan": "stack", "growth": "stack"},
}


def run_config(kind: str, method: str, out: Path, args: argparse.Namespace) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": f"{kind}-{method}",
            "out_dir": str(out / f"{kind}-{method}"),
            "seed": args.seed,
            "model": {
                "kind": kind,
                "n_layer": 12,
                "d_model": args.d_model,
                "n_head": args.d_model // 32,
                "max_seq_len": args.seq_len,
                "dropout": 0.1 if kind == "bert" else 0.0,
            },
            "data": {"path": str(demo_data(kind)), "seq_len": args.seq_len},
            "train": {
                "steps": args.steps,
                "micro_batch": args.micro_batch,
                "lr": args.lr,
                "warmup": 0.025,
                "eval_every": args.eval_every,
                "eval_batches": 8,
                "checkpoint_every": args.steps,
                "log_every": 10,
            },
            "schedule": METHODS[method],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", choices=["bert", "gpt"], default=["bert", "gpt"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows, curves_out = [], {}
    with tempfile.TemporaryDirectory(prefix="apollo-accel-") as out:
        for kind in args.kinds:
            curves = {}
            for method in METHODS:
                Trainer(run_config(kind, method, Path(out), args)).fit()
                metrics = Path(out) / f"{kind}-{method}" / "metrics.jsonl"
                curves[method] = Curve.from_metrics(metrics, name=method)
                c = curves[method]
                curves_out[f"{kind}-{method}"] = {
                    "flops": c.flops.tolist(),
                    "wall": c.wall.tolist(),
                    "loss": c.loss.tolist(),
                }
            base = curves["scratch"]
            for method, curve in curves.items():
                acc = compare(curve, base)
                rows.append({"model": kind, "method": method, **acc.to_dict()})
            plot_loss_vs_flops(
                [curves["apollo"], curves["stack"]],
                base,
                RESULTS / f"acceleration-{kind}.png",
                title=f"{kind.upper()} 12x{args.d_model}, {args.steps} steps, demo corpus",
            )
    print_table(
        [
            {
                **r,
                "final eval loss": r["method_final_loss"],
                "FLOPs": r["method_flops"],
                "wall s": r["method_wall"],
                "FLOPs saving": r["flops_saving"],
                "wall saving": r["wall_saving"],
            }
            for r in rows
        ],
        [
            "model",
            "method",
            "final eval loss",
            "FLOPs",
            "wall s",
            "FLOPs saving",
            "wall saving",
        ],
    )
    path = save("acceleration", {"args": vars(args), "rows": rows, "curves": curves_out})
    print(f"wrote {path} and {RESULTS}/acceleration-<kind>.png")


if __name__ == "__main__":
    main()
