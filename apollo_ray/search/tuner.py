"""The schedule search, as Ray's three tiers side by side (Ray's train_tune_interop pattern).

1. `run_search` builds the `Tuner`: Optuna proposes each trial's schedule through Tune's
   `OptunaSearch` (define-by-run over the study's space, seeded); optional ASHA compares trials
   at equal cumulative FLOPs (`time_attr="flops"`), since Apollo trials are cheap early by design.
2. `trial_driver` is the Tune function trainable of one trial: it materialises the trial's
   `RunConfig`, trains it and scores the run against the scratch frontier (`score`). A trial of
   one worker trains in its own process (`apollo_ray.launch.solo`: no worker group to start, and
   Tune retries it `resources.max_failures` times, resuming from its newest checkpoint); a trial of
   several runs a TorchTrainer, which restarts its own workers.
3. `apollo_ray.launch.distributed.train_worker` runs on every Ray Train worker.

A trial whose loss goes NaN/inf ends at once, `diverged` with its reason (not retried: it
would diverge again; Optuna counts it as pruned, below every scored trial); one whose workers
crash for good is marked failed with its reason. The study goes on either way. A Ctrl-C
stops it: Tune saves the search's state and returns, and `run_search` / `run_confirm` raise
`KeyboardInterrupt` rather than hand on an unfinished grid (`--resume` finishes it). MLflow
records are kept by `apollo_ray.records.tracking` and `apollo_ray.records.results`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from apollo_ray.launch import distributed, solo
from apollo_ray.records.results import log_run_results
from apollo_ray.records.tracking import CONFIRM_OF, StudyRecord, tracked_run, trial_runs_callback
from apollo_ray.search.progress import TrialProgress
from apollo_ray.storage import join_uri
from apollo_ray.study.schema import OBJECTIVES, StudyConfig
from apollo_ray.study.space import materialize, suggest
from apollo_ray.training.runlog import DIVERGED_KEY, METRICS, NonFiniteLossError, last_eval
from apollo_ray.yardstick.acceleration import Curve, compare
from apollo_ray.yardstick.scratch import Scratch

__all__ = [
    "DRIVER_CPU",
    "PAPER_FIELDS",
    "confirm_driver",
    "confirm_runs",
    "progress_callback",
    "run_confirm",
    "run_search",
    "score",
    "trial_driver",
    "trial_resources",
]

DRIVER_CPU = 0.1  # a trial driver only waits on its TorchTrainer, whose workers hold the CPUs
# the paper's metric (`acceleration.compare` against the scratch run of the trials' budget)
PAPER_FIELDS = (
    "reached",
    "target_loss",
    "flops_to_target",
    "flops_saving",
    "acceleration",
    "wall_saving",
    "wall_acceleration",
    "final_loss_gap",
)


class FinalResultOptunaSearch(OptunaSearch):
    """Optuna sees a trial's objective only in its last report (it is computed after training,
    against the baseline); the Train reports before it do not carry it, and Ray's OptunaSearch
    would raise KeyError on them. No Optuna pruner is used (ASHA prunes)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric in result:
            super().on_trial_result(trial_id, result)


