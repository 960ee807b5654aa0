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
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from apollo_ray import tracking as tracking_mod
from apollo_ray.acceleration import Curve, compare, plot_loss_vs_flops
from apollo_ray.config import ConfigError, RunConfig
from apollo_ray.data import DataError, load_manifest, prepare
from apollo_ray.data.shards import join_uri
from apollo_ray.study import (
    BASELINES,
    StudyConfig,
    baseline_config,
    flatten,
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
TRACKING_SESSION = "mlflow-session.json"  # where this study logs now (see _trial_runs_callback)
DRIVER_CPU = 0.1  # a trial driver only waits on its TorchTrainer, whose workers hold the CPUs


def study_dir(study: StudyConfig) -> Path:
    return Path(study.study_dir).resolve()


def with_absolute_paths(study: StudyConfig) -> StudyConfig:
    """Tune runs each trial driver in its own working directory: pin local paths down first."""
    spec = study.model_dump(mode="json")
    for node, key in ((spec, "output_dir"), (spec, "storage_path"), (spec["base"]["data"], "path")):
        if node[key] is not None and "://" not in node[key]:
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


def ensure_baseline(study: StudyConfig, tracking: dict[str, str] | None = None) -> Path:
    """Train (or reuse) the scratch baseline; returns its metrics.jsonl. With `tracking`, the
    baseline is a child run of the study in MLflow (a reused one is uploaded from its files)."""
    from apollo_ray import distributed

    cfg = baseline_config(study)
    # The key covers the config; the manifest's hash covers the data behind `data.path`, which
    # changes when it is prepared again (tokenizer training is not bit-reproducible).
    manifest = load_manifest(study.base.data.path).model_dump_json().encode()
    run_dir = cfg.output_dir.with_name(
        f"{cfg.output_dir.name}-{hashlib.sha256(manifest).hexdigest()[:8]}"
    )
    cfg = cfg.model_copy(update={"out_dir": str(run_dir)})
    metrics = run_dir / "metrics.jsonl"
    cached = (run_dir / DONE_MARKER).exists()
    with tracked_run(study, tracking, cfg, "baseline", {}) as target:
        if cached:
            print(f"baseline: reusing {run_dir}", file=sys.stderr)
            if target is not None:  # its rows and (policy permitting) its final checkpoint
                mirror = tracking_mod.RunMirror(target, run_dir, cfg.train.steps)
                final = f"step-{cfg.train.steps:07d}"
                location = join_uri(
                    study.storage(BASELINES), run_dir.name, final, distributed.CHECKPOINT_FILE
                )
                mirror.checkpoint(final, location, _last_row(metrics))
                mirror.flush()
                _client(tracking).set_tag(target.run_id, "apollo.cached", str(run_dir))
        else:
            print(f"baseline: training the scratch model in {run_dir}", file=sys.stderr)
            result = distributed.run(cfg, tracking=target, storage_path=study.storage(BASELINES))
            (run_dir / DONE_MARKER).write_text(json.dumps(result.metrics, indent=2) + "\n")
        if target is not None:
            log_run_results(_client(tracking), target.run_id, cfg, metrics, metrics, None)
    return metrics


def _last_row(metrics: Path) -> dict[str, Any]:
    return json.loads(metrics.read_text().splitlines()[-1])


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


def trial_driver(
    config: dict[str, Any],
    study: dict[str, Any],
    baseline: str,
    tracking: dict[str, str] | None = None,
) -> None:
    """Tier 2, one per Tune trial: train the trial's schedule with Ray Train, then score it."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from apollo_ray import distributed

    spec = StudyConfig.model_validate(study)
    trial_id = tune.get_context().get_trial_id()
    out_dir = study_dir(spec) / "trials" / trial_id  # named from the trial id: retries resume
    cfg = materialize(spec.base, config, name=f"{spec.experiment}-{trial_id}", out_dir=str(out_dir))
    with tracked_run(spec, tracking, cfg, "trial", config, trial_id) as target:
        trainer = distributed.build_trainer(
            cfg,
            storage_path=spec.storage(spec.experiment, "trials"),
            callbacks=[TuneReportCallback()],
            progress=False,
            tracking=target,
        )
        trainer.fit()
        distributed.check_finished(cfg)
        scores = score(cfg.output_dir / "metrics.jsonl", Path(baseline))
        if target is not None:
            log_run_results(
                _client(tracking),
                target.run_id,
                cfg,
                cfg.output_dir / "metrics.jsonl",
                Path(baseline),
                scores,
            )
        tune.report(scores)


@contextmanager
def tracked_run(
    study: StudyConfig,
    tracking: dict[str, str] | None,
    cfg: RunConfig,
    kind: str,
    searched: dict[str, Any],
    trial_id: str | None = None,
) -> Iterator[tracking_mod.Target | None]:
    """The MLflow child run of a trial or the baseline, RUNNING while the block runs and then
    FINISHED, FAILED (with the reason as tag `apollo.end`) or KILLED, whatever happens; rows
    and checkpoints that rank 0 could not upload are sent on the way out."""
    if tracking is None:
        yield None
        return
    client = _client(tracking)
    tags = {tracking_mod.KIND: kind, tracking_mod.STUDY: study.experiment}
    if trial_id is not None:
        tags[tracking_mod.TRIAL] = trial_id
    run_id = tracking_mod.start_run(
        client, tracking["experiment_id"], cfg.name, tags, tracking["parent_id"]
    )
    tracking_mod.log_params(client, run_id, flatten(cfg), searched)
    target = tracking_mod.Target(tracking["uri"], run_id, study.tracking.checkpoints)
    error: BaseException | None = None
    try:
        yield target
    except BaseException as e:
        error = e
        raise
    finally:
        try:
            mirror = tracking_mod.RunMirror(target, cfg.output_dir, cfg.train.steps, patient=True)
            mirror.flush()  # whatever rank 0 could not send (e.g. from a node without access)
            if error is not None:
                client.set_tag(run_id, "apollo.end", _reason(error))
            client.set_terminated(run_id, tracking_mod.end_status(error))
        except Exception as e:  # MLflow gone: the study's end closes it (close_leftovers)
            print(f"mlflow: could not end run {run_id}: {e}", file=sys.stderr)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[-1] if text else type(error).__name__)[:500]


def _client(tracking: dict[str, str]):
    from mlflow import MlflowClient

    return MlflowClient(tracking["uri"])


def log_run_results(
    client,
    run_id: str,
    cfg: RunConfig,
    metrics: Path,
    baseline: Path,
    scores: dict[str, Any] | None,
) -> None:
    """A finished run's totals and acceleration metrics, its loss-vs-FLOPs plot against the
    baseline and (Apollo runs) its depth histogram per stage, into its MLflow run. An MLflow
    failure here is reported, not raised: the run's scores must still reach Tune and Optuna."""
    from mlflow.entities import Metric

    from apollo_ray.plots import depth_histogram

    curve = Curve.from_metrics(metrics, name=cfg.name)
    base = Curve.from_metrics(baseline, name="scratch")
    totals = {
        "final_eval_loss": curve.final_loss,
        "total_flops": curve.total_flops,
        "total_wall_time": curve.total_wall,
    }
    if scores is not None:
        totals |= {"saving": scores["saving"], "speedup": scores["speedup"]}
        totals |= {k: v for k, v in scores.items() if k.startswith("acc_")}
    now, step = int(time.time() * 1000), cfg.train.steps
    try:
        client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, step) for k, v in totals.items()]
        )
        with tempfile.TemporaryDirectory() as tmp:
            curves = [] if scores is None else [curve]
            plot_loss_vs_flops(curves, base, Path(tmp) / "loss_vs_flops.png", title=cfg.name)
            if cfg.schedule is not None:
                depth_histogram(cfg, Path(tmp) / "depth_histogram.png")
            client.log_artifacts(run_id, tmp, "plots")
            client.log_artifact(run_id, str(cfg.output_dir / "config.json"))
    except Exception as e:
        print(f"mlflow: results of run {run_id} not logged: {e}", file=sys.stderr)


