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
from apollo_ray.records.plots import depth_histogram, optuna_plots, optuna_study, transfer_scatter
from apollo_ray.records.tracking import TRIAL, StudyRecord, find_run
from apollo_ray.storage import fetch
from apollo_ray.study.schema import OBJECTIVES, StudyConfig
from apollo_ray.training.checkpoints import CHECKPOINT_FILE, checkpoint_name
from apollo_ray.training.export import export_checkpoint
from apollo_ray.training.runlog import METRICS, read_rows
from apollo_ray.yardstick.acceleration import Curve, plot_loss_vs_flops
from apollo_ray.yardstick.frontier import Frontier
from apollo_ray.yardstick.scratch import Scratch

__all__ = [
    "SCORE_METRICS",
    "log_frontier",
    "log_run_results",
    "log_study_results",
    "log_transfer",
    "register_best",
]

# A trial's scores against the frontier that become MLflow metrics (besides paper_*)
SCORE_METRICS = ("eval_loss_se", "speedup", "saving", "wall_speedup", "wall_saving", "test_speedup")


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
    """The parent run's view of the search: its description (the answer and the end of the
    study as printed), the answer as the experiment's description too, the best trial's metrics
    (`best_*`, tag `apollo.best_trial`) and its run marked the winner, the summary table,
    best.yaml, the frontier with the best trials on it (labelled with the summary's speedups),
    Optuna's plots, and the best final model registered in the model registry."""
    client, parent, out = record.client(), record.parent_id, Path(study.study_dir)
    text = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    client.set_tag(parent, NOTE, _note(summary["answer"], text))
    client.set_experiment_tag(
        record.experiment_id, NOTE, f"{summary['answer']} (the study run: {study.experiment})"
    )
    for name in ("summary.json", "summary.txt", "best.yaml"):
        if (out / name).exists():
            client.log_artifact(parent, str(out / name), "summary")
    done = [r for r in summary["trials"] if r["status"] == "ok"]
    best = summary["best"]
    if best:
        b = best[0]
        client.set_tag(parent, "apollo.best_trial", b["trial"])
        mark_winner(client, record.experiment_id, b["trial"])
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
            curves = [  # the summary lists finished trials best first, with their speedups
                Curve.from_metrics(out / "trials" / r["trial"] / METRICS, name=_label(r))
                for r in done[:3]
            ]
            plot_loss_vs_flops(
                curves,
                None,
                Path(tmp) / "frontier" / "frontier_and_best_trials.png",
                title=f"{study.experiment}: the best trials against the scratch frontier",
                frontier=scratch.frontier(),
            )
            client.log_artifacts(parent, str(Path(tmp) / "frontier"))
            client.log_artifacts(parent, str(Path(tmp) / "optuna"), "plots/optuna")
    if best:
        try:
            measured = {k: f"{v:.4g}" for k, v in values.items() if "test" in k}
            schedule = ", ".join(f"{k}={v}" for k, v in best[0]["params"].items())
            about = f"{summary['answer']}\n\nThe schedule (trial {best[0]['trial']}): {schedule}"
            register_best(record, study, best[0]["trial"], measured, about)
        except Exception as e:  # the study itself is complete: say so, do not fail it
            print(f"mlflow: best model not registered: {e}", file=sys.stderr)


def log_transfer(record: StudyRecord, report: dict[str, Any], out: Path) -> None:
    """A transfer's run (`record.parent_id`, the study's `transfer` run): the correlation and
    whether the bests agree as metrics, the verdict as its description, the report files and
    best.yaml, and the proxy-against-target plot. A failure is reported, not raised."""
    client, run_id = record.client(), record.parent_id
    s = report["spearman"]
    values = {
        "spearman_rho": s["rho"],
        "spearman_low": s["low"],
        "spearman_high": s["high"],
        "schedules": s["n"],
        "same_best": float(report["same_best"]),
    }
    now = int(time.time() * 1000)
    try:
        finite = [Metric(k, float(v), now, 0) for k, v in values.items() if v == v]
        client.log_batch(run_id, metrics=finite)
        text = (out / "transfer.txt").read_text()
        client.set_tag(run_id, NOTE, _note(report["verdict"], text))
        client.set_tag(run_id, "apollo.target_best", str(report["target_best"]))
        for name in ("transfer.json", "transfer.txt", "best.yaml", "best-proxy.yaml"):
            if (out / name).exists():
                client.log_artifact(run_id, str(out / name), "summary")
        with tempfile.TemporaryDirectory() as tmp:
            transfer_scatter(report, Path(tmp) / "proxy_vs_target.png")
            client.log_artifacts(run_id, tmp, "plots")
    except Exception as e:
        print(f"mlflow: the transfer's results were not logged: {e}", file=sys.stderr)


NOTE = "mlflow.note.content"  # a run's (or experiment's) description in the MLflow UI, Markdown
WINNER = "apollo.winner"  # "true" on the run of the study's best trial
WINNER_COLOR = "#e8484d"  # its colour in the UI's runs table and charts (`mlflow.runColor`)
NOTE_CHARS = 7500  # below MLflow's limit on a tag's value


def _note(answer: str, text: str) -> str:
    """The study run's description: the answer, then the end of the study as printed."""
    note = f"**{answer}**\n\n```text\n{text.strip()}\n```\n"
    return note if len(note) <= NOTE_CHARS else note[: NOTE_CHARS - 20] + "\n...\n```\n"


def _label(row: dict[str, Any]) -> str:
    """A trial's name in the frontier plot, with the speedups the summary gives it."""
    label = f"{row['trial']}: speedup {row['speedup']:.3g}"
    if row.get("test_speedup") is not None:
        label += f" (test {row['test_speedup']:.3g})"
    return label


def mark_winner(client: MlflowClient, experiment_id: str, trial: str) -> None:
    """Tag the run of `trial` the winner (`apollo.winner`, coloured, its description saying
    so), and no other run of the experiment (a resumed study may have crowned another)."""
    for run in client.search_runs([experiment_id], f"tags.`{WINNER}` = 'true'"):
        client.delete_tag(run.info.run_id, WINNER)
        client.delete_tag(run.info.run_id, "mlflow.runColor")
    run = find_run(client, experiment_id, **{TRIAL: trial})
    if run is None:
        return
    client.set_tag(run.info.run_id, WINNER, "true")
    client.set_tag(run.info.run_id, "mlflow.runColor", WINNER_COLOR)
    client.set_tag(run.info.run_id, NOTE, f"**The study's best trial** ({trial}).")


def register_best(
    record: StudyRecord,
    study: StudyConfig,
    trial: str,
    measured: dict[str, str] | None = None,
    about: str | None = None,
) -> None:
    """Export the best trial's final checkpoint as a Hugging Face model folder (loadable with
    `from_pretrained`), log it to the trial's run as `model/` and register it as a new version
    of the registered model named after the experiment, tagged with what it `measured` on the
    test split (`best_test_speedup`, `confirmed_test_speedup`, ...); `about` (the answer and the
    schedule) is the description of both the version and the registered model."""
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
        description=about,
    )
    if about:
        client.update_registered_model(study.experiment, description=about)
    print(
        f"mlflow: registered models:/{study.experiment}/{version.version} (trial {trial})",
        file=sys.stderr,
    )
