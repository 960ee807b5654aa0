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

from apollo_ray.config import RunConfig
from apollo_ray.records.plots import depth_histogram, optuna_plots, optuna_study
from apollo_ray.records.tracking import TRIAL, StudyRecord, find_run
from apollo_ray.storage import fetch
from apollo_ray.study.schema import OBJECTIVES, StudyConfig
from apollo_ray.training.checkpoints import CHECKPOINT_FILE, checkpoint_name
from apollo_ray.training.export import export_checkpoint
from apollo_ray.training.runlog import METRICS, read_rows
from apollo_ray.yardstick.acceleration import Curve, plot_loss_vs_flops
from apollo_ray.yardstick.frontier import Frontier
from apollo_ray.yardstick.scratch import Scratch

__all__ = ["SCORE_METRICS", "log_frontier", "log_run_results", "log_study_results", "register_best"]

# A trial's scores against the frontier that become MLflow metrics (besides paper_*)
SCORE_METRICS = ("eval_loss_se", "speedup", "saving", "wall_speedup", "wall_saving")


def log_run_results(
    client: MlflowClient,
    run_id: str,
    cfg: RunConfig,
    metrics: Path,
    frontier: Frontier | None,
    scores: dict[str, Any] | None,
    full: Curve | None = None,
) -> None:
    """A finished run's totals and (a trial's) `scores` against the frontier, its loss-vs-FLOPs
    plot with the frontier (and `full`, the scratch run of its budget) and (Apollo runs) its
    depth histogram per stage, into its MLflow run. An MLflow failure here is reported, not
    raised: the run's scores must still reach Tune and Optuna."""
    curve = Curve.from_metrics(metrics, name=cfg.name)
    totals = {
        "final_eval_loss": curve.final_loss,
        "total_flops": curve.total_flops,
        "total_wall_time": curve.total_wall,
    }
    if scores is not None:
        totals |= {k: v for k, v in scores.items() if k in SCORE_METRICS or k.startswith("paper_")}
        totals |= {f"speedup_is_{b}_bound": float(scores["bound"] == b) for b in ("lower", "upper")}
    totals = {k: v for k, v in totals.items() if v is not None}
    # stamped with the last row's time: logged again (a retried trial, a rerun), it is the same
    stamp = int(read_rows(metrics)[-1].get("time", time.time()) * 1000)
    try:
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), stamp, cfg.train.steps) for k, v in totals.items()],
        )
        with tempfile.TemporaryDirectory() as tmp:
            plot_loss_vs_flops(
                [curve], full, Path(tmp) / "loss_vs_flops.png", title=cfg.name, frontier=frontier
            )
            if cfg.schedule is not None:
                depth_histogram(cfg, Path(tmp) / "depth_histogram.png")
            client.log_artifacts(run_id, tmp, "plots")
            client.log_artifact(run_id, str(cfg.output_dir / "config.json"))
    except Exception as e:
        print(f"mlflow: results of run {run_id} not logged: {e}", file=sys.stderr)


def log_frontier(
    group: StudyRecord, frontier: Frontier, curves: list[Curve], experiment: str
) -> None:
    """The baseline run's view of the frontier: each budget's final loss, FLOPs and seconds
    (`frontier_loss_<budget>x`, ...) and the plot of the scratch curves with the frontier."""
    client, now = group.client(), int(time.time() * 1000)
    values = {}
    for p in frontier.points:
        values |= {
            f"frontier_loss_{p.budget:g}x": p.loss,
            f"frontier_flops_{p.budget:g}x": p.flops,
            f"frontier_wall_{p.budget:g}x": p.wall,
        }
    try:
        client.log_batch(
            group.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()]
        )
        with tempfile.TemporaryDirectory() as tmp:
            for x in ("flops", "wall"):
                plot_loss_vs_flops(
                    curves,
                    None,
                    Path(tmp) / f"frontier_{x}.png",
                    title=f"{experiment}: the scratch frontier",
                    x=x,
                    frontier=frontier,
                )
            client.log_artifacts(group.parent_id, tmp, "plots")
    except Exception as e:
        print(f"mlflow: the frontier was not logged: {e}", file=sys.stderr)


def log_study_results(
    record: StudyRecord, study: StudyConfig, summary: dict[str, Any], scratch: Scratch
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
        keys = ("eval_loss", "saving", "speedup", "flops", "test_loss", "test_speedup")
        values = {f"best_{k}": b[k] for k in keys if b.get(k) is not None}
        confirmed = (summary.get("confirmed") or [{}])[0]
        if confirmed.get("trial") == b["trial"] and "speedup" in confirmed:
            values["confirmed_seeds"] = confirmed["speedup"]["n"]
            for key in ("speedup", "test_speedup"):  # validation (it chose), test (it reports)
                if key in confirmed:
                    ci = confirmed[key]
                    values[f"confirmed_{key}"] = ci["mean"]
                    values |= {f"confirmed_{key}_{k}": ci[k] for k in ("low", "high") if ci[k]}
        client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in values.items()])
    with tempfile.TemporaryDirectory() as tmp:
        if done:
            metric, mode = OBJECTIVES[study.search.objective]
            metrics, modes = (metric, mode) if isinstance(metric, list) else ([metric], [mode])
            directions = ["minimize" if m == "min" else "maximize" for m in modes]
            ot = optuna_study(done, study.search.space, directions, metrics)
            optuna_plots(ot, Path(tmp) / "optuna")
            curves = [  # the summary lists finished trials best first
                Curve.from_metrics(out / "trials" / r["trial"] / METRICS, name=r["trial"])
                for r in done[:3]
            ]
            plot_loss_vs_flops(
                curves,
                Curve.from_metrics(scratch.full, name="scratch 1x"),
                Path(tmp) / "best_trials_loss_vs_flops.png",
                title=f"{study.experiment}: the best trials against the scratch frontier",
                frontier=scratch.frontier(),
            )
        client.log_artifacts(parent, tmp, "plots")
    if best:
        try:
            measured = {k: f"{v:.4g}" for k, v in values.items() if "test" in k}
            register_best(record, study, best[0]["trial"], measured)
        except Exception as e:  # the study itself is complete: say so, do not fail it
            print(f"mlflow: best model not registered: {e}", file=sys.stderr)


def register_best(
    record: StudyRecord, study: StudyConfig, trial: str, measured: dict[str, str] | None = None
) -> None:
    """Export the best trial's final checkpoint as a Hugging Face model folder (loadable with
    `from_pretrained`), log it to the trial's run as `model/` and register it as a new version
    of the registered model named after the experiment, tagged with what it `measured` on the
    test split (`best_test_speedup`, `confirmed_test_speedup`, ...)."""
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
        tags={"trial": trial, "format": "huggingface", **(measured or {})},
    )
    print(
        f"mlflow: registered models:/{study.experiment}/{version.version} (trial {trial})",
        file=sys.stderr,
    )