def _trial_runs_callback(study: StudyConfig, tracking: dict[str, str]):
    """A Tune callback in the study driver that ends the MLflow run of a trial that ended
    without ending it itself: stopped by ASHA (KILLED) or killed with its driver (FAILED).
    Tune pickles callbacks with the search, and a resumed study's local MLflow server listens
    on a new port, so the callback reads the current tracking settings from the study folder."""
    from ray import tune

    session = study_dir(study) / TRACKING_SESSION
    session.parent.mkdir(parents=True, exist_ok=True)
    session.write_text(json.dumps(tracking))

    class TrialRunsCallback(tune.Callback):
        def __init__(self, session: Path) -> None:
            self.session = session

        def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
            self._close(trial, "KILLED", "stopped early by the scheduler")

        def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
            self._close(trial, "FAILED", "the trial's driver failed")

        def _close(self, trial, status: str, reason: str) -> None:
            # Tune does not catch a callback's exception: MLflow being down must not end the
            # study (its end closes what is left), nor block Tune's loop in HTTP retries
            try:
                with tracking_mod.quick_failure(patient=False):
                    self._close_run(trial, status, reason)
            except Exception as e:
                print(f"mlflow: trial {trial.trial_id} not closed: {e}", file=sys.stderr)

        def _close_run(self, trial, status: str, reason: str) -> None:
            tracking = json.loads(self.session.read_text())
            client = _client(tracking)
            run = tracking_mod.find_run(
                client, tracking["experiment_id"], **{tracking_mod.TRIAL: trial.trial_id}
            )
            if run is None or run.info.status != "RUNNING":
                return
            tracking_mod.sync(self.session.parent / "trials" / trial.trial_id, tracking["uri"])
            client.set_tag(run.info.run_id, "apollo.end", reason)
            client.set_terminated(run.info.run_id, status)

    return TrialRunsCallback(session)


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


