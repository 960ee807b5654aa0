"""Tokens/s of our training step against a minimal plain-PyTorch loop: same model, same batches.

    python -m benchmarks.throughput                 # BERT, 6 x 256, seq 128, batch 16
    python -m benchmarks.throughput --kind gpt --steps 10 --rounds 2
    python -m benchmarks.throughput --layers 12 --d-model 768 --seq-len 512 --micro-batch 32 \
        --depths 1,3,6,12                           # BERT-Base width on a GPU, per-depth rows

Both loops run in this one process, alternating in rounds so that machine noise hits both; the
plain loop gets its batches pre-built, ours builds them (masking included) every step, so the
gap is everything our step adds; a third row reads the loss on the host every step, the one
wait our step needs to stop a NaN before the optimizer step. `--depths` adds plain-loop rows
that run only the first d layers (the cost of one Apollo step at sampled depth d): on a GPU,
shallow steps may use the chip less well than full ones, which is the gap between Apollo's
FLOPs and wall-time savings.
MFU = model FLOPs/s (the count in `apollo_ray.model.flops_per_microbatch`) over the chip's
dense bf16 peak (`--peak-tflops`, known for A100/H100/H200). Writes
benchmarks/results/throughput-<kind>-<device>.json.
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
from apollo_ray.model import TransformerLM, flops_per_microbatch
from apollo_ray.trainer import Trainer, autocast_for
from benchmarks.common import print_table, save

__all__ = ["demo_data", "device_tag", "main", "peak_flops", "plain_loop"]


def demo_data(kind: str) -> Path:
    path = Path("data") / f"demo-{kind}"
    if not (path / "manifest.json").exists():
        prepare(["demo"], path, kind, vocab_size=8192, val_fraction=0.05)
    return path


# Dense bf16 peak FLOP/s by GPU name (vendor data sheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def device_tag(device: torch.device) -> str:
    """`cpu`, or the GPU's model in lower case (`h100`), for the results file name."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    return next((k.lower() for k in PEAK_BF16 if k in name), "cuda")


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def plain_loop(
    cfg: RunConfig, model_cfg, batches, device, depth: int | None = None, read_loss: bool = False
) -> Callable[[int], None]:
    """The minimal loop a person would write: forward, backward, clip, AdamW step.

    `depth` runs only the first `depth` layers (all of them by default); `read_loss` reads the
    loss on the host every step (as a trainer that checks it before the optimizer step must)."""
    torch.manual_seed(cfg.seed)
    model = TransformerLM(model_cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.01)
    autocast = autocast_for(cfg.train.precision, device)
    plan = list(range(depth or model_cfg.n_layer))

    def run(n: int) -> None:
        for i in range(n):
            x, y = batches[i % len(batches)]
            with autocast:
                _, loss = model(x, y, plan)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            if read_loss:
                loss.item()
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
    parser.add_argument(
        "--depths",
        type=lambda s: [int(d) for d in s.split(",")],
        default=[],
        help="comma-separated depths for extra plain-loop rows, e.g. 1,3,6,12",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="chip's dense bf16 peak (default: known)"
    )
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
    model_cfg = trainer.model_cfg

    def ours(n: int) -> None:
        for _ in range(n):
            trainer.train_step()

    full = model_cfg.n_layer
    loops: dict[str, tuple[Callable[[int], None], int]] = {
        "plain PyTorch loop": (plain_loop(cfg, model_cfg, batches, device), full),
        "apollo_ray Trainer.train_step": (ours, full),
        "plain loop + loss.item()": (plain_loop(cfg, model_cfg, batches, device, None, True), full),
    }
    for d in args.depths:
        loops[f"plain loop, depth {d}"] = (plain_loop(cfg, model_cfg, batches, device, d), d)
    tokens = args.steps * args.micro_batch * args.seq_len
    timings: dict[str, list[float]] = {name: [] for name in loops}
    for run, _ in loops.values():
        run(2)  # warm-up
    for _ in range(args.rounds):
        for name, (run, _) in loops.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(args.steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[name].append(tokens / (time.perf_counter() - t0))

    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    base = statistics.median(timings["plain PyTorch loop"])
    rows = []
    for name, (_, depth) in loops.items():
        tok_s = statistics.median(timings[name])
        flops_per_token = flops_per_microbatch(model_cfg, 1, args.seq_len, depth) / args.seq_len
        rows.append(
            {
                "loop": name,
                "depth": depth,
                "tokens/s (median)": tok_s,
                "vs plain": tok_s / base - 1,
                "TFLOP/s": tok_s * flops_per_token / 1e12,
                "MFU": tok_s * flops_per_token / peak if peak else None,
                "rounds": [round(x) for x in timings[name]],
            }
        )
    columns = ["loop", "depth", "tokens/s (median)", "vs plain", "TFLOP/s", "MFU", "rounds"]
    print_table(rows, columns)
    payload = {"args": vars(args), "device": str(device), "peak_flops": peak, "rows": rows}
    path = save(f"throughput-{args.kind}-{device_tag(device)}", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
