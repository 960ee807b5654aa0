"""The schedule search, as Ray's three tiers side by side (Ray's train_tune_interop pattern).

1. `run_search` builds the `Tuner`: Optuna proposes each trial's schedule through Tune's
   `OptunaSearch` (define-by-run over the study's space, seeded); optional ASHA compares trials
   at equal cumulative FLOPs (`time_attr="flops"`), since Apollo trials are cheap early by design.
2. `trial_driver` is the Tune function trainable of one trial: it materialises the trial's
   `RunConfig`, runs its TorchTrainer and scores the run against the scratch baseline (`score`).
3. `apollo_ray.distributed.train_worker` runs on every Ray Train worker.

A trial whose loss goes NaN/inf or whose workers crash is marked failed with its reason; the
study goes on. MLflow records are kept by `apollo_ray.tracking` and `apollo_ray.results`.
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
from ray.tune.search.optuna import OptunaSearch

from apollo_ray import distributed
from apollo_ray.acceleration import Curve, compare
from apollo_ray.results import log_run_results
from apollo_ray.runlog import METRICS
from apollo_ray.space import materialize, suggest
from apollo_ray.study import OBJECTIVES, StudyConfig
from apollo_ray.tracking import StudyRecord, tracked_run, trial_runs_callback

__all__ = ["DRIVER_CPU", "run_search", "score", "trial_driver"]

DRIVER_CPU = 0.1  # a trial driver only waits on its TorchTrainer, whose workers hold the CPUs


class FinalResultOptunaSearch(OptunaSearch):
    """Optuna sees a trial's objective only in its last report (it is computed after training,
    against the baseline); the Train reports before it do not carry it, and Ray's OptunaSearch
    would raise KeyError on them. No Optuna pruner is used (ASHA prunes)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric in result:
            super().on_trial_result(trial_id, result)


def run_search(study: StudyConfig, baseline: Path, record: StudyRecord | None = None):
    """Tier 1: the Tuner over Optuna's suggestions; returns Tune's `ResultGrid`. A study whose
    search state exists is resumed (the command line has checked that it may be)."""
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # objective arrives in the last report
    search = study.storage(study.experiment, "tune", "search")
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_driver,
            study=study.model_dump(mode="json"),
            baseline=str(baseline),
            record=record,
        ),
        # on the head node: a trial's Train controller runs beside its driver, and a GPU node
        # that goes away (spot reclaim, failure) must take only workers with it
        {"CPU": DRIVER_CPU, distributed.HEAD_NODE: 0.001},
    )
    if tune.Tuner.can_restore(search):
        return tune.Tuner.restore(
            search, trainable, resume_unfinished=True, resume_errored=False
        ).fit()
    metric, mode = OBJECTIVES[study.search.objective]
    searcher = FinalResultOptunaSearch(
        space=functools.partial(suggest, space=study.search.space, base=study.base),
        metric=metric,
        mode=mode,
        sampler=_sampler(study),
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=_scheduler(study, baseline),
            num_samples=study.search.trials,
            max_concurrent_trials=study.search.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name="search",
            storage_path=study.storage(study.experiment, "tune"),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[trial_runs_callback(study, record)] if record else [],
        ),
    )
    return tuner.fit()


def _sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    s = study.search.sampler
    kinds = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
    }
    return kinds[s.kind](seed=s.seed)


def _scheduler(study: StudyConfig, baseline: Path) -> ASHAScheduler | None:
    """ASHA on cumulative FLOPs, its grace period a fraction of the baseline's total."""
    sch = study.search.scheduler
    if sch is None:
        return None
    total = Curve.from_metrics(baseline).total_flops
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
    baseline: str,
    record: StudyRecord | None = None,
) -> None:
    """Tier 2, one per Tune trial: train the trial's schedule with Ray Train, then score it."""
    spec = StudyConfig.model_validate(study)  # the study's one validation in this process
    trial_id = tune.get_context().get_trial_id()
    out_dir = Path(spec.study_dir) / "trials" / trial_id  # named from the trial id: retries resume
    cfg = materialize(spec.base, config, name=f"{spec.experiment}-{trial_id}", out_dir=str(out_dir))
    with tracked_run(spec, record, cfg, "trial", config, trial_id) as target:
        trainer = distributed.build_trainer(
            cfg,
            storage_path=spec.storage(spec.experiment, "trials"),
            callbacks=[TuneReportCallback()],
            progress=False,
            tracking=target,
        )
        trainer.fit()
        distributed.check_finished(cfg)
        metrics = cfg.output_dir / METRICS
        scores = score(metrics, Path(baseline))
        if target is not None:
            log_run_results(record.client(), target.run_id, cfg, metrics, Path(baseline), scores)
        tune.report(scores)


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
