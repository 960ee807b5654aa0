"""The fixed cost of a trial: what a search pays per trial besides its training steps.

    python -m benchmarks.overhead                    # the demo's trials at 60, 180 and 300 steps
    python -m benchmarks.overhead --steps 60 180 --trials 2

Runs real searches (`apollo_ray.search.tuner.run_search`: Ray Tune, Optuna's random sampler, each
trial's MLflow run on a local `mlflow server` with the demo's checkpoint policy, its checkpoints
and its scoring) of the demo study (`search_spaces/small.yaml`) at several step budgets, once
per trial path, in this one run and on one local Ray:
- in-process: the default for one worker, the trial trains in its own process
  (apollo_ray.launch.solo);
- Ray Train: the same trials through a one-worker TorchTrainer (`resources.worker_group:
  always`, the path every trial of several workers takes).
A trial's wall time is Tune's `time_total_s`; the fixed cost is the intercept of a least-squares
line of wall time against step count (the slope is the cost of one step). Also per trial, from
each search's own wall clock: the search's time over its number of trials (this adds the start
of each trial's process and Tune's own bookkeeping). The scratch frontier each budget needs is
trained once, beforehand, and not counted. Then one in-process trial is run again phase by
phase, outside Tune, to say where its fixed cost goes (`breakdown`).
Writes benchmarks/results/overhead.json (`fixed_cost_s` per path).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import print_table, save

__all__ = ["breakdown", "fit_line", "main"]

PATHS = {"in-process": "auto", "Ray Train": "always"}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - slope * mx, slope


def study_file(out: Path, steps: int, path: str, trials: int) -> Path:
    """The demo study at `steps` steps, `trials` random trials, no confirmation, its trials on
    the given path; a YAML in `out`."""
    demo = yaml.safe_load(Path("search_spaces/small.yaml").read_text())
    demo["experiment"] = f"overhead-{PATHS[path]}-{steps}"
    demo["output_dir"] = str(out / "outputs")
    demo["frontier"] = [0.5, 1.0]
    demo["base"]["train"]["steps"] = steps
    demo["base"]["resources"]["worker_group"] = PATHS[path]
    demo["base"]["data"]["path"] = str(Path(demo["base"]["data"]["path"]).absolute())
    demo["search"].update(trials=trials, sampler={"kind": "random", "seed": 0}, confirm=None)
    file = out / f"{demo['experiment']}.yaml"
    file.write_text(yaml.safe_dump(demo))
    return file


def breakdown(study, scratch, record) -> dict[str, float]:
    """Where the fixed cost of an in-process trial goes: one trial of `study` (the base
    schedule) run here phase by phase as its driver runs it, each phase timed, the trainer's
    own phases timed by wrapping its methods; plus starting a fresh Python that imports what a
    trial's process imports (Tune's actor start is on top of that)."""
    import subprocess
    import sys

    from apollo_ray.launch import solo
    from apollo_ray.records.results import log_run_results
    from apollo_ray.records.tracking import tracked_run
    from apollo_ray.search.tuner import score
    from apollo_ray.study.space import materialize
    from apollo_ray.training.trainer import Trainer
    from apollo_ray.yardstick.acceleration import Curve

    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import apollo_ray.search.tuner, apollo_ray.launch.solo, apollo_ray.training.trainer",
        ],
        check=True,
    )
    phases["fresh Python importing a trial's modules"] = time.perf_counter() - t0

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    originals = {k: getattr(Trainer, k) for k in ("__init__", "evaluate", "final_evaluation")}
    originals["save_checkpoint"] = Trainer.save_checkpoint
    Trainer.__init__ = timed("trainer setup (data, model, resume check)", Trainer.__init__)
    Trainer.evaluate = timed("evaluations during training", Trainer.evaluate)
    Trainer.final_evaluation = timed("final evaluation (whole split)", Trainer.final_evaluation)
    Trainer.save_checkpoint = timed("checkpoints (+ MLflow uploads)", Trainer.save_checkpoint)
    try:
        out = Path(study.study_dir) / "breakdown"
        cfg = materialize(study.base, {}, name=f"{study.experiment}-breakdown", out_dir=str(out))
        start = time.perf_counter()
        run = tracked_run(study, record, cfg, "trial", {}, "breakdown")
        target = run.__enter__()
        phases["MLflow run start + params"] = time.perf_counter() - start
        start = time.perf_counter()
        solo.train(cfg, study.storage(study.experiment, "trials"), tracking=target)
        training = time.perf_counter() - start
        metrics = cfg.output_dir / "metrics.jsonl"
        start = time.perf_counter()
        scores = score(metrics, scratch)
        full = Curve.from_metrics(scratch.full, name="scratch 1x")
        phases["scoring"] = time.perf_counter() - start
        start = time.perf_counter()
        client = record.client()
        log_run_results(client, target.run_id, cfg, metrics, scratch.frontier(), scores, full)
        phases["MLflow results (totals, plots)"] = time.perf_counter() - start
        start = time.perf_counter()
        run.__exit__(None, None, None)
        phases["MLflow run end (flush)"] = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(Trainer, name, fn)
    phases["training steps"] = scores["wall"]
    trainer_phases = ("trainer", "eval", "final", "check")
    inside = sum(v for k, v in phases.items() if k.startswith(trainer_phases))
    phases["rest of the run (mirror, logging)"] = training - inside - scores["wall"]
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[60, 180, 300])
    parser.add_argument("--trials", type=int, default=2, help="trials per search")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray

    from apollo_ray.records.mlflow_server import LocalServer
    from apollo_ray.records.tracking import study_run
    from apollo_ray.search.baseline import ensure_frontier
    from apollo_ray.search.tuner import run_search
    from apollo_ray.study.schema import load_study
    from apollo_ray.tune import prepare_data

    out = Path(tempfile.mkdtemp(prefix="apollo-overhead-"))
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    trials: list[dict[str, object]] = []
    searches: list[dict[str, object]] = []
    with LocalServer(out / "mlflow") as server:
        for steps in args.steps:
            scratch = None
            for path in PATHS:
                file = study_file(out, steps, path, args.trials)
                study = load_study(file)
                prepare_data(study)
                scratch = scratch or ensure_frontier(study)
                with study_run(study, str(file), server.uri, resume=False) as record:
                    t0 = time.perf_counter()
                    grid = run_search(study, scratch, record)
                    wall = time.perf_counter() - t0
                for result in grid:
                    if result.error is not None:
                        raise RuntimeError(f"{path} trial at {steps} steps failed: {result.error}")
                    trials.append(
                        {
                            "path": path,
                            "steps": steps,
                            "trial s": result.metrics["time_total_s"],
                            "train s": result.metrics["wall"],
                        }
                    )
                searches.append({"path": path, "steps": steps, "per trial s": wall / len(grid)})
                print(f"{path}, {steps} steps: {wall:.1f} s for {len(grid)} trials", flush=True)
        study = load_study(study_file(out, args.steps[0], "in-process", args.trials))
        with study_run(study, "search_spaces/small.yaml", server.uri, resume=True) as record:
            phases = breakdown(study, ensure_frontier(study), record)
    ray.shutdown()

    rows = []
    fixed_cost_s = {}
    for path in PATHS:
        mine = [t for t in trials if t["path"] == path]
        intercept, slope = fit_line([t["steps"] for t in mine], [t["trial s"] for t in mine])
        searched = [s for s in searches if s["path"] == path]
        wall_intercept, _ = fit_line(
            [s["steps"] for s in searched], [s["per trial s"] for s in searched]
        )
        not_training = [t["trial s"] - t["train s"] for t in mine]
        fixed_cost_s[path] = intercept
        rows.append(
            {
                "path": path,
                "fixed cost s (Tune)": intercept,
                "s per step": slope,
                "fixed cost s (search wall / trials)": wall_intercept,
                "median s not in train steps": statistics.median(not_training),
            }
        )
    print_table(rows, list(rows[0]))
    print(f"\nan in-process trial of {args.steps[0]} steps, phase by phase (seconds):")
    print_table([{"phase": k, "s": v} for k, v in phases.items()], ["phase", "s"])
    path = save(
        "overhead",
        {
            "args": vars(args),
            "fixed_cost_s": fixed_cost_s,
            "rows": rows,
            "in_process_trial_phases_s": phases,
            "trials": trials,
            "searches": searches,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
