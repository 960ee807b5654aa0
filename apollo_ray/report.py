"""Compare a study's trials from what MLflow recorded: a table and one loss-vs-FLOPs plot.

    python -m apollo_ray.report demo-bert-small                  # local store in outputs/
    python -m apollo_ray.report bert-base --tracking-uri http://127.0.0.1:5000 --top 5
    python -m apollo_ray.report demo-bert-small --sync            # upload what MLflow missed

The table lists every trial of the study's latest search (and the baseline) with its status,
final eval loss, FLOPs saving, compute-equivalent speedup and searched parameters, best first
by the study's objective. The plot puts the best `--top` trials' eval loss against cumulative
FLOPs next to the scratch baseline (default: <output_dir>/<experiment>/report/loss_vs_flops.png).
`--sync` first uploads the metrics rows and checkpoints that trials could not send while the
tracking server was unreachable (they wait in each run's folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from apollo_ray.records.mirror import pending_rows, sync, tracked
from apollo_ray.records.mlflow_server import DB_NAME, local_store
from apollo_ray.records.tracking import END, KIND, find_run
from apollo_ray.search.summary import ranking, text_table
from apollo_ray.yardstick.acceleration import Curve, plot_loss_vs_flops
from apollo_ray.yardstick.frontier import Frontier, FrontierPoint

__all__ = ["curve_of", "main", "study_runs", "sync_study", "table_rows"]


class ReportError(ValueError):
    """The experiment or its study run is not in the tracking store."""


def study_runs(client: MlflowClient, experiment: str) -> tuple[Any, list[Any]]:
    """(the latest study run, its child runs and the baseline's: the frontier's scratch runs)
    of `experiment`."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"no MLflow experiment {experiment!r}; the store has: {names}")
    parent = find_run(client, exp.experiment_id, **{KIND: "study"})
    if parent is None:
        raise ReportError(f"experiment {experiment!r} has no study run (tag {KIND})")
    children = _children(client, exp.experiment_id, parent.info.run_id)
    for run in list(children):
        if run.data.tags.get(KIND) == "baseline":
            children += _children(client, exp.experiment_id, run.info.run_id)
    return parent, children


def _children(client: MlflowClient, experiment_id: str, run_id: str) -> list[Any]:
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'"
    return client.search_runs([experiment_id], query, max_results=10_000)


def table_rows(parent: Any, children: list[Any]) -> list[dict[str, Any]]:
    """One row per trial and scratch run: the scratch runs by budget, then the trials best
    first as the study ranks them (`summary.ranking`), unscored runs last."""
    rows = []
    for run in children:
        m, tags = run.data.metrics, run.data.tags
        rows.append(
            {
                "run": run.info.run_name,
                "run_id": run.info.run_id,
                "kind": tags.get(KIND, "?"),
                "status": run.info.status,
                "final_eval_loss": m.get("final_eval_loss"),
                "eval_loss_se": m.get("eval_loss_se"),
                "saving": m.get("saving"),
                "speedup": m.get("speedup"),
                "bound": "lower" if m.get("speedup_is_lower_bound") else None,
                "total_flops": m.get("total_flops"),
                "total_wall_time": m.get("total_wall_time"),
                "params": {
                    k.removeprefix("searched."): v
                    for k, v in sorted(run.data.params.items())
                    if k.startswith("searched.")
                },
                "note": tags.get(END, ""),
            }
        )
    rows = [r for r in rows if r["kind"] != "baseline"]  # the group: its runs are rows
    scratch = sorted(
        (r for r in rows if r["kind"] == "frontier"), key=lambda r: float(r["params"]["budget"])
    )
    scored = [r for r in rows if r["kind"] == "trial" and r["speedup"] is not None]
    order = ranking(parent.data.params.get("objective", "speedup"))
    scored.sort(
        key=lambda r: order({**r, "eval_loss": r["final_eval_loss"], "flops": r["total_flops"]})
    )
    rest = [r for r in rows if r["kind"] == "trial" and r["speedup"] is None]
    return scratch + scored + rest


