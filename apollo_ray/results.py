"""What a finished run or study adds to its MLflow record: scores, plots, the registered model.

`log_run_results` runs in the trial driver (and for the baseline), `log_study_results` in the
study driver once the search is over. An MLflow failure here is reported, not raised: the
scores must still reach Tune and Optuna, and the study itself is complete.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from apollo_ray.acceleration import Curve, plot_loss_vs_flops
from apollo_ray.checkpoints import CHECKPOINT_FILE, checkpoint_name
from apollo_ray.config import RunConfig
from apollo_ray.export import export_checkpoint
from apollo_ray.plots import depth_histogram, optuna_plots, optuna_study
from apollo_ray.runlog import METRICS
from apollo_ray.storage import fetch
from apollo_ray.study import OBJECTIVES, StudyConfig
from apollo_ray.tracking import TRIAL, StudyRecord, find_run

__all__ = ["log_run_results", "log_study_results", "register_best"]


def log_run_results(
    client: MlflowClient,
    run_id: str,
    cfg: RunConfig,
    metrics: Path,
    baseline: Path,
    scores: dict[str, Any] | None,
) -> None:
    """A finished run's totals and acceleration metrics, its loss-vs-FLOPs plot against the
    baseline and (Apollo runs) its depth histogram per stage, into its MLflow run. An MLflow
    failure here is reported, not raised: the run's scores must still reach Tune and Optuna."""
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


def log_study_results(
    record: StudyRecord, study: StudyConfig, summary: dict[str, Any], baseline: Path
) -> None:
    """The parent run's view of the search: the best trial's metrics (`best_*`, tag
    `apollo.best_trial`), the summary table, best.yaml, Optuna's plots, the best trials' loss
    curves against the baseline, and the best final model registered in the model registry."""
    client, parent, out = record.client(), record.parent_id, Path(study.study_dir)
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
                Curve.from_metrics(out / "trials" / r["trial"] / METRICS, name=r["trial"])
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
            register_best(record, study, best[0]["trial"])
        except Exception as e:  # the study itself is complete: say so, do not fail it
            print(f"mlflow: best model not registered: {e}", file=sys.stderr)


def register_best(record: StudyRecord, study: StudyConfig, trial: str) -> None:
    """Export the best trial's final checkpoint as a Hugging Face model folder (loadable with
    `from_pretrained`), log it to the trial's run as `model/` and register it as a new version
    of the registered model named after the experiment."""
    client = record.client()
    run = find_run(client, record.experiment_id, **{TRIAL: trial})
    final = checkpoint_name(study.base.train.steps)
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
