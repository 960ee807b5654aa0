"""Before/after check of a restructuring: two checkouts run the same tiny run and tiny study and
must record the same thing, timings aside.

    git worktree add /tmp/old <commit before>          # the code before, beside this one
    .venv/bin/python -m benchmarks.same_behaviour /tmp/old .

Each checkout runs, as its own processes with its own code first on PYTHONPATH (this venv's
packages under it): `python -m apollo_ray.data prepare` (the demo corpus, 30 documents),
`python -m apollo_ray.train` of a 4-layer GPT for 12 steps in 3 stages (MLflow on), and
`python -m apollo_ray.tune` of a study over it (a frontier of 2 scratch runs, 3 random trials, 2
of them diverging, the best confirmed with 2 seeds). What is compared: every run's metrics.jsonl
rows, the study's summary.json and every MLflow run's metric keys, values, params, tags and
artifacts, with timings, Tune's trial ids and temporary paths left out. Prints one line per part
(same / different, and where), writes benchmarks/results/same-behaviour.json; exit status 1 if
any part differs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import print_table, save

TINY: dict[str, Any] = {
    "seed": 0,
    "model": {
        "kind": "gpt",
        "n_layer": 4,
        "d_model": 32,
        "n_head": 2,
        "max_seq_len": 32,
        "dropout": 0.0,
    },
    "data": {"seq_len": 32},
    "train": {
        "steps": 12,
        "micro_batch": 4,
        "lr": 3.0e-3,
        "eval_every": 4,
        "eval_batches": 2,
        "checkpoint_every": 6,
        "log_every": 1,
    },
    "schedule": {"depths": [1, 2, 4], "stage_ends": [0.25, 0.5]},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}
TRIAL_ID = re.compile(r"\b[0-9a-f]{8}\b|\b[0-9a-f]{5}_\d{5}\b")  # Tune's, new in every run


def run_checkout(checkout: Path, out: Path) -> None:
    """The tiny run and the tiny study of `checkout`, written under `out`."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    env.setdefault("RAY_AUTH_MODE", "disabled")

    def command(*args: str) -> None:
        subprocess.run([sys.executable, "-m", *args], cwd=checkout, env=env, check=True)

    data = out / "data"
    prepare = ["--kind", "gpt", "--vocab-size", "2000", "--max-documents", "30"]
    command(
        "apollo_ray.data", "prepare", "demo", "--out", str(data), *prepare, "--val-fraction", "0.1"
    )
    tiny = {**TINY, "data": {**TINY["data"], "path": str(data)}}
    run = out / "run.yaml"
    run.write_text(yaml.safe_dump({**tiny, "name": "tinyrun", "out_dir": str(out / "tinyrun")}))
    store = f"sqlite:///{out}/train-mlflow.db"
    command("apollo_ray.train", str(run), "--no-progress", "--mlflow-uri", store)
    search = {
        "trials": 3,
        "max_concurrent_trials": 1,
        "sampler": {"kind": "random", "seed": 0},
        "objective": "speedup",
        "space": {
            "schedule.alpha": {"float": [0.0, 1.0]},
            "train.lr": {"choice": [3.0e-3, 1.0e9]},  # 1e9: NaN at step 1
        },
        "confirm": {"top_k": 2, "seeds": 2},
    }
    study = {"experiment": "tiny", "output_dir": str(out / "outputs"), "frontier": [0.5, 1.0]}
    path = out / "tiny.yaml"
    path.write_text(yaml.safe_dump({**study, "base": tiny, "search": search}))
    command("apollo_ray.tune", str(path))


def timeless(value: Any) -> Any:
    """`value` without what differs between two identical runs: timings, Tune's trial ids,
    temporary paths."""
    if isinstance(value, dict):
        drop = ("wall", "time", "tokens_per_s")
        return {k: timeless(v) for k, v in value.items() if not any(d in k for d in drop)}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    if isinstance(value, str):
        return TRIAL_ID.sub("<id>", re.sub(r"/tmp/\S*", "<path>", value))
    return value


def mlflow_runs(uri: str) -> list[dict[str, Any]]:
    """Every run of the store at `uri`: its metric keys and (timeless) values, params, tags and
    artifacts, in a stable order."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], max_results=10_000):
            runs.append(
                {
                    "experiment": experiment.name,
                    "metric_keys": sorted(run.data.metrics),
                    "metrics": timeless(run.data.metrics),
                    "params": sorted(run.data.params),
                    "tags": sorted(run.data.tags),
                    "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
                }
            )
    return sorted(runs, key=lambda r: json.dumps(r, sort_keys=True))


def record(out: Path) -> dict[str, Any]:
    """What a checkout's runs left, timings aside, by part."""
    rows = [
        timeless([json.loads(line) for line in path.read_text().splitlines()])
        for path in out.rglob("metrics.jsonl")
    ]
    summary = json.loads((out / "outputs" / "tiny" / "summary.json").read_text())
    return {
        "metrics.jsonl rows": sorted(json.dumps(r, sort_keys=True) for r in rows),
        "summary.json": timeless(summary),
        "MLflow (train)": mlflow_runs(f"sqlite:///{out}/train-mlflow.db"),
        "MLflow (study)": mlflow_runs(f"sqlite:///{out}/outputs/mlflow.db"),
    }


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where `a` and `b` first differ, as a path into them (None: they are equal)."""
    if type(a) is not type(b):
        return f"{where}: {a!r:.60} | {b!r:.60}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}/{key}: in one only"
            found = first_difference(a[key], b[key], f"{where}/{key}")
            if found:
                return found
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} | {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{where}: {a!r:.60} | {b!r:.60}"


def describe(checkout: Path) -> str:
    """A checkout as its commit, `+changes` when its work tree differs from it."""
    git = ["git", "-C", str(checkout)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    return commit.stdout.strip() + (" +changes" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.same_behaviour",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("before", type=Path, help="checkout of the code before")
    parser.add_argument("after", type=Path, help="checkout of the code after")
    args = parser.parse_args(argv)
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("before", "after"):
            out = Path(tmp) / side
            run_checkout(getattr(args, side).resolve(), out)
            records[side] = record(out)
    rows = []
    for part, before in records["before"].items():
        where = first_difference(before, records["after"][part])
        count = len(before) if isinstance(before, list) else None
        rows.append({"part": part, "items": count, "same": not where, "first difference": where})
    print_table(rows, ["part", "items", "same", "first difference"])
    names = {side: describe(getattr(args, side)) for side in ("before", "after")}
    print(save("same-behaviour", {"checkouts": names, "parts": rows}))
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
