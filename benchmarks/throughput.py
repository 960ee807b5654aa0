"""Tokens/s of our training step, eager and compiled, against a minimal plain-PyTorch loop.

    python -m benchmarks.throughput                 # BERT 12 x 128, seq 64, batch 16 (the
                                                    # acceleration benchmark's model)
    python -m benchmarks.throughput --kind gpt --steps 10 --rounds 2 --run-steps 0
    python -m benchmarks.throughput --layers 12 --d-model 768 --seq-len 512 --micro-batch 32 \
        --depths 1,12 --run-steps 0                 # BERT-Base width on a GPU, per-depth rows

All loops run in this one process on the same batches, alternating in rounds so that machine
noise hits each: the plain loop (batches pre-built), our `Trainer.train_step` eager and with
`train.compile` (it builds its batches, masking included, every step), the plain loop reading
the loss on the host every step (the one wait our step has), on a CPU the same in bf16
autocast, and with `--depths` plain-loop rows (eager and compiled) that run only the first d
layers: one Apollo step at sampled depth d.

Beside the steady state: compile time (the first two compiled steps less two eager ones) with a
cold inductor cache (a fresh one, set here) and a warm one (after `torch._dynamo.reset()`, as a
new run on the same machine has it); a whole run (`--run-steps`, the acceleration benchmark's
Apollo run: stages, growths, evaluations) eager and compiled, end to end; and a profile of the
eager and the compiled step: op time, the shares of matmuls (what compiling cannot shorten) and
of inductor's generated kernels (what replaced the eager elementwise ops), and the attention
kernel that ran. MFU = model FLOPs/s (`apollo_ray.method.model.flops_per_microbatch`) over the
chip's dense bf16 peak (`--peak-tflops`, known for A100/H100/H200).
Writes benchmarks/results/throughput-<kind>-<device>.json (`compiled_vs_eager`: compiled over
eager `Trainer.train_step` tokens/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from apollo_ray.config import RunConfig
from apollo_ray.data import prepare
from apollo_ray.method.model import TransformerLM, flops_per_microbatch
from apollo_ray.training.optim import autocast_for, build_optimizer
from apollo_ray.training.trainer import Trainer
from benchmarks.common import print_table, save

__all__ = ["demo_data", "device_tag", "main", "peak_flops", "plain_loop", "profile_step"]

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear")


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
    cfg: RunConfig,
    model_cfg,
    batches,
    device,
    depth: int | None = None,
    read_loss: bool = False,
    compiled: bool = False,
) -> Callable[[int], None]:
    """The minimal loop a person would write: forward, backward, clip, AdamW step (the
    trainer's optimizer). `depth` runs only the first `depth` layers (all by default);
    `read_loss` reads the loss on the host every step; `compiled` compiles the layer calls and
    head as `train.compile` does."""
    torch.manual_seed(cfg.seed)
    model = TransformerLM(model_cfg).to(device).train()
    if compiled:
        model.compile_blocks()
    opt = build_optimizer(model, cfg.train)
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


def profile_step(step: Callable[[], object], device: torch.device) -> dict[str, object]:
    """Profile three calls of `step`: self time per step, the shares in matmuls and in
    inductor's generated kernels, the attention ops that ran, the most expensive other ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    on_device = device.type == "cuda"

    def self_time(e) -> float:
        return e.self_device_time_total if on_device else e.self_cpu_time_total

    total = sum(self_time(e) for e in events) or 1.0
    matmul = sum(self_time(e) for e in events if e.key in MATMULS)
    generated = sum(self_time(e) for e in events if "CompiledFxGraph" in e.key)
    attention = sorted({e.key for e in events if "scaled_dot_product" in e.key})
    others = sorted((e for e in events if e.key not in MATMULS), key=self_time, reverse=True)
    return {
        "step_s": total / 3 / 1e6,
        "matmul_share": matmul / total,
        "compiled_kernels_share": generated / total,
        "attention_ops": attention,
        "top_other_ops": [{"op": e.key[:60], "share": self_time(e) / total} for e in others[:6]],
    }


def run_config(
    args: argparse.Namespace, out: str, schedule: dict | None = None, **train: object
) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "throughput",
            "out_dir": out,
            "model": {
                "kind": args.kind,
                "n_layer": args.layers,
                "d_model": args.d_model,
                "n_head": max(1, args.d_model // args.head_dim),
                "max_seq_len": args.seq_len,
                "dropout": args.dropout,
            },
            "data": {"path": str(demo_data(args.kind)), "seq_len": args.seq_len},
            "train": {"steps": 10**6, "micro_batch": args.micro_batch, "lr": 1e-4, **train},
            "schedule": schedule,
        }
    )