def run_search(study: StudyConfig, baseline: Path, tracking: dict[str, str] | None = None):
    """Tier 1: the Tuner over Optuna's suggestions; returns Tune's `ResultGrid`. A study whose
    search state exists is resumed (`check_new_or_resumed` has let it through)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from apollo_ray import distributed

    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # objective arrives in the last report
    search = study.storage(study.experiment, "tune", "search")
    callbacks = [_trial_runs_callback(study, tracking)] if tracking else []
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_driver,
            study=study.model_dump(mode="json"),
            baseline=str(baseline),
            tracking=tracking,
        ),
        # on the head node: a trial's Train controller runs beside its driver, and a GPU node
        # that goes away (spot reclaim, failure) must take only workers with it
        {"CPU": DRIVER_CPU, distributed.HEAD_NODE: 0.001},
    )
    if tune.Tuner.can_restore(search):
        return tune.Tuner.restore(
            search,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
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
            name="search",
            storage_path=study.storage(study.experiment, "tune"),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=callbacks,
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
    table = format_table(rows)
    (out / "summary.txt").write_text(table + "\n")
    print(table)
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


def format_table(rows: list[dict[str, Any]]) -> str:
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
    return text_table(header, lines)


def text_table(header: list[str], lines: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart, the header first."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *lines]
    )


def log_study_results(
    client, tracking: dict[str, str], study: StudyConfig, summary: dict[str, Any], baseline: Path
) -> None:
    """The parent run's view of the search: the best trial's metrics (`best_*`, tag
    `apollo.best_trial`), the summary table, best.yaml, Optuna's plots, the best trials' loss
    curves against the baseline, and the best final model registered in the model registry."""
    from mlflow.entities import Metric

    from apollo_ray.plots import optuna_plots, optuna_study

    parent, out = tracking["parent_id"], study_dir(study)
    for name in ("summary.json", "summary.txt", "best.yaml"):
        if (out / name).exists():
            client.log_artifact(parent, str(out / name), "summary")
    done = [r for r in summary["trials"] if r["status"] == "ok"]
    best = summary["best"]
    if best:
        b = best[0]
        client.set_tag(parent, "apollo.best_trial", b["trial"])
        now = int(time.time() * 1000)
        values = {k: b[k] for k in ("eval_loss", "saving", "speedup", "flops") if b[k] is not None}
        client.log_batch(
            parent, metrics=[Metric(f"best_{k}", v, now, 0) for k, v in values.items()]
        )
    with tempfile.TemporaryDirectory() as tmp:
        if done:
            metric, mode = OBJECTIVES[study.search.objective]
            metrics, modes = (metric, mode) if isinstance(metric, list) else ([metric], [mode])
            directions = ["minimize" if m == "min" else "maximize" for m in modes]
            ot = optuna_study(done, study.search.space, directions, metrics)
            optuna_plots(ot, Path(tmp) / "optuna")
            top = sorted(done, key=lambda r: r["speedup"], reverse=True)[:3]
            curves = [
                Curve.from_metrics(out / "trials" / r["trial"] / "metrics.jsonl", name=r["trial"])
                for r in top
            ]
            plot_loss_vs_flops(
                curves,
                Curve.from_metrics(baseline, name="scratch"),
                Path(tmp) / "best_trials_loss_vs_flops.png",
                title=f"{study.experiment}: best trials by speedup",
            )
        client.log_artifacts(parent, tmp, "plots")
    if best:
        try:
            register_best(client, tracking, study, best[0]["trial"])
        except Exception as e:  # the study itself is complete: say so, do not fail it
            print(f"mlflow: best model not registered: {e}", file=sys.stderr)


def register_best(client, tracking: dict[str, str], study: StudyConfig, trial: str) -> None:
    """Export the best trial's final checkpoint as a Hugging Face model folder (loadable with
    `from_pretrained`), log it to the trial's run as `model/` and register it as a new version
    of the registered model named after the experiment."""
    from mlflow.exceptions import MlflowException

    from apollo_ray.distributed import CHECKPOINT_FILE, fetch
    from apollo_ray.export import export_checkpoint

    run = tracking_mod.find_run(client, tracking["experiment_id"], **{tracking_mod.TRIAL: trial})
    final = f"step-{study.base.train.steps:07d}"
    location = study.storage(study.experiment, "trials", trial, final, CHECKPOINT_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / CHECKPOINT_FILE
        if run is None or not fetch(location, ckpt):
            print(f"mlflow: best trial {trial} has no final checkpoint", file=sys.stderr)
            return
        export_checkpoint(ckpt, Path(tmp) / "model")
        client.log_artifacts(run.info.run_id, str(Path(tmp) / "model"), "model")
    try:
        client.create_registered_model(
            study.experiment,
            description=f"Best Apollo schedule of study {study.experiment} (Hugging Face format)",
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        study.experiment,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags={"trial": trial, "format": "huggingface"},
    )
    print(
        f"mlflow: registered models:/{study.experiment}/{version.version} (trial {trial})",
        file=sys.stderr,
    )


@contextmanager
def tracking_server(study: StudyConfig) -> Iterator[str]:
    """The study's tracking URI: the YAML's `tracking.mlflow_uri`, else MLFLOW_TRACKING_URI, else
    an MLflow server on 127.0.0.1 over the local store in output_dir, for the study's duration."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one per run ended
    uri = study.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        yield uri
        return
    with tracking_mod.LocalServer(study.output_dir) as server:
        print(
            f"mlflow: store {server.backend}, served at {server.uri} while the study runs; "
            f"afterwards: python -m apollo_ray.ui --output-dir {study.output_dir}",
            file=sys.stderr,
        )
        yield server.uri


