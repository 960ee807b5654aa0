"""Search Apollo schedules with Ray Tune + Optuna: the product's main job.

    python -m apollo_ray.tune search_spaces/small.yaml            # CPU demo, local Ray
    python -m apollo_ray.tune search_spaces/bert.yaml --address auto
    python -m apollo_ray.tune search_spaces/small.yaml --resume   # finish an interrupted study

The three Ray tiers (Ray's train_tune_interop pattern):
1. `run_search` builds the `Tuner`: Optuna proposes each trial's schedule through Tune's
   `OptunaSearch` (define-by-run over the study's space, seeded); optional ASHA compares trials
   at equal cumulative FLOPs (`time_attr="flops"`), since Apollo trials are cheap early by design.
2. `trial_driver` is the Tune function trainable of one trial: it materialises the trial's
   `RunConfig`, runs its TorchTrainer and scores the run against the scratch baseline.
3. `apollo_ray.distributed.train_worker` runs on every Ray Train worker.

The scratch baseline (same model, data, budget) is trained once, before the search, and cached
in `<output_dir>/baselines/<hash>/` by a hash of what determines it, so another study with the
same setup reuses it. A trial whose loss goes NaN/inf or whose workers crash is marked failed
with its reason; the study goes on. At the end: a table, `best.yaml` (a ready-to-use run
config) and `summary.json` in `<output_dir>/<experiment>/`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from apollo_ray.acceleration import Curve, compare
from apollo_ray.config import ConfigError
from apollo_ray.data import DataError, load_manifest, prepare
from apollo_ray.study import (
    StudyConfig,
    baseline_config,
    load_study,
    materialize,
    suggest,
)
from apollo_ray.trainer import NonFiniteLossError

__all__ = ["OBJECTIVES", "ensure_baseline", "main", "run_search", "summarize", "trial_driver"]

# objective -> (Tune metric(s), mode(s))
OBJECTIVES: dict[str, tuple[Any, Any]] = {
    "eval_loss": ("eval_loss", "min"),
    "flops_saving": ("saving", "max"),
    "speedup": ("speedup", "max"),
    "pareto": (["eval_loss", "flops"], ["min", "min"]),
}
DONE_MARKER = "done.json"
DRIVER_CPU = 0.1  # a trial driver only waits on its TorchTrainer, whose workers hold the CPUs


def study_dir(study: StudyConfig) -> Path:
    if "://" in study.output_dir:
        raise ConfigError(
            f"output_dir: {study.output_dir!r} is object storage, which needs the shared-storage "
            "support of cluster/ (not built yet); use a local path"
        )
    return Path(study.study_dir).resolve()


def with_absolute_paths(study: StudyConfig) -> StudyConfig:
    """Tune runs each trial driver in its own working directory: pin local paths down first."""
    spec = study.model_dump(mode="json")
    for node, key in ((spec, "output_dir"), (spec["base"]["data"], "path")):
        if "://" not in node[key]:
            node[key] = str(Path(node[key]).resolve())
    for derived in ("name", "out_dir"):  # the study derives them again from output_dir
        spec["base"].pop(derived)
    return StudyConfig.model_validate(spec)


def prepare_data(study: StudyConfig) -> None:
    """Prepare the study's data once, if it asks for it and it is not there yet."""
    path = Path(study.base.data.path)
    if study.prepare is None or "://" in study.base.data.path or (path / "manifest.json").exists():
        return
    p = study.prepare
    prepare(
        p.sources,
        path,
        study.base.model.kind,
        vocab_size=p.vocab_size,
        val_fraction=p.val_fraction,
        text_column=p.text_column,
        split=p.split,
    )


def ensure_baseline(study: StudyConfig) -> Path:
    """Train (or reuse) the scratch baseline; returns its metrics.jsonl."""
    from apollo_ray import distributed

    cfg = baseline_config(study)
    # The key covers the config; the manifest's hash covers the data behind `data.path`, which
    # changes when it is prepared again (tokenizer training is not bit-reproducible).
    manifest = load_manifest(study.base.data.path).model_dump_json().encode()
    run_dir = cfg.output_dir.with_name(
        f"{cfg.output_dir.name}-{hashlib.sha256(manifest).hexdigest()[:8]}"
    )
    cfg = cfg.model_copy(update={"out_dir": str(run_dir)})
    if (run_dir / DONE_MARKER).exists():
        print(f"baseline: reusing {run_dir}", file=sys.stderr)
        return run_dir / "metrics.jsonl"
    print(f"baseline: training the scratch model in {run_dir}", file=sys.stderr)
    result = distributed.run(cfg)
    (run_dir / DONE_MARKER).write_text(json.dumps(result.metrics, indent=2) + "\n")
    return run_dir / "metrics.jsonl"


