"""Search small, train big: does the ranking a schedule search finds on a small proxy hold at
the target size? The demo's GPT (4 x 28) searched, its schedules carried to the acceleration
benchmark's 8 x 48 GPT (22 tokens per parameter) and read against that benchmark's tuned
scratch frontier, which it caches (benchmarks/results/acceleration/gpt-<preset>/).

    python -m benchmarks.transfer                  # the CPU preset, ~45 min here
    python -m benchmarks.transfer --preset gpu --seeds 1   # the GPU target (8 x 160; in
                                                   # benchmarks/gpu.sh, after its frontier)

1. The proxy: the study `search_spaces/transfer-gpt.yaml` (the demo's setup, 8 TPE trials,
   the best confirmed with 3 fresh seeds) runs through the product (`apollo_ray.tune`: local
   Ray, MLflow in outputs/), its `transfer` section aside; a finished search is reused.
2. The release (base.schedule) trains at the proxy on the transfer's `best_seeds` fresh seeds
   (the search did not train it) and is read against the proxy's frontier, as a trial is.
3. The carried schedules (the study's `transfer`: `carry` trials, the best, the worst and between,
   and the release) are scaled by the product's rule (`apollo_ray.study.scaling`) to the target
   preset's depth and run there like the benchmark's arms: at the LR and schedule family
   scratch chose for the full budget, each read on the test split against the frontier of its
   seed (0, 1, 2; the proxy's best and the release on `best_seeds` of them, the others on one).
4. The report is the product's (`apollo_ray.search.transfer.compare`): proxy and target
   speedups with 95% intervals, Spearman's rho with a bootstrap interval over schedules and
   seeds, whether the proxy's best is the target's. Written to
   benchmarks/results/transfer-gpt-<preset>.json with a proxy-vs-target plot (.png beside it).

The product's own transfer (`python -m apollo_ray.tune search_spaces/transfer-gpt.yaml`) trains
the target's frontier itself; this benchmark reads the one the acceleration benchmark tuned
(the same sweep: wsd at 4 LRs a factor of 2 apart, an edge extended, cosine near 1x).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from apollo_ray.records.plots import transfer_scatter
from apollo_ray.search.baseline import ensure_frontier
from apollo_ray.search.summary import searched
from apollo_ray.search.transfer import RELEASE, carried, compare, format_transfer, proxy_side
from apollo_ray.search.transfer import target_params as scaled
from apollo_ray.search.tuner import score
from apollo_ray.study.schema import StudyConfig, load_study
from apollo_ray.study.space import materialize
from apollo_ray.training.runlog import METRICS, last_eval
from apollo_ray.training.trainer import Trainer
from benchmarks.acceleration import PRESETS, Bench, embedded_data, frontier
from benchmarks.common import RESULTS, machine

__all__ = ["main"]

STUDY = Path("search_spaces/transfer-gpt.yaml")


def proxy_search(path: Path, address: str | None) -> tuple[StudyConfig, dict[str, Any]]:
    """The study (with its transfer) and its proxy search's summary, run first if need be."""
    study = load_study(path)
    if study.transfer is None:
        raise SystemExit(f"{path}: the study has no `transfer` section")
    if study.transfer.lr != "scratch":
        raise SystemExit(f"{path}: this benchmark runs the target at scratch's LR (lr: scratch)")
    if searched(study) is None:
        from apollo_ray.tune import cheap_checks, run_study

        proxy = StudyConfig.model_validate(study.model_dump(mode="json", exclude={"transfer"}))
        cheap_checks(proxy, address)
        run_study(proxy, str(path), address, resume=True)
    summary = searched(study)
    assert summary is not None
    return study, summary