def format_rows(rows: list[dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    header = ["run", "kind", "status", "eval loss", "saving", "speedup", "FLOPs", "params / note"]
    lines = [
        [
            r["run"],
            r["kind"],
            r["status"],
            fmt(r["final_eval_loss"]),
            fmt(r["saving"]),
            fmt(r["speedup"]),
            fmt(r["total_flops"]),
            "; ".join(
                filter(None, [", ".join(f"{k}={v}" for k, v in r["params"].items()), r["note"]])
            )[:160],
        ]
        for r in rows
    ]
    return text_table(header, lines)


def curve_of(client: MlflowClient, run_id: str, name: str) -> Curve:
    """A run's eval curve rebuilt from its MLflow metric histories (eval_loss, flops, wall_time
    at the same steps)."""
    history = {
        key: sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        for key in ("eval_loss", "flops", "wall_time")
    }
    flops = {m.step: m.value for m in history["flops"]}
    wall = {m.step: m.value for m in history["wall_time"]}
    rows = [
        {"flops": flops[m.step], "wall_time": wall[m.step], "eval_loss": m.value}
        for m in history["eval_loss"]
        if m.step in flops and m.step in wall
    ]
    return Curve.from_metrics(rows, name=name)


def sync_study(client: MlflowClient, uri: str, study_dir: Path) -> int:
    """Upload what the study's runs left in their folders; returns how many runs were synced."""
    synced = 0
    run_dirs = [
        *sorted((study_dir / "trials").glob("*")),
        *sorted((study_dir.parent / "baselines").glob("*")),
    ]
    for run_dir in run_dirs:
        state = tracked(run_dir)
        if state is None or (not state["pending"] and not pending_rows(run_dir)):
            continue
        if sync(run_dir, uri):
            synced += 1
        else:
            print(f"warning: {run_dir} could not be uploaded to {uri}", file=sys.stderr)
    return synced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apollo_ray.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("experiment", help="the study's experiment name")
    parser.add_argument(
        "--output-dir", default="outputs", help="the study's output_dir (default: outputs)"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else <output-dir>/mlflow.db)",
    )
    parser.add_argument("--top", type=int, default=3, help="trials in the plot (default: 3)")
    parser.add_argument("--out", type=Path, default=None, help="the plot's path (PNG)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    parser.add_argument(
        "--sync", action="store_true", help="first upload rows and checkpoints MLflow missed"
    )
    args = parser.parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    uri = uri or local_store(args.output_dir)[0]
    if uri.startswith("sqlite:") and not Path(args.output_dir, DB_NAME).exists():
        print(f"error: no MLflow store at {Path(args.output_dir, DB_NAME)}", file=sys.stderr)
        return 2
    client = MlflowClient(uri)
    study_dir = Path(args.output_dir).resolve() / args.experiment
    try:
        if args.sync:
            print(f"synced {sync_study(client, uri, study_dir)} run(s)", file=sys.stderr)
        parent, children = study_runs(client, args.experiment)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = table_rows(parent, children)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"study run {parent.info.run_id} ({parent.info.status}) at {uri}")
        print(format_rows(rows))
    scratch = [r for r in rows if r["kind"] == "frontier" and r["final_eval_loss"] is not None]
    scored = [r for r in rows if r["kind"] == "trial" and r["speedup"] is not None]
    full = next((r for r in scratch if float(r["params"]["budget"]) == 1.0), None)
    if full is None or len(scratch) < 2 or not scored:
        print("no frontier or no scored trial yet: no plot", file=sys.stderr)
        return 0
    frontier = Frontier(
        [
            FrontierPoint(
                float(r["params"]["budget"]),
                r["total_flops"],
                r["total_wall_time"],
                r["final_eval_loss"],
            )
            for r in scratch
        ]
    )
    try:
        base = curve_of(client, full["run_id"], "scratch 1x")
        curves = [curve_of(client, r["run_id"], r["run"]) for r in scored[: args.top]]
    except ValueError as e:  # a run whose curve is not (yet) in MLflow: try --sync
        print(f"no plot: {e} (run with --sync to upload what runs left behind)", file=sys.stderr)
        return 0
    out = args.out or study_dir / "report" / "loss_vs_flops.png"
    title = f"{args.experiment}: best {len(curves)} trials against the scratch frontier"
    plot_loss_vs_flops(curves, base, out, title=title, frontier=frontier)
    print(f"plot: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
