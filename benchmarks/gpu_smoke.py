"""GPU smoke test: the released Apollo recipe trained on a GPU (bf16), checkpointed and resumed.

    python -m benchmarks.gpu_smoke                  # BERT and GPT, 12 x 256, 600 steps
    python -m benchmarks.gpu_smoke --kinds gpt --steps 100 --layers 2   # a quick look (CPU too)

For each kind: one uninterrupted run (Apollo stages N = 1, 3, 6, 12, released LVPS, bf16
autocast on a GPU that has it), then a second run that starts from a copy of the first run's
mid-way checkpoint and trains to the end. The resumed rows should equal the uninterrupted ones
(bit-identical on a CPU; on a GPU only as far as its kernels are deterministic: the table gives
the largest difference). Prints final eval loss, growths, tokens/s and that difference; writes
benchmarks/results/gpu-smoke-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from apollo_ray.config import RunConfig
from apollo_ray.training.trainer import Trainer
from benchmarks.common import print_table, save
from benchmarks.throughput import demo_data, device_tag

__all__ = ["main", "max_difference", "rows_after", "run_config"]


def run_config(kind: str, out: Path, args: argparse.Namespace) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": f"{kind}-apollo",
            "out_dir": str(out),
            "model": {
                "kind": kind,
                "n_layer": args.layers,
                "d_model": args.d_model,
                "n_head": args.d_model // 64,
                "max_seq_len": args.seq_len,
                "dropout": 0.1,
            },
            "data": {"path": str(demo_data(kind)), "seq_len": args.seq_len},
            "train": {
                "steps": args.steps,
                "micro_batch": args.micro_batch,
                "lr": 1e-3,
                "warmup": 0.025,
                "eval_every": max(args.steps // 12, 1),
                "eval_batches": 8,
                "checkpoint_every": args.steps // 2,
                "log_every": 10,
            },
            "schedule": {
                "depths": [d for d in (1, 3, 6, 12) if d < args.layers] + [args.layers],
                "stage_ends": [0.05, 0.10, 0.25][: sum(d < args.layers for d in (1, 3, 6, 12))],
                "sampler": "apollo",
                "plan": "interp",
                "growth": "interpolate",
            },
        }
    )


def rows_after(run_dir: Path, step: int) -> dict[tuple[int, str], dict[str, float]]:
    """metrics.jsonl rows after `step`, keyed by (step, kind of row)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r.get("event", "step")): r for r in rows if r["step"] > step}


def max_difference(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"resumed run logged other rows: {sorted(a.keys() ^ b.keys())}")
    return max(
        (abs(a[k][m] - b[k][m]) for k in a for m in ("loss", "eval_loss") if m in a[k]),
        default=0.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", choices=["bert", "gpt"], default=["bert", "gpt"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=32)
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="apollo-gpu-smoke-"))
    rows, device = [], None
    for kind in args.kinds:
        full = run_config(kind, out / f"{kind}-full", args)
        trainer = Trainer(full, progress=False)
        device = trainer.device
        t0 = time.perf_counter()
        state = trainer.fit()
        wall = time.perf_counter() - t0
        del trainer
        print(f"{kind}: {state.step} steps in {wall:.0f} s, final eval loss {state.eval_loss:.4f}")

        mid = args.steps // 2
        resumed = run_config(kind, out / f"{kind}-resumed", args)
        (resumed.output_dir / "checkpoints").mkdir(parents=True)
        name = f"step-{mid:07d}.pt"
        shutil.copy(full.output_dir / "checkpoints" / name, resumed.output_dir / "checkpoints")
        again = Trainer(resumed, progress=False)
        assert again.state.step == mid, f"resumed at {again.state.step}, not {mid}"
        again.fit()
        diff = max_difference(rows_after(full.output_dir, mid), rows_after(resumed.output_dir, mid))
        log = [json.loads(line) for line in (full.output_dir / "metrics.jsonl").open()]
        steady = [r["tokens_per_s"] for r in log if "tokens_per_s" in r and r["step"] > 10]
        rows.append(
            {
                "kind": kind,
                "device": str(device),
                "precision": str(getattr(again.autocast, "fast_dtype", "fp32")),
                "steps": state.step,
                "growths": sum(r.get("event") == "growth" for r in log),
                "first eval loss": log[0]["eval_loss"],
                "final eval loss": state.eval_loss,
                "wall s": wall,
                "tokens/s (median)": sorted(steady)[len(steady) // 2],
                "resume max |diff|": diff,
            }
        )
    columns = list(rows[0])
    print_table(rows, columns)
    path = save(f"gpu-smoke-{device_tag(device)}", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
