"""What Ray Train and MLflow cost: tokens/s of the same model and batches in a plain PyTorch
loop, our trainer in-process, our trainer as one Ray Train worker, and the same with rank 0
mirroring the run into MLflow (a local `mlflow server` on 127.0.0.1, every row and the final
checkpoint uploaded); plus Ray's fixed start-up costs.

    python -m benchmarks.overhead                # BERT 6 x 256, seq 128, batch 16, 40 steps
    python -m benchmarks.overhead --steps 20

Steady-state tokens/s is the median over the steps after the first five (warm-up), read from
each run's own metrics; the plain loop is timed over the same number of steps. Fixed costs:
`ray.init` on this machine, and per run the extra wall time of `TorchTrainer.fit()` (actor and
process-group start, checkpoint upload, shutdown) over the same run in-process.
Writes benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from apollo_ray.config import RunConfig
from apollo_ray.trainer import Trainer
from benchmarks.common import print_table, save
from benchmarks.throughput import demo_data, plain_loop

__all__ = ["main", "steady_tokens_per_s"]


def steady_tokens_per_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(
        r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 5
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kind", choices=["bert", "gpt"], default="bert")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    threads = torch.get_num_threads()

    out = Path(tempfile.mkdtemp(prefix="apollo-overhead-"))

    def cfg(name: str) -> RunConfig:
        return RunConfig.model_validate(
            {
                "name": name,
                "out_dir": str(out / name),
                "model": {
                    "kind": args.kind,
                    "n_layer": 6,
                    "d_model": 256,
                    "n_head": 4,
                    "max_seq_len": 128,
                    "dropout": 0.1,
                },
                "data": {"path": str(demo_data(args.kind)), "seq_len": 128},
                "train": {
                    "steps": args.steps,
                    "micro_batch": 16,
                    "lr": 1e-4,
                    "log_every": 1,
                    "eval_every": args.steps,
                    "checkpoint_every": args.steps,
                },
                "resources": {"workers": 1, "cpus_per_worker": threads, "max_failures": 0},
            }
        )

    t0 = time.perf_counter()
    local = Trainer(cfg("in-process"), progress=False)
    local.fit()
    local_wall = time.perf_counter() - t0

    batches = []
    for step in range(args.steps):
        b = local.train_data.batch(step, 0, micro_batch=16)
        batches.append((b["input_ids"], b["labels"]))
    plain = plain_loop(cfg("plain"), local.model_cfg, batches, torch.device("cpu"))
    plain(5)
    t0 = time.perf_counter()
    plain(args.steps)
    plain_tps = args.steps * 16 * 128 / (time.perf_counter() - t0)

    import ray

    from apollo_ray import distributed

    t0 = time.perf_counter()
    ray.init(num_cpus=threads, log_to_driver=False)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    distributed.build_trainer(cfg("ray-1-worker"), progress=False).fit()
    ray_wall = time.perf_counter() - t0

    from mlflow import MlflowClient

    from apollo_ray.mirror import Target
    from apollo_ray.mlflow_server import LocalServer

    with LocalServer(out / "mlflow") as server:
        client = MlflowClient(server.uri)
        run_id = client.create_run(client.create_experiment("overhead")).info.run_id
        target = Target(server.uri, run_id, "last")
        t0 = time.perf_counter()
        distributed.build_trainer(cfg("ray-mlflow"), progress=False, tracking=target).fit()
        mlflow_wall = time.perf_counter() - t0
        logged = len(client.get_metric_history(run_id, "train_loss"))
    ray.shutdown()

    rows = [
        {"loop": "plain PyTorch loop", "tokens/s": plain_tps},
        {
            "loop": "apollo_ray Trainer, in-process",
            "tokens/s": steady_tokens_per_s(out / "in-process"),
            "run wall s": local_wall,
        },
        {
            "loop": "apollo_ray Trainer, Ray Train 1 worker",
            "tokens/s": steady_tokens_per_s(out / "ray-1-worker"),
            "run wall s": ray_wall,
        },
        {
            "loop": "... + MLflow mirror (local server)",
            "tokens/s": steady_tokens_per_s(out / "ray-mlflow"),
            "run wall s": mlflow_wall,
        },
    ]
    for r in rows:
        r["vs plain"] = r["tokens/s"] / plain_tps - 1
    print_table(rows, ["loop", "tokens/s", "vs plain", "run wall s"])
    fixed = {
        "ray_init_s": init_s,
        "ray_run_overhead_s": ray_wall - local_wall,
        "mlflow_run_overhead_s": mlflow_wall - ray_wall,
        "mlflow_train_loss_points": logged,
    }
    print(
        f"ray.init: {init_s:.1f} s; per-run Ray Train overhead (fit wall - in-process wall): "
        f"{fixed['ray_run_overhead_s']:.1f} s; MLflow mirror: "
        f"{fixed['mlflow_run_overhead_s']:+.1f} s per run ({logged} train_loss points in MLflow)"
    )
    path = save("overhead", {"args": vars(args), "torch_threads": threads, "rows": rows, **fixed})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