def run_search(
    study: StudyConfig,
    scratch: Scratch,
    record: StudyRecord | None = None,
    faults: dict[str, int | None] | None = None,
    live: bool | None = None,
):
    """Tier 1: the Tuner over Optuna's suggestions; returns Tune's `ResultGrid`. A study whose
    search state exists is resumed (the command line has checked that it may be). `faults`
    (`kill_at_step`, `kill_after_checkpoint`) kills each trial's training once, for chaos
    testing. The driver prints one line per running trial (`apollo_ray.search.progress`; `live`:
    redraw them in place, default when stdout is a terminal)."""
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # objective arrives in the last report
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the output that verbose=0 silences
    trainable = _with_resources(
        study,
        tune.with_parameters(
            trial_driver,
            study=study.model_dump(mode="json"),
            scratch=scratch,
            record=record,
            faults=faults,
        ),
    )
    search = study.search_state("search")
    progress = progress_callback(study, "search", live=live)
    if tune.Tuner.can_restore(search):
        tuner = tune.Tuner.restore(search, trainable, resume_unfinished=True, resume_errored=False)
        return _ended(_quiet(tuner, progress).fit(), study.search.trials)
    metric, mode = OBJECTIVES[study.search.objective]
    searcher = FinalResultOptunaSearch(
        space=functools.partial(suggest, space=study.search.space, base=study.base),
        metric=metric,
        mode=mode,
        sampler=_sampler(study),
    )
    concurrent = study.search.max_concurrent_trials
    if concurrent > 1 and study.search.synchronous:  # batches: each suggested on the same history
        searcher, concurrent = ConcurrencyLimiter(searcher, concurrent, batch=True), None
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=_scheduler(study, scratch),
            num_samples=study.search.trials,
            max_concurrent_trials=concurrent,
            reuse_actors=True,  # a finished trial's process takes the next: no start, no imports
            **_names(functools.partial(_numbered, width=len(str(study.search.trials)))),
        ),
        run_config=_run_config(study, "search", record, progress),
    )
    return _ended(tuner.fit(), study.search.trials)


def run_confirm(
    study: StudyConfig,
    scratch: Scratch,
    runs: list[dict[str, Any]],
    record: StudyRecord | None,
    live: bool | None = None,
    name: str = "confirm",
):
    """The confirmation runs (`search.confirm`, listed by `confirm_runs`) as Tune trials of
    their own; returns Tune's `ResultGrid`, each result's config naming its run by index. The
    transfer's runs (`apollo_ray.search.transfer`) are such re-runs too, as Tune experiment
    `name`: each run's trial is the schedule it carries."""
    trainable = _with_resources(
        study,
        tune.with_parameters(
            confirm_driver,
            runs=runs,
            study=study.model_dump(mode="json"),
            scratch=scratch,
            record=record,
            kind=name,
        ),
    )
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    path = study.search_state(name)
    progress = progress_callback(study, name, runs, live)
    if tune.Tuner.can_restore(path):
        tuner = _quiet(tune.Tuner.restore(path, trainable, resume_unfinished=True), progress)
        return _ended(tuner.fit(), len(runs))
    tuner = tune.Tuner(
        trainable,
        param_space={"run": tune.grid_search(list(range(len(runs))))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=study.search.max_concurrent_trials,
            reuse_actors=True,
            **_names(functools.partial(_rerun, runs=runs)),
        ),
        run_config=_run_config(study, name, record, progress),
    )
    return _ended(tuner.fit(), len(runs))


def _names(name) -> dict[str, Any]:
    """Tune's trial ids are random: two clones of a study would name the same trials apart.
    A trial is named (its runs, folders and lines) by `name` instead, from what it is."""
    return {"trial_name_creator": name, "trial_dirname_creator": name}


def _numbered(trial, width: int) -> str:
    """A search trial's name: its place in the order the sampler suggested the trials."""
    return f"trial{int(trial.experiment_tag.split('_', 1)[0]):0{width}d}"


def _rerun(trial, runs: list[dict[str, Any]]) -> str:
    """A confirmation run's name: the trial it re-runs and its seed."""
    run = runs[trial.config["run"]]
    return f"{run['trial']}-seed{run['seed']}"


def _ended(grid: tune.ResultGrid, trials: int) -> tune.ResultGrid:
    """`grid` once all its `trials` have ended (finished, stopped or errored). Tune catches a
    Ctrl-C itself: it stops the trials, saves the search's state and returns what it has, which
    must not be summarised, confirmed or registered as if the search were over."""
    if len(grid) < trials or grid.num_terminated + grid.num_errors < len(grid):
        raise KeyboardInterrupt("interrupted; the search's state is saved")
    return grid


