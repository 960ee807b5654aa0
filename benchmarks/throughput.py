"""Tokens/s of our training step against a minimal plain-PyTorch loop: same model, same batches.

    python -m benchmarks.throughput                 # BERT, 6 x 256, seq 128, batch 16
    python -m benchmarks.throughput --kind gpt --steps 10 --rounds 2

Both loops run in this one process, alternating in rounds so that machine noise hits both; the
plain loop gets its batches pre-built, ours builds them (masking included) every step, so the
gap is everything our step adds. Writes benchmarks/results/throughput-<kind>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from apollo_ray.config import RunConfig
from apollo_ray.data import prepare
from apollo_ray.model import TransformerLM
from apollo_ray.trainer import Trainer, autocast_for
from benchmarks.common import print_table, save


def demo_data(kind: str) -> Path:
    path = Path("data") / f"demo-{kind}"
    if not (path / "manifest.json").exists():
        prepare(["demo"], path, kind, vocab_size=8192, val_fraction=0.05)
    return path


def plain_loop(cfg: RunConfig, model_cfg, batches, device) -> Callable[[int], None]:
    """The minimal loop a person would write: forward, backward, clip, AdamW step."""
    torch.manual_seed(cfg.seed)
    model = TransformerLM(model_cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.01)
    autocast = autocast_for(cfg.train.precision, device)

    def run(n: int) -> None:
        for i in range(n):
            x, y = batches[i % len(batches)]
            with autocast:
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=["bert", "gpt"], default="bert")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per round and loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16)
    args = parser.parse_args()

    out = tempfile.mkdtemp(prefix="apollo-bench-")
    cfg = RunConfig.model_validate(
        {
            "name": "throughput",
            "out_dir": out,
            "model": {
                "kind": args.kind,
                "n_layer": args.layers,
                "d_model": args.d_model,
                "n_head": args.d_model // 64,
                "max_seq_len": args.seq_len,
                "dropout": 0.1,
            },
            "data": {"path": str(demo_data(args.kind)), "seq_len": args.seq_len},
            "train": {"steps": 10**6, "micro_batch": args.micro_batch, "lr": 1e-4},
        }
    )
    trainer = Trainer(cfg, progress=False)
    device = trainer.device
    batches = []
    for step in range(args.steps):
        b = trainer.train_data.batch(step, 0, micro_batch=args.micro_batch)
        batches.append((b["input_ids"].to(device), b["labels"].to(device)))
    plain = plain_loop(cfg, trainer.model_cfg, batches, device)

    def ours(n: int) -> None:
        for _ in range(n):
            trainer.train_step()

    tokens = args.steps * args.micro_batch * args.seq_len
    timings: dict[str, list[float]] = {
        "plain PyTorch loop": [],
        "apollo_ray Trainer.train_step": [],
    }
    plain(2)  # warm-up
    ours(2)
    for _ in range(args.rounds):
        for name, run in zip(timings, (plain, ours), strict=True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(args.steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[name].append(tokens / (time.perf_counter() - t0))

    base = statistics.median(timings["plain PyTorch loop"])
    rows = [
        {
            "loop": name,
            "tokens/s (median)": statistics.median(t),
            "rounds": [round(x) for x in t],
            "vs plain": statistics.median(t) / base - 1,
        }
        for name, t in timings.items()
    ]
    print_table(rows, ["loop", "tokens/s (median)", "vs plain", "rounds"])
    path = save(
        f"throughput-{args.kind}", {"args": vars(args), "device": str(device), "rows": rows}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