def check_new_or_resumed(study: StudyConfig, resume: bool) -> None:
    """A study that already ran continues only with --resume (checked before anything starts)."""
    from ray import tune

    search = study.storage(study.experiment, "tune", "search")
    if tune.Tuner.can_restore(search) and not resume:
        raise ConfigError(
            f"{search} already holds this study: pass --resume to finish it (or see its "
            "results), or choose another `experiment` name"
        )


def check_tracking(uri: str) -> None:
    """Fail fast, before Ray starts, with the URI in the message if MLflow does not answer."""
    from mlflow import MlflowClient

    try:
        with tracking_mod.quick_failure(patient=False):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        raise ConfigError(
            f"tracking.mlflow_uri: MLflow at {uri} does not answer ({type(e).__name__}); start "
            "the server, fix the URI, or leave it null for the local store"
        ) from None


@contextmanager
def study_run(study: StudyConfig, yaml_path: str, uri: str, resume: bool) -> Iterator[dict]:
    """The study's MLflow experiment and parent run (a resumed study continues its own), ended
    FINISHED, FAILED or KILLED (Ctrl-C) whatever happens, with every child still RUNNING closed."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study.experiment)
    if exp is None:
        exp_id = client.create_experiment(study.experiment)
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    # MLflow 3's UI opens an experiment in its GenAI (traces) view unless told it trains models
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    tags = {tracking_mod.KIND: "study", tracking_mod.STUDY: study.experiment}
    found = tracking_mod.find_run(client, exp_id, **tags) if resume else None
    if found is not None:
        parent = found.info.run_id
        client.update_run(parent, status="RUNNING")
    else:
        parent = tracking_mod.start_run(client, exp_id, study.experiment, tags, fresh=True)
        client.log_artifact(parent, yaml_path, "study")
        s = study.search
        tracking_mod.log_params(
            client,
            parent,
            {
                "objective": s.objective,
                "trials": s.trials,
                "max_concurrent_trials": s.max_concurrent_trials,
                "sampler": s.sampler.kind,
                "sampler.seed": s.sampler.seed,
                "scheduler": "asha" if s.scheduler else "none",
                "space": ",".join(s.space),
                "checkpoints": study.tracking.checkpoints,
            },
            {},
        )
    tracking = {"uri": uri, "experiment_id": exp_id, "parent_id": parent}
    error: BaseException | None = None
    try:
        yield tracking
    except BaseException as e:
        error = e
        raise
    finally:
        try:
            closed = tracking_mod.close_leftovers(client, exp_id, parent)
            if closed:
                print(f"mlflow: closed {len(closed)} run(s) left RUNNING", file=sys.stderr)
            if error is not None:
                client.set_tag(parent, "apollo.end", _reason(error))
            client.set_terminated(parent, tracking_mod.end_status(error))
        except Exception as e:  # MLflow unreachable: say so, keep the study's own error
            print(f"mlflow: could not close the study's runs at {uri}: {e}", file=sys.stderr)


def check_resources(study: StudyConfig) -> None:
    """A trial that needs more than the whole cluster has would wait forever: refuse it."""
    import ray

    res, total = study.base.resources, ray.cluster_resources()
    need = {
        "CPU": res.workers * res.cpus_per_worker + DRIVER_CPU,
        "GPU": res.workers * res.gpus_per_worker,
        **{k: res.workers * v for k, v in res.worker_resources.items()},
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
        check_new_or_resumed(study, args.resume)
        prepare_data(study)
        with tracking_server(study) as uri:
            check_tracking(uri)
            import ray

            if not ray.is_initialized():
                ray.init(address=args.address or os.environ.get("RAY_ADDRESS"))
            check_resources(study)
            with study_run(study, args.study, uri, args.resume) as tracking:
                baseline = ensure_baseline(study, tracking)
                summary = summarize(study, run_search(study, baseline, tracking))
                log_study_results(_client(tracking), tracking, study, summary, baseline)
    except (ConfigError, DataError, NonFiniteLossError) as e:  # the last: a diverged baseline
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"summary: {study_dir(study) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