def whole_run(args: argparse.Namespace, compiled: bool) -> float:
    """Seconds for `Trainer.fit()` of a whole Apollo run (the released recipe at this
    benchmark's model and batch, `--run-steps` steps), end to end."""
    n = args.layers
    schedule = {"depths": [1, n // 4, n // 2, n], "stage_ends": [0.05, 0.10, 0.25]}
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(
            args,
            out,
            schedule,
            compile=compiled,
            lr=1e-3,
            steps=args.run_steps,
            eval_every=max(1, args.run_steps // 20),
            checkpoint_every=args.run_steps,
            log_every=10,
        )
        t0 = time.perf_counter()
        Trainer(cfg, progress=False).fit()
        return time.perf_counter() - t0


def fresh_inductor_cache() -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="apollo-inductor-")
    torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=["bert", "gpt"], default="bert")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per round and loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=32, help="n_head = d_model / head_dim")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=None, help="default: BERT 0.1, GPT 0")
    parser.add_argument(
        "--depths",
        type=lambda s: [int(d) for d in s.split(",")],
        default=[],
        help="comma-separated depths for extra plain-loop rows, e.g. 1,3,6,12",
    )
    parser.add_argument(
        "--run-steps", type=int, default=200, help="steps of the whole-run timing (0: skip)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="chip's dense bf16 peak (default: known)"
    )
    args = parser.parse_args()
    if args.dropout is None:
        args.dropout = 0.1 if args.kind == "bert" else 0.0
    fresh_inductor_cache()

    out = tempfile.mkdtemp(prefix="apollo-bench-")
    trainers = {"eager": Trainer(run_config(args, out, compile=False), progress=False)}
    device = trainers["eager"].device
    bf16_rows = device.type == "cpu"  # on a GPU the default precision is bf16 already
    cfg, model_cfg = trainers["eager"].cfg, trainers["eager"].model_cfg
    batches = []
    for step in range(args.steps):
        b = trainers["eager"].train_data.batch(step, 0, micro_batch=args.micro_batch)
        batches.append((b["input_ids"].to(device), b["labels"].to(device)))

    def ours(trainer: Trainer) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                trainer.train_step()

        return run

    full = model_cfg.n_layer
    loops: dict[str, tuple[Callable[[int], None], int]] = {
        "plain PyTorch loop": (plain_loop(cfg, model_cfg, batches, device), full),
        "Trainer.train_step": (ours(trainers["eager"]), full),
    }
    compile_s: dict[str, float] = {}

    def add_compiled(name: str, run: Callable[[int], None], eager: Callable[[int], None]) -> None:
        """Add a compiled loop, timing its compilation: its first two steps less two eager."""
        t0 = time.perf_counter()
        eager(2)
        t1 = time.perf_counter()
        run(2)
        compile_s[name] = (time.perf_counter() - t1) - (t1 - t0)
        loops[name] = (run, full)

    trainers["compiled"] = Trainer(run_config(args, out, compile=True), progress=False)
    eager_steps = ours(trainers["eager"])
    add_compiled("Trainer.train_step, compiled", ours(trainers["compiled"]), eager_steps)
    loops["plain loop + loss.item()"] = (
        plain_loop(cfg, model_cfg, batches, device, None, read_loss=True),
        full,
    )
    if bf16_rows:
        for name, compiled in (("bf16", False), ("compiled, bf16", True)):
            bf16 = run_config(args, out, compile=compiled, precision="bf16")
            trainers[name] = Trainer(bf16, progress=False)
            loops[f"Trainer.train_step, {name}"] = (ours(trainers[name]), full)
    for d in args.depths:
        loops[f"plain loop, depth {d}"] = (plain_loop(cfg, model_cfg, batches, device, d), d)
        compiled = plain_loop(cfg, model_cfg, batches, device, d, compiled=True)
        compiled(2)
        loops[f"plain loop, depth {d}, compiled"] = (compiled, d)
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

    # warm cache: what a new run on this machine pays once its graphs were compiled before
    torch._dynamo.reset()
    warm = Trainer(run_config(args, out, compile=True), progress=False)
    t0 = time.perf_counter()
    eager_steps(2)
    t1 = time.perf_counter()
    ours(warm)(2)
    compile_s["Trainer.train_step, compiled (warm cache)"] = (time.perf_counter() - t1) - (t1 - t0)
    profile = {
        name: profile_step(trainers[name].train_step, device) for name in ("eager", "compiled")
    }

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
                "compile s": compile_s.get(name),
                "rounds": [round(x) for x in timings[name]],
            }
        )
    columns = ["loop", "depth", "tokens/s (median)", "vs plain", "TFLOP/s", "MFU", "compile s"]
    print_table(rows, [*columns, "rounds"])
    speed = {r["loop"]: r["tokens/s (median)"] for r in rows}
    compiled_vs_eager = speed["Trainer.train_step, compiled"] / speed["Trainer.train_step"]
    print(f"compiled vs eager: {compiled_vs_eager:.3f}x tokens/s")
    print(f"compile time: {compile_s}")
    for name, p in profile.items():
        print(
            f"{name} step profile: {p['step_s']:.3f} s of op time, matmuls "
            f"{p['matmul_share']:.0%}, compiled kernels {p['compiled_kernels_share']:.0%}; "
            f"attention ran as {p['attention_ops']}"
        )
    run_s = {}
    if args.run_steps:
        fresh_inductor_cache()  # cold: the run compiles everything itself
        run_s = {
            "eager": whole_run(args, compiled=False),
            "compiled, cold cache": whole_run(args, compiled=True),
            "compiled, warm cache": (torch._dynamo.reset(), whole_run(args, compiled=True))[1],
        }
        print(f"whole run of {args.run_steps} steps, seconds: {run_s}")
    payload = {
        "args": vars(args),
        "device": str(device),
        "peak_flops": peak,
        "compiled_vs_eager": compiled_vs_eager,
        "compile_s": compile_s,
        "whole_run_s": run_s,
        "profile": profile,
        "rows": rows,
    }
    path = save(f"throughput-{args.kind}-{device_tag(device)}", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
