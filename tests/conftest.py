"""Shared fixtures: small prepared datasets, built once per test session, and the tiny run and
study every training test starts from.

`bert_data` and `gpt_data` are directories written by `prepare` from the first 30 documents of
the embedded `demo` corpus with a 2000-token vocabulary, a tenth of them for validation and a
tenth for test (a few seconds each). `tiny_run` is a
4-layer, 32-wide model trained 12 steps in 3 stages; tests change what they need with keyword
overrides, so each says how its run differs from the tiny one.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.fs
import pytest
import yaml
from hypothesis import settings

from apollo_ray.config import RunConfig
from apollo_ray.data import prepare
from apollo_ray.storage import join_uri

# Ray Train's controller polls its workers every 2 s (their reports and checkpoints, the end of
# the run, a dead worker); in these runs of a dozen steps that wait is most of a run's time.
# Every Ray this session starts polls every 0.2 s: its raylets pass this on to the controllers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

# Hypothesis (tests/commands/test_bad_input.py): in CI a bounded number of draws, the same ones
# every run; HYPOTHESIS_PROFILE=deep for a longer, random run by hand
settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True, database=None)
settings.register_profile("deep", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TINY: dict[str, Any] = {
    "seed": 0,
    "model": {"n_layer": 4, "d_model": 32, "n_head": 2, "max_seq_len": 32, "dropout": 0.0},
    "data": {"seq_len": 32},
    "train": {
        "steps": 12,
        "micro_batch": 4,
        "lr": 3.0e-3,
        "eval_every": 4,
        "eval_batches": 2,
        "checkpoint_every": 6,
        "log_every": 1,
        "final_eval_tokens": 4000,  # ~140 sequences of each held-out split, not all of test
    },
    "schedule": {"depths": [1, 2, 4], "stage_ends": [0.25, 0.5]},  # growths at steps 3 and 6
}


def tiny_run_dict(
    data: Path | str | dict[str, Any],
    out: Path | str | None = None,
    kind: str = "gpt",
    **overrides: Any,
) -> dict[str, Any]:
    """The tiny run as the dict a run YAML holds (`name`/`out_dir` only with `out`).

    `data` is the prepared data's path (or a `data` section holding it), `kind` the model's;
    every other keyword names a section (`model`, `train`, `schedule`, `resources`: a dict is
    merged into the tiny one; `schedule=None` trains from scratch at full depth) or a top-level
    field (`seed`, `name`: replaced)."""
    run = copy.deepcopy(TINY)
    run["model"]["kind"] = kind
    run["data"].update(data if isinstance(data, dict) else {"path": str(data)})
    if out is not None:
        run["name"], run["out_dir"] = Path(out).name, str(out)
    for key, value in overrides.items():
        if isinstance(value, dict):
            run[key] = {**run.get(key, {}), **value}
        else:
            run[key] = value
    return run


def tiny_run(
    data: Path | str | dict[str, Any], out: Path | str, kind: str = "gpt", **overrides: Any
) -> RunConfig:
    """The validated tiny run writing to `out` (named after it); see `tiny_run_dict`."""
    return RunConfig.model_validate(tiny_run_dict(data, out, kind, **overrides))


def _prepare_demo(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    out = tmp_path_factory.mktemp(f"{kind}_data")
    prepare(
        ["demo"], out, kind, vocab_size=2000, max_documents=30, val_fraction=0.1, test_fraction=0.1
    )
    return out


@pytest.fixture(scope="session")
def bert_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare_demo(tmp_path_factory, "bert")


@pytest.fixture(scope="session")
def gpt_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare_demo(tmp_path_factory, "gpt")


# The test modules with tests on the session's Ray (the `ray_cluster` fixture, directly or not).
RAY_MODULES = {
    "test_autoscaling",
    "test_distributed",
    "test_mirror",
    "test_multinode",
    "test_report",
    "test_solo",
    "test_tracking",
    "test_tune",
    "test_ui",
}


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under pytest-xdist (`make test` runs `-n 2`), the modules of `RAY_MODULES` go to one
    worker, one test after another: they keep the cores half busy, waiting on Ray's processes,
    and the other worker runs the rest of the suite meanwhile; a second Ray beside the first
    would only slow both. (A scheduler of our own: pytest 9 ignores the `@group` suffix that
    xdist's `--dist loadgroup` gives a node id.)"""
    from xdist.scheduler import LoadScopeScheduling

    class RayApart(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = Path(nodeid.split("::")[0]).stem
            return "ray" if module in RAY_MODULES else nodeid

    return RayApart(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on Ray outside `RAY_MODULES` would run beside the others on a second Ray."""
    for item in items:
        module = getattr(item, "module", None)
        uses_ray = "ray_cluster" in getattr(item, "fixturenames", ())
        if uses_ray and module is not None and module.__name__ not in RAY_MODULES:
            raise pytest.UsageError(f"{item.nodeid} runs on Ray: add its module to RAY_MODULES")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every test that needs it (starting Ray costs ~10 s).

    4 logical CPUs on this 2-core machine: a run's workers (and, for Tune, the trial driver)
    must fit at once. Token auth is off for this throwaway local instance, and there is no
    dashboard (nothing here reads it; idle, it costs a third more CPU than Ray without it)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """`s3://bucket?endpoint_override=...` of a fresh moto S3 server (dummy credentials)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = pytest.MonkeyPatch()
    env.setenv("AWS_ACCESS_KEY_ID", "test")
    env.setenv("AWS_SECRET_ACCESS_KEY", "test")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&allow_bucket_creation=true"
    uri = f"s3://bucket?{query}"
    fs, _ = pyarrow.fs.FileSystem.from_uri(uri)
    deadline = time.time() + 60
    while True:
        try:
            fs.create_dir("bucket")
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    yield uri
    env.undo()
    server.terminate()
    server.wait(10)


def upload(folder: Path, s3: str, name: str) -> str:
    """Copy a local folder into the `s3` fixture's bucket as `name`; returns its URI."""
    fs, _ = pyarrow.fs.FileSystem.from_uri(s3)
    local = pyarrow.fs.LocalFileSystem()
    pyarrow.fs.copy_files(
        str(folder), f"bucket/{name}", source_filesystem=local, destination_filesystem=fs
    )
    return join_uri(s3, name)


# ------------------------------------------------------------------------------ studies

SEARCH_SPACES = sorted((Path(__file__).parent.parent / "search_spaces").glob("*.yaml"))

# the brief's example study: a 6-layer BERT with the whole searchable generalisation
EXAMPLE_STUDY: dict[str, Any] = {
    "experiment": "demo-bert-small",
    "prepare": {"sources": ["demo"], "vocab_size": 8192, "val_fraction": 0.05},
    "base": {
        "seed": 0,
        "model": {"kind": "bert", "n_layer": 6, "d_model": 128, "n_head": 4, "max_seq_len": 64},
        "data": {"path": "data/demo-bert", "seq_len": 64},
        "train": {"steps": 120, "micro_batch": 16, "lr": 1.0e-3, "eval_every": 20},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "schedule": {"depths": [1, 3, 6], "stage_ends": [0.1, 0.25]},
    },
    "search": {
        "trials": 6,
        "sampler": {"kind": "tpe", "seed": 0},
        "objective": "flops_saving",
        "scheduler": {"kind": "asha", "grace_fraction": 0.25, "reduction_factor": 3},
        "space": {
            "train.lr": {"float": [3.0e-4, 3.0e-3], "log": True},
            "schedule.depths": {"choice": [[1, 3, 6], [2, 6], [3, 6]]},
            "schedule.stage_ends": {"increasing": [0.05, 0.5]},
            "schedule.sampler": {"choice": ["apollo", "lvps", "uniform"]},
            "schedule.tau": {
                "float": [0.1, 5.0],
                "log": True,
                "when": {"schedule.sampler": "lvps"},
            },
            "schedule.alpha": {"float": [0.0, 1.0]},
            "schedule.noise": {"float": [0.0, 0.05]},
            "schedule.optimizer_state": {"choice": ["fresh", "copy"]},
            "schedule.rewarmup_steps": {"int": [0, 30]},
        },
    },
    "tracking": {"mlflow_uri": None, "checkpoints": "last"},
}


def edited_study(edit) -> dict[str, Any]:
    """A copy of `EXAMPLE_STUDY` changed in place by `edit(data)`."""
    data = copy.deepcopy(EXAMPLE_STUDY)
    edit(data)
    return data


def write_study(tmp_path: Path, data: dict[str, Any]) -> Path:
    """`data` as `tmp_path/study.yaml`."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def space_of(data: dict[str, Any]) -> dict[str, Any]:
    """A study dict's `search.space`."""
    return data["search"]["space"]


def tiny_study(
    tmp_path, gpt_data, experiment="tiny", trials=3, lrs=(3.0e-3, 1.0e9), confirm=None
) -> Path:
    """A study YAML in `tmp_path`: a 4-layer GPT, 12 steps, 3 stages, random search over alpha
    and the LR (an LR of 1e9 makes the loss NaN at step 1); a frontier of two scratch runs
    (6 and 12 steps), the fewest there can be, untuned (`baseline: null`: the tuned frontier
    has its own test, tests/commands/test_tune.py); a trial whose process dies is retried
    once; `confirm` as search.confirm."""
    study = {
        "experiment": experiment,
        "output_dir": str(tmp_path / "outputs"),
        "frontier": [0.5, 1.0],
        "baseline": None,
        "base": tiny_run_dict(
            gpt_data, resources={"workers": 1, "cpus_per_worker": 1, "max_failures": 1}
        ),
        "search": {
            "trials": trials,
            "max_concurrent_trials": 1,
            "sampler": {"kind": "random", "seed": 0},
            "objective": "speedup",
            "space": {"schedule.alpha": {"float": [0.0, 1.0]}, "train.lr": {"choice": list(lrs)}},
            "confirm": confirm,
        },
    }
    path = tmp_path / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


FINISHED = re.compile(r"trial \w+ finished")  # the study's line as a trial ends


@pytest.fixture(scope="session")
def tiny_search(ray_cluster, tmp_path_factory, gpt_data) -> Path:
    """One real small search (3 trials, 2 of them diverging; the finished one confirmed with 2
    fresh seeds), run once for every test that inspects a finished study: its files, its MLflow
    records, the report and the UI. It is interrupted on the way, as a user would: started as
    `python -m apollo_ray.tune STUDY --kill-at-step 7` (each trial's process is killed once after
    step 7 and Tune retries it from its step-6 checkpoint), stopped with Ctrl-C as soon as its
    first trial has finished, and finished with `--resume`; every test of the study reads the
    resumed one. Returns the study's output_dir (which holds the MLflow store); beside it,
    `interrupted.log` is the interrupted command's output and exit status, and `resumed_at`
    the time the resume began (a Unix time)."""
    from apollo_ray.tune import main

    root = tmp_path_factory.mktemp("search")
    path = tiny_study(root, gpt_data, confirm={"top_k": 2, "seeds": 2})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "apollo_ray.tune", str(path), "--kill-at-step", "7"]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        output = []
        for line in proc.stdout:  # one line per trial event: the output is not a terminal
            output.append(line)
            if FINISHED.match(line):
                proc.send_signal(signal.SIGINT)  # Ctrl-C
                break
        output.append(proc.communicate(timeout=120)[0])
    (root / "interrupted.log").write_text("".join(output) + f"exit status {proc.returncode}\n")
    assert any(FINISHED.match(line) for line in output), "".join(output)
    (root / "resumed_at").write_text(repr(time.time()))
    assert main([str(path), "--resume"]) == 0
    return root / "outputs"


def reuse_frontier(tiny_search: Path, output_dir: Path) -> None:
    """Give a tiny study writing to `output_dir` the shared tiny search's scratch frontier (same
    base, so the same baseline keys): it reuses those runs instead of training them again."""
    shutil.copytree(tiny_search / "baselines", output_dir / "baselines")


# ------------------------------------------------------------------ a run's rows, in MLflow too


def write_metrics(path: Path, points: list[tuple[float, float]]) -> Path:
    """A metrics.jsonl of eval points (flops, eval_loss), wall time flops / 10."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"step": i, "flops": f, "wall_time": f / 10, "eval_loss": loss}
        for i, (f, loss) in enumerate(points)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def timeless(run_dir: Path) -> list[dict[str, Any]]:
    """The rows without their timing fields: what two runs of one config must agree on."""
    drop = ("wall_time", "tokens_per_s", "time")
    return [{k: v for k, v in r.items() if k not in drop} for r in metrics_rows(run_dir)]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of an MLflow run's metric `key`, by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def expected(rows: list[dict], key: str, column: str | None = None) -> list[tuple[int, float]]:
    """(step, value) of metrics.jsonl's `column` (default `key`): what `history` must show."""
    column = column or key
    return sorted((r["step"], r[column]) for r in rows if column in r)


def mlflow_target(folder: Path, policy: str = "all"):
    """(client, Target) of a new MLflow run in a SQLite store under `folder`, its rows uploaded
    as soon as they may be (`every_s=0`)."""
    from mlflow import MlflowClient

    from apollo_ray.records.mirror import Target
    from apollo_ray.records.mlflow_server import local_store

    uri, artifacts = local_store(folder)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("runs", artifacts)).info.run_id
    return client, Target(uri, run_id, policy, every_s=0)