def score(run_metrics: Path, baseline_metrics: Path) -> dict[str, Any]:
    """A finished trial's final metrics against the baseline.

    `saving` is the FLOPs saving when the trial reaches the baseline's final loss; otherwise the
    compute-equivalent saving 1 - 1/speedup (negative: the trial needed more compute for its
    loss than the baseline did), so every trial has one comparable number to maximise."""
    curve = Curve.from_metrics(run_metrics, name="trial")
    acc = compare(curve, Curve.from_metrics(baseline_metrics, name="baseline"))
    saving = acc.flops_saving
    if saving is None:
        saving = 1 - 1 / acc.speedup if acc.speedup > 0 else -1.0
    return {
        "eval_loss": acc.method_final_loss,
        "flops": acc.method_flops,
        "saving": saving,
        "speedup": acc.speedup,
        "reached": acc.reached,
        **acc.to_metrics("acc_"),
    }


def trial_driver(config: dict[str, Any], study: dict[str, Any], baseline: str) -> None:
    """Tier 2, one per Tune trial: train the trial's schedule with Ray Train, then score it."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from apollo_ray import distributed

    spec = StudyConfig.model_validate(study)
    trial_id = tune.get_context().get_trial_id()
    out_dir = study_dir(spec) / "trials" / trial_id  # named from the trial id: retries resume
    cfg = materialize(spec.base, config, name=f"{spec.experiment}-{trial_id}", out_dir=str(out_dir))
    distributed.build_trainer(cfg, callbacks=[TuneReportCallback()], progress=False).fit()
    distributed.raise_if_diverged(cfg)
    tune.report(score(cfg.output_dir / "metrics.jsonl", Path(baseline)))


def _final_result_searcher():
    from ray.tune.search.optuna import OptunaSearch

    class FinalResultOptunaSearch(OptunaSearch):
        """Optuna sees a trial's objective only in its last report (it is computed after
        training, against the baseline); the Train reports before it do not carry it, and Ray's
        OptunaSearch would raise KeyError on them. No Optuna pruner is used (ASHA prunes)."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if isinstance(self.metric, str) and self.metric in result:
                super().on_trial_result(trial_id, result)

    return FinalResultOptunaSearch