def confirm_runs(study: StudyConfig, best: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the confirmation runs: {trial, params, seed} for each best trial and fresh seed."""
    assert study.search.confirm is not None
    seeds = study.fresh_seeds(study.search.confirm.seeds)
    return [{"trial": r["trial"], "params": r["params"], "seed": s} for r in best for s in seeds]


def trial_resources(study: StudyConfig) -> dict[str, float]:
    """What one trial reserves: a one-worker trial trains in its own process and holds the
    worker's resources; a trial of several workers holds a sliver of the head node for its
    driver (its Train controller runs beside it, and a GPU node that goes away, e.g. a spot
    reclaim, must take only workers with it), and its TorchTrainer reserves the workers."""
    if solo.applies(study.base):
        return study.base.resources.per_worker
    return {"CPU": DRIVER_CPU, distributed.HEAD_NODE: 0.001}


def _with_resources(study: StudyConfig, trainable):
    return tune.with_resources(trainable, trial_resources(study))


def _run_config(
    study: StudyConfig, name: str, record: StudyRecord | None, progress: TrialProgress
) -> tune.RunConfig:
    # Tune retries a trial that trains in its own process; a TorchTrainer retries its workers
    retries = study.base.resources.max_failures if solo.applies(study.base) else 0
    return tune.RunConfig(
        name=name,
        storage_path=study.search_state(),
        failure_config=tune.FailureConfig(max_failures=retries),
        callbacks=[*([trial_runs_callback(study)] if record else []), progress],
        verbose=0,  # no status tables: `progress` prints a line per trial
    )


def progress_callback(
    study: StudyConfig,
    name: str,
    runs: list[dict[str, Any]] | None = None,
    live: bool | None = None,
) -> TrialProgress:
    """The driver's lines of the trials of Tune experiment `name` (`search` or `confirm`, whose
    `runs` say what each trial re-runs)."""
    schedule = study.base.schedule
    return TrialProgress(
        study.base.train.steps,
        stages=len(schedule.depths) if schedule else None,
        kind="trial" if name == "search" else "re-run",
        runs=runs,
        storage=study.search_state(name),
        run_root=join_uri(study.study_dir, "trials"),
        live=live,
    )


def _quiet(tuner: tune.Tuner, progress: TrialProgress) -> tune.Tuner:
    """A restored Tuner runs with the RunConfig pickled when its study started (callbacks and
    verbosity included): give it this run's progress lines and no status tables (a study begun
    before they existed too). Private to Ray (`Tuner._local_tuner`; None under Ray Client, which
    keeps the pickled settings)."""
    internal = getattr(tuner, "_local_tuner", None)
    if internal is not None:
        config = internal.get_run_config()
        kept = [c for c in config.callbacks or [] if not isinstance(c, TrialProgress)]
        config.callbacks, config.verbose = [*kept, progress], 0
    return tuner


def _sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    s = study.search.sampler
    kinds = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
    }
    return kinds[s.kind](seed=s.seed)


def _scheduler(study: StudyConfig, scratch: Scratch) -> ASHAScheduler | None:
    """ASHA on cumulative FLOPs, its grace period a fraction of the FLOPs of scratch at the
    trials' budget."""
    sch = study.search.scheduler
    if sch is None:
        return None
    total = Curve.from_metrics(scratch.full).total_flops
    return ASHAScheduler(
        time_attr="flops",
        metric="eval_loss",
        mode="min",
        max_t=total,
        grace_period=sch.grace_fraction * total,
        reduction_factor=sch.reduction_factor,
    )


def trial_driver(
    config: dict[str, Any],
    study: dict[str, Any],
    scratch: Scratch,
    record: StudyRecord | None = None,
    faults: dict[str, int | None] | None = None,
) -> None:
    """Tier 2, one per Tune trial: train the trial's schedule, then score it."""
    spec = StudyConfig.model_validate(study)  # the study's one validation in this process
    _train_and_score(spec, config, config, "trial", scratch, record, faults=faults)


