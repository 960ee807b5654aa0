"""Does growth save compute? Apollo's released recipe and the literature's levers against the
scratch frontier, in a regime where growth could pay, over seeds.

    python -m benchmarks.acceleration --kind gpt              # the CPU preset, ~90 min here
    python -m benchmarks.acceleration --kind bert --seeds 3 --arms release stack
    python -m benchmarks.acceleration --kind gpt --preset gpu # one H100/H200, ~8 min

Every run trains the same `n_layer`-deep model (width and data per preset) with AdamW and one
warmup + cosine decay to zero over its own budget; the full budget is `tokens_per_param` tokens
per non-embedding parameter. The yardstick is the scratch frontier (docs/method.md, section 8):
from-scratch runs at `frontier` x the budget, each fully decayed. An arm's final held-out loss
is read against the frontier of its own seed: speedup = the FLOPs scratch needs for that loss /
the arm's FLOPs (likewise in seconds); over seeds, the geometric mean with a 95% t-interval on
the logs (apollo_ray.yardstick.stats). An interval that contains 1 is "no difference".

Arms (depths scaled from the release's 1, 3, 6, 12 to the preset's depth L):
- release: N = 1, L/4, L/2, L, stages ending at 5/10/25% of the steps, released LVPS, `interp`
  plan, interpolation (copy) growth, one global LR schedule, AdamW moments kept per layer slot;
- fresh-moments, copied-moments: the release with grown layers' moments emptied / blended;
- rewarmup: a linear LR re-warmup after each growth, as long as the first warmup;
- rewind: the LR schedule starts again at each growth over the steps that remain (MSG);
- start-L/4, start-L/2: the release without its first stage(s) (G_stack: growth factors up to 4
  work and a 1-layer start underperforms);
- stack: the `stack` plan and stacking growth instead of `interp` and interpolation;
- stages-i: MIDAS-style stage lengths T_i proportional to i (ends at 10/30/60%).
The frontier, the release and the best other arm get the preset's seeds (`--seeds`; 3 on the
CPU, 1 on the GPU); the best other arm and the release also run at the preset's small budget
(1/4); the other arms one seed ("indicative"). A searched schedule (`--searched`) runs with
every seed and is also checked against scratch trained at its own compute (fully decayed, no
reading between frontier budgets).

Every finished run is kept as one JSON file under benchmarks/results/acceleration/<kind>-<preset>/
(its configuration hash, losses, cost and curve), so an interrupted benchmark resumes where it
stopped and a changed setup is never mixed with old runs; a run that was cut off resumes from its
checkpoint under runs/acceleration/. Writes benchmarks/results/acceleration-<kind>-<preset>.json
and a plot of every arm against the frontier (.png beside it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from apollo_ray.config import ModelConfig, RunConfig, load_run_config
from apollo_ray.data.shards import load_manifest, open_split, prepare
from apollo_ray.method.model import TransformerLM
from apollo_ray.training.trainer import Trainer
from apollo_ray.yardstick.frontier import Frontier, FrontierPoint, rank_key
from apollo_ray.yardstick.stats import log_interval, paired_log_interval
from benchmarks.common import RESULTS, machine, print_table

__all__ = ["ARMS", "PRESETS", "Preset", "arm_schedules", "main", "unigram_entropy"]


@dataclass(frozen=True)
class Preset:
    """The model, batch and budget of one setup; `steps` follow from `tokens_per_param`."""

    n_layer: int
    d_model: int
    n_head: int
    seq_len: int
    micro_batch: int
    lr: dict[str, float]  # by kind: AdamW's peak, chosen for scratch (docs/results.md)
    tokens_per_param: float
    frontier: tuple[float, ...]
    small_budget: float
    evals: int = 16  # evaluations per run, besides the final one on the whole validation split
    eval_batches: int = 4
    vocab_size: int = 257  # byte-level (gpt) / character-level (bert) tokens
    sources: tuple[str, ...] = ("demo",)  # the corpora prepared when --data is not given
    seeds: int = 3  # of the frontier and the headline arms
    arms: tuple[str, ...] = ()  # default arms; () = all


PRESETS = {
    # 2-core CPU: 8 x 48 (226k non-embedding parameters), 22 tokens per parameter
    "cpu": Preset(
        8,
        48,
        3,
        128,
        32,
        {"gpt": 2e-3, "bert": 1e-3},
        22.0,
        (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2),
        1 / 4,
    ),
    # one H100/H200 in at most 8 minutes: the frontier and the release, one seed (--seeds 1),
    # on both embedded corpora (14M train tokens): 8 x 160 (2.5M non-embedding parameters) is
    # the widest that 20 tokens per parameter keep within 4 epochs (3.5)
    "gpu": Preset(
        8,
        160,
        5,
        256,
        128,
        {"gpt": 2e-3, "bert": 1e-3},
        20.0,
        (1 / 4, 1 / 2, 1, 2),
        1 / 4,
        sources=("demo", "sotu"),
        seeds=1,
        arms=("release",),
    ),
    # the tests': seconds on a CPU
    "toy": Preset(
        8,
        16,
        2,
        32,
        8,
        {"gpt": 3e-3, "bert": 3e-3},
        1.0,
        (1 / 2, 1, 2),
        1 / 2,
        evals=4,
        eval_batches=2,
    ),
}


def arm_schedules(n_layer: int, steps: int) -> dict[str, dict[str, Any]]:
    """The schedule of every arm for depth `n_layer` and a budget of `steps` (see the module
    docstring); depths are the release's 1, 3, 6, 12 scaled to `n_layer`."""
    quarter, half = max(1, n_layer // 4), max(1, n_layer // 2)
    if not 1 < quarter < half < n_layer:
        raise ValueError(f"the arms need a depth of at least 8 layers, got {n_layer}")
    release = {
        "depths": [1, quarter, half, n_layer],
        "stage_ends": [0.05, 0.10, 0.25],
        "sampler": "apollo",
        "plan": "interp",
        "growth": "interpolate",
        "alpha": 0.0,
        "optimizer_state": "slot",
    }
    return {
        "release": release,
        "fresh-moments": release | {"optimizer_state": "fresh"},
        "copied-moments": release | {"optimizer_state": "copy"},
        "rewarmup": release | {"rewarmup_steps": max(1, round(0.025 * steps))},
        "rewind": release | {"lr_rewind": True},
        f"start-{quarter}": release
        | {"depths": [quarter, half, n_layer], "stage_ends": [0.1, 0.25]},
        f"start-{half}": release | {"depths": [half, n_layer], "stage_ends": [0.25]},
        "stack": release | {"plan": "stack", "growth": "stack"},
        "stages-i": release | {"stage_ends": [0.1, 0.3, 0.6]},
    }


ARMS = list(arm_schedules(8, 1000))


@dataclass
class Result:
    """One finished run: what the benchmark reads, and the curve it plots."""

    arm: str
    budget: float
    seed: int
    steps: int
    flops: float
    wall_s: float
    final_loss: float
    final_loss_se: float | None
    accuracy: float
    key: str
    machine: dict[str, Any]
    curve: dict[str, list[float]] = field(default_factory=dict)


class Bench:
    """The runs of one (kind, preset, data), each trained once and cached."""

    def __init__(self, kind: str, preset_name: str, data: Path, seeds: int, quiet: bool) -> None:
        self.kind, self.preset_name, self.preset = kind, preset_name, PRESETS[preset_name]
        self.lr = self.preset.lr[kind]
        self.data, self.seeds, self.quiet = data, range(seeds), quiet
        self.manifest = load_manifest(data)
        self.cache = RESULTS / "acceleration" / f"{kind}-{preset_name}"
        self.run_root = Path("runs") / "acceleration" / f"{kind}-{preset_name}"
        p = self.preset
        model = ModelConfig(
            kind=kind,
            n_layer=p.n_layer,
            d_model=p.d_model,
            n_head=p.n_head,
            max_seq_len=p.seq_len,
            vocab_size=self.manifest.vocab_size,
            dropout=0.0,
        )
        self.params = sum(q.numel() for q in TransformerLM(model).layers.parameters())
        self.steps = math.ceil(p.tokens_per_param * self.params / (p.micro_batch * p.seq_len))
        self.train_tokens = self.manifest.splits["train"].tokens
        self.entropy = unigram_entropy(data, kind)
        self.searched: dict[str, Any] | None = None  # the schedule of `--searched`
        self.finished: dict[str, Result] = {}  # by run name: each file read or run trained once

    def tokens(self, budget: float) -> int:
        return self.budget_steps(budget) * self.preset.micro_batch * self.preset.seq_len

    def budget_steps(self, budget: float) -> int:
        return max(1, round(budget * self.steps))

    def config(self, arm: str, budget: float, seed: int) -> RunConfig:
        p, steps = self.preset, self.budget_steps(budget)
        if arm == "scratch":
            schedule = None
        elif arm == "searched":
            schedule = self.searched
        else:
            schedule = arm_schedules(p.n_layer, steps)[arm]
        name = f"{arm}@{budget:g}-s{seed}"
        return RunConfig.model_validate(
            {
                "name": name,
                "out_dir": str(self.run_root / name),
                "seed": seed,
                "model": {
                    "kind": self.kind,
                    "n_layer": p.n_layer,
                    "d_model": p.d_model,
                    "n_head": p.n_head,
                    "max_seq_len": p.seq_len,
                    "dropout": 0.0,
                },
                "data": {"path": str(self.data), "seq_len": p.seq_len},
                "train": {
                    "steps": steps,
                    "micro_batch": p.micro_batch,
                    "lr": self.lr,
                    "warmup": 0.025,
                    "eval_every": max(1, steps // p.evals),
                    "eval_batches": p.eval_batches,
                    "final_eval_tokens": 10**9,  # the whole validation split
                    "checkpoint_every": max(1, steps // 4),
                    "keep_checkpoints": 1,
                    "log_every": max(1, steps // 100),
                },
                "schedule": schedule,
            }
        )

    def run(self, arm: str, budget: float, seed: int) -> Result:
        """The cached result of (arm, budget, seed), training it first if there is none."""
        cfg = self.config(arm, budget, seed)
        if cfg.name in self.finished:
            return self.finished[cfg.name]
        key = _key(cfg, self.manifest.model_dump_json())
        path = self.cache / f"{cfg.name}.json"
        if path.exists():
            cached = Result(**json.loads(path.read_text()))
            if cached.key == key:
                self.finished[cfg.name] = cached
                return cached
            print(f"{path.name}: made with another setup; training it again")
        saved = cfg.output_dir / "config.json"
        if saved.exists() and saved.read_text() != cfg.model_dump_json(indent=2):
            shutil.rmtree(cfg.output_dir)  # a cut-off run of another setup: not resumable
        start = time.perf_counter()
        state = Trainer(cfg, progress=not self.quiet).fit()
        rows = [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").open()]
        evals = [r for r in rows if "eval_loss" in r and r.get("event") != "growth"]
        final = evals[-1]
        result = Result(
            arm=arm,
            budget=budget,
            seed=seed,
            steps=cfg.train.steps,
            flops=float(state.flops),
            wall_s=state.wall_time,
            final_loss=final["eval_loss"],
            final_loss_se=final.get("eval_loss_se"),
            accuracy=final["eval_accuracy"],
            key=key,
            machine=machine(),
            curve={
                "flops": [float(r["flops"]) for r in evals],
                "wall_s": [r["wall_time"] for r in evals],
                "loss": [r["eval_loss"] for r in evals],
            },
        )
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(result), indent=1) + "\n")
        tmp.replace(path)
        self.finished[cfg.name] = result
        print(
            f"{cfg.name}: loss {result.final_loss:.4f}, acc {result.accuracy:.3f}, "
            f"{result.flops:.3e} FLOPs, {result.wall_s:.0f} s training "
            f"({time.perf_counter() - start:.0f} s in all)",
            flush=True,
        )
        return result


def _key(cfg: RunConfig, manifest: str) -> str:
    """A hash of everything that decides a run's numbers (not where it writes)."""
    setup = cfg.model_dump(exclude={"out_dir", "name"}) | {"manifest": manifest}
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]


def unigram_entropy(data: Path, kind: str) -> float:
    """Entropy (nats) of the train split's token frequencies: the loss of a model that knows
    only how often each token occurs (for bert, over tokens that are not special)."""
    manifest = load_manifest(data)
    counts = sum(
        np.bincount(shard, minlength=manifest.vocab_size).astype(np.float64)
        for shard in open_split(data, "train", manifest)
    )
    if kind == "bert":
        counts[list(manifest.special_ids.values())] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def embedded_data(kind: str, preset: Preset) -> Path:
    """The preset's embedded corpora, prepared once into data/accel-<kind>-v<vocab>[-<sources>]
    (no suffix for the demo corpus alone)."""
    suffix = "" if preset.sources == ("demo",) else "-" + "-".join(preset.sources)
    path = Path("data") / f"accel-{kind}-v{preset.vocab_size}{suffix}"
    if not (path / "manifest.json").exists():
        prepare(list(preset.sources), path, kind, vocab_size=preset.vocab_size, val_fraction=0.05)
    return path


def searched_schedule(path: Path, bench: Bench) -> dict[str, Any]:
    """The schedule of a search's best.yaml, once its model and budget are the benchmark's."""
    cfg = load_run_config(path)
    p, m = bench.preset, cfg.model
    ours = (bench.kind, p.n_layer, p.d_model, p.seq_len, bench.steps, bench.lr)
    theirs = (m.kind, m.n_layer, m.d_model, cfg.data.seq_len, cfg.train.steps, cfg.train.lr)
    if ours != theirs or cfg.schedule is None:
        raise SystemExit(
            f"{path}: searched for another setup (kind, layers, width, seq_len, steps, lr = "
            f"{theirs}, schedule {'none' if cfg.schedule is None else 'set'}); this benchmark "
            f"runs {ours}"
        )
    return cfg.schedule.model_dump()


# --- reading the runs ------------------------------------------------------------------------


def frontiers(bench: Bench, seeds: Iterable[int]) -> dict[int, Frontier]:
    return {
        s: Frontier(
            [
                FrontierPoint(b, r.flops, r.wall_s, r.final_loss)
                for b in bench.preset.frontier
                for r in [bench.run("scratch", b, s)]
            ]
        )
        for s in seeds
    }


def summarise(
    arm: str, budget: float, runs: list[Result], fronts: dict[int, Frontier], bench: Bench
) -> dict[str, Any]:
    """One row of the JSON: the arm's runs read against the frontier of each run's seed."""
    readings = [fronts[r.seed].read(r.final_loss, r.flops, r.wall_s) for r in runs]
    speed = log_interval([x.speedup for x in readings])
    wall = log_interval([x.wall_speedup for x in readings])
    return {
        "arm": arm,
        **frontier_row(bench, budget, runs),
        "indicative": len(runs) < 3,
        "speedup": [x.speedup for x in readings],
        "bound": [x.bound for x in readings],
        "speedup_mean": speed.mean,
        "speedup_ci95": [speed.low, speed.high],
        "wall_speedup": [x.wall_speedup for x in readings],
        "wall_speedup_mean": wall.mean,
        "wall_speedup_ci95": [wall.low, wall.high],
        "unigram_entropy": bench.entropy,
    }


def plot(
    bench: Bench, frontier_rows: list[dict], arm_rows: list[dict], path: Path, title: str
) -> Path:
    """Final loss against FLOPs (log): the mean frontier, and per arm its curve (first seed) with
    every seed's end point."""
    fig = Figure(figsize=(8, 5.2), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    xs = [statistics.fmean(r["flops"]) for r in frontier_rows]
    ys = [statistics.fmean(r["final_loss"]) for r in frontier_rows]
    ax.plot(xs, ys, "s-", color="black", linewidth=2, label="scratch frontier (mean)", zorder=5)
    for r in frontier_rows:
        x = statistics.fmean(r["flops"])
        ax.plot([x] * len(r["final_loss"]), r["final_loss"], ".", color="0.4", zorder=4)
        at = (x, statistics.fmean(r["final_loss"]))
        ax.annotate(f"{r['budget']:g}x", at, fontsize=7, xytext=(4, 4), textcoords="offset points")
    for i, r in enumerate(arm_rows):
        searched = r["arm"] == "searched"  # drawn boldly: the comparison the study is for
        color = "magenta" if searched else colormaps["tab20"](i % 20)
        curve = bench.run(r["arm"], r["budget"], r["seeds"][0]).curve
        label = f"{r['arm']} @{r['budget']:g}x: {r['speedup_mean']:.2f}x"
        width = 2 if searched else 1
        ax.plot(curve["flops"], curve["loss"], "-", color=color, linewidth=width, alpha=0.7)
        ax.plot(r["flops"], r["final_loss"], "o", color=color, markersize=4, label=label)
    ax.set_xscale("log")
    low = min(ys + [v for r in arm_rows for v in r["final_loss"]])
    high = max(ys)
    ax.set_ylim(low - 0.15 * (high - low), high + 0.6 * (high - low))
    ax.set_xlabel("training compute (FLOPs, log scale)")
    ax.set_ylabel("eval loss (final: whole validation split)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.savefig(path)
    return path


def frontier_row(bench: Bench, budget: float, runs: list[Result]) -> dict[str, Any]:
    """The runs of one budget: per seed its cost, final loss and accuracy; and the regime."""
    tokens = bench.tokens(budget)
    return {
        "budget": budget,
        "seeds": [r.seed for r in runs],
        "steps": runs[0].steps,
        "flops": [r.flops for r in runs],
        "wall_s": [r.wall_s for r in runs],
        "final_loss": [r.final_loss for r in runs],
        "final_loss_se": [r.final_loss_se for r in runs],
        "accuracy": [r.accuracy for r in runs],
        "tokens_per_param": tokens / bench.params,
        "epochs": tokens / bench.train_tokens,
    }


def equal_flops_check(bench: Bench, row: dict[str, Any], scratch: dict[str, Any]) -> dict:
    """An arm against scratch runs (each fully decayed) whose budget spends the arm's mean
    FLOPs: its final loss / theirs, paired by seed (< 1: the arm learns more for the same
    compute). It checks a speedup read off the frontier between two of its budgets."""
    budget = round(statistics.fmean(row["flops"]) / statistics.fmean(scratch["flops"]), 3)
    runs = [bench.run("scratch", budget, s) for s in row["seeds"]]
    ratio = paired_log_interval(row["final_loss"], [r.final_loss for r in runs])
    return {
        "arm": row["arm"],
        "scratch_budget": budget,
        "flops": [r.flops for r in runs],
        "arm_final_loss": row["final_loss"],
        "scratch_final_loss": [r.final_loss for r in runs],
        "loss_ratio_mean": ratio.mean,
        "loss_ratio_ci95": [ratio.low, ratio.high],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.acceleration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kind", choices=["gpt", "bert"], required=True)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument(
        "--data",
        type=Path,
        help="prepared data (default: the preset's embedded corpora, prepared on first use)",
    )
    parser.add_argument(
        "--seeds", type=int, help="seeds of the frontier and headline arms (default: the preset's)"
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        metavar="ARM",
        help=f"arms besides scratch (default: the preset's, or all: {' '.join(ARMS)})",
    )
    parser.add_argument(
        "--searched",
        type=Path,
        metavar="BEST_YAML",
        help="also run the schedule a search found (its best.yaml, e.g. from "
        "search_spaces/accel-gpt.yaml) with every seed, and compare it with the release",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar per run")
    parser.add_argument(
        "--prepare-only", action="store_true", help="prepare the preset's data, train nothing"
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    data = args.data or embedded_data(args.kind, preset)
    if args.prepare_only:
        print(f"prepared {data}")
        return
    bench = Bench(args.kind, args.preset, data, args.seeds or preset.seeds, args.quiet)
    arms = args.arms or list(preset.arms) or list(arm_schedules(preset.n_layer, bench.steps))
    arms = [a for a in arm_schedules(preset.n_layer, bench.steps) if a in arms]  # scaled names
    if args.searched:
        bench.searched = searched_schedule(args.searched, bench)
        arms.append("searched")
    entropy = bench.entropy
    seeds = list(bench.seeds)
    full_tokens = bench.tokens(1.0)
    print(
        f"{args.kind} {preset.n_layer} x {preset.d_model}: {bench.params:,} non-embedding "
        f"parameters; full budget {bench.steps} steps = {full_tokens:,} tokens = "
        f"{full_tokens / bench.params:.1f} tokens/parameter = "
        f"{full_tokens / bench.train_tokens:.2f} epochs of {data} "
        f"({bench.train_tokens:,} train tokens); unigram entropy {entropy:.3f} nats",
        flush=True,
    )

    # cheapest useful order: one seed of everything, then the headline arms' other seeds
    frontiers(bench, seeds[:1])
    for arm in arms:
        bench.run(arm, 1.0, 0)
    fronts = frontiers(bench, seeds)
    first = {a: summarise(a, 1.0, [bench.run(a, 1.0, 0)], fronts, bench) for a in arms}
    others = [a for a in arms if a not in ("release", "searched")]
    best = min(
        others,
        key=lambda a: rank_key(
            first[a]["bound"][0],
            first[a]["final_loss"][0],
            first[a]["flops"][0],
            first[a]["speedup"][0],
        ),
        default=None,
    )
    headline = [a for a in ("release", best, "searched") if a in arms and a is not None]
    rows = []
    for arm in arms:
        n = seeds if arm in headline else seeds[:1]
        rows.append(summarise(arm, 1.0, [bench.run(arm, 1.0, s) for s in n], fronts, bench))
    for arm in [a for a in headline if a != "searched"]:
        runs = [bench.run(arm, preset.small_budget, s) for s in seeds]
        rows.append(summarise(arm, preset.small_budget, runs, fronts, bench))

    frontier_rows = [
        frontier_row(bench, b, [bench.run("scratch", b, s) for s in seeds]) for b in preset.frontier
    ]
    scratch = next(r for r in frontier_rows if r["budget"] == 1)
    scratch_loss = statistics.fmean(scratch["final_loss"])
    plateau = scratch_loss > 0.8 * entropy
    comparisons = []
    by = {(r["arm"], r["budget"]): r for r in rows}
    pairs = [(best, 1.0), (best, preset.small_budget), ("searched", 1.0)]
    for arm, budget in pairs:
        if ("release", budget) in by and (arm, budget) in by and len(seeds) > 1:
            a, b = by[(arm, budget)], by[("release", budget)]
            ratio = paired_log_interval(a["speedup"], b["speedup"])
            comparisons.append(
                {
                    "arms": [arm, "release"],
                    "budget": budget,
                    "speedup_ratio_mean": ratio.mean,
                    "speedup_ratio_ci95": [ratio.low, ratio.high],
                }
            )
    # the searched schedule against scratch trained at its own compute (no interpolation)
    equal_flops = (
        [equal_flops_check(bench, by[("searched", 1.0)], scratch)] if bench.searched else []
    )
    title = (
        f"{args.kind.upper()} {preset.n_layer}x{preset.d_model}, "
        f"{full_tokens / bench.params:.0f} tokens/param, "
        f"{full_tokens / bench.train_tokens:.1f} epochs; unigram entropy {entropy:.2f}"
    )
    stem = f"acceleration-{args.kind}-{args.preset}"
    figure = plot(bench, frontier_rows, rows, RESULTS / f"{stem}.png", title)
    _print(frontier_rows, rows, comparisons, equal_flops)
    answer = _answer(rows, plateau, scratch_loss, entropy)
    print(answer)
    payload = {
        "machine": machine(),
        "kind": args.kind,
        "preset": {"name": args.preset, **asdict(preset)},
        "data": {
            "path": str(data),
            "sources": bench.manifest.sources,
            "vocab_size": bench.manifest.vocab_size,
            "train_tokens": bench.train_tokens,
        },
        "run_machines": sorted(
            {r.machine["cpu"] + " / " + str(r.machine["gpu"]) for r in bench.finished.values()}
        ),
        "regime": {
            "nonembedding_params": bench.params,
            "steps": bench.steps,
            "tokens_per_param": full_tokens / bench.params,
            "epochs": full_tokens / bench.train_tokens,
            "unigram_entropy": entropy,
            "scratch_final_loss": scratch_loss,
            "on_unigram_plateau": plateau,
        },
        "frontier": frontier_rows,
        "arms": rows,
        "best_other_arm": best,
        "comparisons": comparisons,
        "equal_flops": equal_flops,
        "answer": answer,
    }
    path = RESULTS / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path} and {figure}")


def _ci(row: dict[str, Any], key: str) -> str:
    low, high = row[f"{key}_ci95"]
    mean = row[f"{key}_mean"]
    bounds = {b for b in row.get("bound", []) if b}
    mark = {"lower": ">=", "upper": "<="}.get(next(iter(bounds)), "") if bounds else ""
    return f"{mark}{mean:.3f}" if low is None else f"{mark}{mean:.3f} [{low:.3f}, {high:.3f}]"


def _print(
    frontier_rows: list[dict], rows: list[dict], comparisons: list[dict], equal_flops: list[dict]
) -> None:
    def line(r: dict) -> dict[str, object]:
        values = r["final_loss"]
        sd = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        arm = r.get("arm", "scratch")
        return {
            "run": f"{arm} @{r['budget']:g}x",
            "seeds": len(r["seeds"]),
            "tok/param": r["tokens_per_param"],
            "final loss": f"{statistics.fmean(values):.4f}{sd}",
            "accuracy": statistics.fmean(r["accuracy"]),
            "FLOPs": statistics.fmean(r["flops"]),
            "speedup [95% CI]": _ci(r, "speedup") if "arm" in r else "frontier",
            "wall speedup": _ci(r, "wall_speedup") if "arm" in r else None,
            "note": "indicative (1 seed)" if r.get("indicative") else "",
        }

    table = [line(r) for r in [*frontier_rows, *rows]]
    columns = ["run", "seeds", "tok/param", "final loss", "accuracy", "FLOPs"]
    print_table(table, [*columns, "speedup [95% CI]", "wall speedup", "note"])
    for c in comparisons:
        low, high = c["speedup_ratio_ci95"]
        print(
            f"{c['arms'][0]} / {c['arms'][1]} at {c['budget']:g}x: speedup ratio "
            f"{c['speedup_ratio_mean']:.3f} [{low:.3f}, {high:.3f}] (paired by seed)"
        )
    for e in equal_flops:
        low, high = e["loss_ratio_ci95"]
        ci = f" [{low:.4f}, {high:.4f}]" if low is not None else ""
        print(
            f"{e['arm']} against scratch at its compute ({e['scratch_budget']:g}x, fully "
            f"decayed): final loss {statistics.fmean(e['arm_final_loss']):.4f} vs "
            f"{statistics.fmean(e['scratch_final_loss']):.4f}, ratio "
            f"{e['loss_ratio_mean']:.4f}{ci} (paired by seed)"
        )


def _answer(rows: list[dict], plateau: bool, scratch_loss: float, entropy: float) -> str:
    """What the numbers say, in words: per headline arm, its speedup and whether it differs
    from 1."""
    if plateau:
        return (
            f"No saving reported: scratch's final loss {scratch_loss:.3f} is not well below the "
            f"unigram entropy {entropy:.3f} (the model has not left the unigram plateau)."
        )
    parts = []
    for r in rows:
        low, high = r["speedup_ci95"]
        if low is None:
            parts.append(f"{r['arm']} at {r['budget']:g}x: speedup {_ci(r, 'speedup')} (1 seed)")
            continue
        verdict = (
            "no difference from scratch"
            if low <= 1 <= high
            else ("saves compute" if low > 1 else "costs compute")
        )
        parts.append(f"{r['arm']} at {r['budget']:g}x: speedup {_ci(r, 'speedup')}, {verdict}")
    return "; ".join(parts) + "."


if __name__ == "__main__":
    main()