def run_search(study: StudyConfig, baseline: Path, resume: bool = False):
    """Tier 1: the Tuner over Optuna's suggestions; returns Tune's `ResultGrid`."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # objective arrives in the last report
    root = study_dir(study) / "tune"
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_driver, study=study.model_dump(mode="json"), baseline=str(baseline)
        ),
        {"CPU": DRIVER_CPU},
    )
    if (root / "search").exists():
        if not resume:
            raise ConfigError(
                f"{root / 'search'} already holds this study: pass --resume to finish it (or "
                "see its results), or choose another `experiment` name"
            )
        return tune.Tuner.restore(
            str(root / "search"), trainable, resume_unfinished=True, resume_errored=False
        ).fit()
    metric, mode = OBJECTIVES[study.search.objective]
    FinalResultOptunaSearch = _final_result_searcher()
    s = study.search.sampler
    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=s.seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=s.seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=s.seed),
    }[s.kind]()
    searcher = FinalResultOptunaSearch(
        space=functools.partial(suggest, space=study.search.space),
        metric=metric,
        mode=mode,
        sampler=sampler,
    )
    scheduler = None
    if study.search.scheduler is not None:
        total = Curve.from_metrics(baseline).total_flops
        sch = study.search.scheduler
        scheduler = ASHAScheduler(
            time_attr="flops",
            metric="eval_loss",
            mode="min",
            max_t=total,
            grace_period=sch.grace_fraction * total,
            reduction_factor=sch.reduction_factor,
        )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=study.search.trials,
            max_concurrent_trials=study.search.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name="search", storage_path=str(root), failure_config=tune.FailureConfig(max_failures=0)
        ),
    )
    return tuner.fit()


def summarize(study: StudyConfig, grid) -> dict[str, Any]:
    """Print the trial table; write best.yaml and summary.json. Returns the summary."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        status = "ok" if "speedup" in m else "stopped early" if m else "no result"
        if result.error is not None:
            status = f"failed: {str(result.error).strip().splitlines()[-1][:120]}"
        params = {k: v for k, v in (result.config or {}).items() if k in study.search.space}
        rows.append(
            {
                "trial": m.get("trial_id") or Path(result.path).name,
                "status": status,
                "params": params,
                "eval_loss": m.get("eval_loss"),
                "saving": m.get("saving"),
                "flops_saving": m.get("acc_flops_saving"),
                "speedup": m.get("speedup"),
                "flops": m.get("flops"),
            }
        )
    done = [r for r in rows if r["status"] == "ok"]
    metric, mode = OBJECTIVES[study.search.objective]
    if isinstance(metric, list):
        best = pareto_front(done)
    else:
        best = sorted(done, key=lambda r: r[metric], reverse=mode == "max")[:1]
    out = study_dir(study)
    summary = {
        "experiment": study.experiment,
        "objective": study.search.objective,
        "trials": rows,
        "best": best,
    }
    if best:
        cfg = materialize(
            study.base,
            best[0]["params"],
            name=f"{study.experiment}-best",
            out_dir=str(Path("runs") / f"{study.experiment}-best"),
        )
        (out / "best.yaml").write_text(
            f"# Best schedule of study {study.experiment} (trial {best[0]['trial']}).\n"
            f"# Train it: python -m apollo_ray.train {out / 'best.yaml'}\n"
            + yaml.safe_dump(cfg.model_dump(mode="json", exclude={"out_dir"}), sort_keys=False)
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print_table(rows)
    return summary


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials not dominated in (eval loss, total FLOPs), both minimised."""

    def dominated(r):
        return any(
            o["eval_loss"] <= r["eval_loss"]
            and o["flops"] <= r["flops"]
            and (o["eval_loss"], o["flops"]) != (r["eval_loss"], r["flops"])
            for o in rows
        )

    return sorted((r for r in rows if not dominated(r)), key=lambda r: r["flops"])


def print_table(rows: list[dict[str, Any]]) -> None:
    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    header = ["trial", "eval loss", "FLOPs saving", "speedup", "status", "params"]
    lines = [
        [
            r["trial"],
            fmt(r["eval_loss"]),
            fmt(r["saving"]),
            fmt(r["speedup"]),
            r["status"],
            ", ".join(f"{k}={fmt(v)}" for k, v in r["params"].items()),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def check_resources(study: StudyConfig) -> None:
    """A trial that needs more than the whole cluster has would wait forever: refuse it."""
    import ray

    res, total = study.base.resources, ray.cluster_resources()
    need = {
        "CPU": res.workers * res.cpus_per_worker + DRIVER_CPU,
        "GPU": res.workers * res.gpus_per_worker,
    }
    for kind, amount in need.items():
        if amount > total.get(kind, 0):
            raise ConfigError(
                f"base.resources: a trial needs {amount:g} {kind} ({res.workers} workers and "
                f"its driver) but "
                f"the Ray cluster has {total.get(kind, 0):g}; lower base.resources.workers or "
                f"its per-worker {kind} (or add nodes)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apollo_ray.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help="study YAML (see search_spaces/)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted study without redoing finished trials (starts it if new)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)",
    )
    args = parser.parse_args(argv)
    try:
        study = with_absolute_paths(load_study(args.study))
        study_dir(study)  # a bad output_dir fails here, before Ray starts
        prepare_data(study)
        import ray

        if not ray.is_initialized():
            ray.init(address=args.address or os.environ.get("RAY_ADDRESS"))
        check_resources(study)
        baseline = ensure_baseline(study)
        summarize(study, run_search(study, baseline, args.resume))
    except (ConfigError, DataError, NonFiniteLossError) as e:  # the last: a diverged baseline
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"summary: {study_dir(study) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