def stage_checkpoints(final: int = 12) -> set[str]:
    """The MLflow checkpoint files of the tiny run (growths at 3 and 6) under policy `all`."""
    names = [f"step-{s:07d}.{t}-growth" for s in (3, 6) for t in ("pre", "post")]
    return {f"{n}.{ext}" for n in [*names, f"step-{final:07d}"] for ext in ("pt", "json")}


def records(client, run_id: str, run_dir: Path) -> tuple[dict[str, list], dict[str, list]]:
    """The history of each metric of a run's metrics.jsonl in its MLflow run, and what the file
    says it must be: each row's points once ((step, value) sorted; a point logged twice shows
    twice)."""
    from apollo_ray.records.mirror import metrics_of

    want: dict[str, list] = {}
    for row in metrics_rows(run_dir):
        for key, value in metrics_of(row).items():
            want.setdefault(key, []).append((row["step"], value))
    return {k: history(client, run_id, k) for k in want}, {k: sorted(v) for k, v in want.items()}


def checkpoint_names(client, run_id: str) -> set[str]:
    """The files under an MLflow run's `checkpoints/` artifacts."""
    return {Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints")}


def search_runs(output_dir: Path, experiment: str = "tiny"):
    """(client, experiment, runs) of a study's MLflow experiment in its local store."""
    from mlflow import MlflowClient

    from apollo_ray.records.mlflow_server import local_store

    client = MlflowClient(local_store(output_dir)[0])
    exp = client.get_experiment_by_name(experiment)
    return client, exp, client.search_runs([exp.experiment_id])