def confirm_driver(
    config: dict[str, Any],
    runs: list[dict[str, Any]],
    study: dict[str, Any],
    scratch: Scratch,
    record: StudyRecord | None = None,
    kind: str = "confirm",
) -> None:
    """Tier 2 of a confirmation run (`kind`; or a transfer's run): a best trial's schedule
    with a fresh seed."""
    spec = StudyConfig.model_validate(study)
    run = runs[config["run"]]
    params = {**run["params"], "seed": run["seed"]}
    tags = {CONFIRM_OF: run["trial"]}
    _train_and_score(spec, params, params, kind, scratch, record, tags)


def _train_and_score(
    study: StudyConfig,
    params: dict[str, Any],
    searched: dict[str, Any],
    kind: str,
    scratch: Scratch,
    record: StudyRecord | None,
    tags: dict[str, str] | None = None,
    faults: dict[str, int | None] | None = None,
) -> None:
    trial = tune.get_context().get_trial_name()  # `_names`: retries resume from its folder
    out_dir = Path(study.study_dir) / "trials" / trial
    cfg = materialize(study.base, params, name=f"{study.experiment}-{trial}", out_dir=str(out_dir))
    storage = study.storage(study.experiment, "trials")
    folder = join_uri(storage, out_dir.name)  # where its checkpoints go
    try:
        with tracked_run(study, record, cfg, kind, searched, trial, tags, folder) as target:
            if solo.applies(cfg):
                solo.train(cfg, storage, tracking=target, faults=faults, report=tune.report)
            else:
                distributed.build_trainer(
                    cfg,
                    storage_path=storage,
                    callbacks=[TuneReportCallback()],
                    faults=faults,
                    progress=False,
                    tracking=target,
                ).fit()
            distributed.check_finished(cfg)
            metrics = cfg.output_dir / METRICS
            scores = score(metrics, scratch)
            if target is not None:
                full = Curve.from_metrics(scratch.full, name="scratch 1x")
                client = record.client()
                log_run_results(
                    client, target.run_id, cfg, metrics, scratch.frontier(), scores, full
                )
            tune.report(scores)
    except NonFiniteLossError as e:
        # the trial ends here, not as an error: Tune would retry it and every retry would
        # diverge again at the same step. Optuna records it as pruned (below every scored one)
        tune.report({DIVERGED_KEY: str(e)})


def score(run_metrics: Path, scratch: Scratch) -> dict[str, Any]:
    """A finished trial read against the scratch frontier (`apollo_ray.yardstick.frontier`).

    `speedup` = the FLOPs scratch needs for the trial's final loss / the trial's FLOPs,
    `saving` = 1 - 1/speedup, the same in seconds (`wall_*`); `bound` says whether they are
    exact (None) or bounds ("lower": the trial ends below the largest scratch run's loss,
    "upper": above the smallest's). `paper_*` is the Apollo paper's metric against the scratch
    run of the trial's own budget: where the trial first reaches its final loss. All of these
    read validation (what the search and the confirmation select by); `test_*` read the test
    split, when the data has one: what a person reads."""
    curve = Curve.from_metrics(run_metrics, name="trial")
    reading = scratch.frontier().read(curve.final_loss, curve.total_flops, curve.total_wall)
    paper = compare(curve, Curve.from_metrics(scratch.full, name="scratch"))
    last = last_eval(run_metrics)
    test, on_test = scratch.frontier("test_loss"), {}
    if test is not None and last.get("test_loss") is not None:
        read = test.read(last["test_loss"], curve.total_flops, curve.total_wall)
        on_test = {
            "test_loss": last["test_loss"],
            "test_speedup": read.speedup,
            "test_saving": read.saving,
            "test_bound": read.bound,
        }
    return {
        "eval_loss": curve.final_loss,
        "eval_loss_se": last.get("eval_loss_se"),
        "flops": curve.total_flops,
        "wall": curve.total_wall,
        "speedup": reading.speedup,
        "saving": reading.saving,
        "wall_speedup": reading.wall_speedup,
        "wall_saving": reading.wall_saving,
        "bound": reading.bound,
        **{f"paper_{k}": getattr(paper, k) for k in PAPER_FIELDS},
        **on_test,
    }