def release_at_proxy(study: StudyConfig) -> dict[str, Any]:
    """base.schedule trained at the proxy on the transfer's fresh seeds (base.seed + 1, ...),
    where the product's transfer trains it, and read against the proxy's frontier."""
    assert study.transfer is not None
    scratch = ensure_frontier(study)  # the search's: cached
    side: dict[str, Any] = {"seeds": [], "speedups": [], "test_speedups": []}
    for seed in study.fresh_seeds(study.transfer.best_seeds):
        name = f"{RELEASE}-seed{seed}"
        out = Path(study.study_dir) / "trials" / name
        cfg = materialize(study.base, {"seed": seed}, f"{study.experiment}-{name}", str(out))
        done = (out / METRICS).exists() and last_eval(out / METRICS).get("step") == cfg.train.steps
        if not done:
            Trainer(cfg, progress=False).fit()
        s = score(out / METRICS, scratch)
        side["seeds"].append(seed)
        side["speedups"].append(s["speedup"])
        side["test_speedups"].append(s.get("test_speedup"))
        print(f"proxy {name}: speedup {s['speedup']:.3g} (test {s.get('test_speedup'):.3g})")
    return side


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.transfer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--study", type=Path, default=STUDY, help=f"default: {STUDY}")
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu", help="the target's")
    parser.add_argument(
        "--data",
        type=Path,
        help="the target's prepared data, with a test split (default: the preset's embedded "
        "corpora, as the acceleration benchmark prepares them)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        help="seeds at the target at most (default: the study's best_seeds; the GPU preset's "
        "frontier has one)",
    )
    parser.add_argument("--address", help="Ray cluster for the proxy search (default: local)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar per target run")
    args = parser.parse_args(argv)

    study, summary = proxy_search(args.study, args.address)
    t = study.transfer
    assert t is not None and study.base.schedule is not None
    best = summary["best"][0]["trial"]
    picked = carried(summary["trials"], t.carry)
    entries = [
        {
            "schedule": r["trial"],
            "params": r["params"],
            "proxy": proxy_side(r, summary["confirmed"]),
        }
        for r in picked
    ]
    if t.release:
        entries.append({"schedule": RELEASE, "params": {}, "proxy": release_at_proxy(study)})

    preset = PRESETS[args.preset]
    data = args.data or embedded_data("gpt", preset)
    bench = Bench(
        "gpt", args.preset, data, min(t.best_seeds, args.seeds or t.best_seeds), args.quiet
    )
    tuned = bench.tune()  # cached by the acceleration benchmark
    choice = tuned.chosen[1.0]
    seeds = list(bench.seeds)
    by_seed = {s: bench.frontier_runs(s) for s in seeds}
    fronts, envelope, _, _ = bench.reading_fronts(by_seed)
    target = study.target()
    layers = target.base.model.n_layer
    if layers != preset.n_layer:
        raise SystemExit(
            f"the study's target has {layers} layers, preset {args.preset} has {preset.n_layer}"
        )
    for e in entries:
        e["target_params"] = scaled(
            study, target, e["params"], {"lr": choice.lr, "family": choice.family}
        )
        schedule = {
            k.removeprefix("schedule."): v
            for k, v in e["target_params"].items()
            if k.startswith("schedule.")
        }
        n = t.best_seeds if e["schedule"] in (best, RELEASE) else t.seeds
        side: dict[str, Any] = {"seeds": [], "speedups": [], "test_speedups": []}
        for seed in seeds[:n]:
            run = bench.arm(f"transfer-{e['schedule']}", 1.0, seed, schedule)
            val = frontier_read(by_seed[seed], run, "eval_loss")
            test = fronts[seed].read(run.test_loss, run.flops, run.wall_s)
            side["seeds"].append(seed)
            side["speedups"].append(val)
            side["test_speedups"].append(test.speedup)
        e["target"] = side
    report = compare(entries, best)
    report |= {
        "proxy": f"{study.experiment} ({study.base.model.n_layer} x {study.base.model.d_model})",
        "target": f"gpt-{args.preset} ({preset.n_layer} x "
        f"{preset.d_model}, {bench.tokens(1.0) / bench.params:.0f} tokens/param, "
        f"{bench.tokens(1.0) / bench.train_tokens:.1f} epochs)",
    }
    scratch_test = sum(by_seed[s][1.0].test_loss for s in seeds) / len(seeds)
    report["regime"] = {
        "described": f"{bench.tokens(1.0) / bench.params:.3g} tokens per parameter, "
        f"{bench.tokens(1.0) / bench.train_tokens:.2g} epochs, scratch at {scratch_test:.3g} "
        f"nats against a unigram entropy of {bench.entropy:.3g}"
    }
    text = format_transfer(report)
    print("\n" + text)
    stem = f"transfer-gpt-{args.preset}"
    figure = transfer_scatter(report, RESULTS / f"{stem}.png")
    payload = {
        "machine": machine(),
        "study": str(args.study),
        "proxy_summary": {k: summary[k] for k in ("answer", "regime", "baseline")},
        "target_choice": {"family": choice.family, "lr": choice.lr},
        "any_checkpoint_flags": envelope,
        **report,
    }
    path = RESULTS / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path} and {figure}")


def frontier_read(runs: dict, run, loss: str) -> float:
    """A target run's speedup on validation against its seed's scratch runs (what selects the
    target's best)."""
    return frontier(runs, loss).read(getattr(run, loss), run.flops, run.wall_s).speedup


if __name__ == "__main__":
    main()
