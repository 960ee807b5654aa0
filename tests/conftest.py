"""Shared fixtures: small prepared datasets, built once per test session.

`bert_data` and `gpt_data` are directories written by `prepare` from the first 30 documents of
the embedded `demo` corpus with a 2000-token vocabulary (a few seconds each).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs
import pytest
import yaml

from apollo_ray.data import prepare
from apollo_ray.data.shards import join_uri


def _prepare_demo(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    out = tmp_path_factory.mktemp(f"{kind}_data")
    prepare(["demo"], out, kind, vocab_size=2000, max_documents=30, val_fraction=0.1)
    return out


@pytest.fixture(scope="session")
def bert_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare_demo(tmp_path_factory, "bert")


@pytest.fixture(scope="session")
def gpt_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare_demo(tmp_path_factory, "gpt")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every test that needs it (starting Ray costs ~10 s).

    4 logical CPUs on this 2-core machine: a run's workers (and, for Tune, the trial driver)
    must fit at once. Token auth is off for this throwaway local instance."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)
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


def tiny_study(tmp_path, gpt_data, experiment="tiny", trials=3, lrs=(3.0e-3, 1.0e9)) -> Path:
    """A study YAML in `tmp_path`: a 4-layer GPT, 12 steps, 3 stages, random search over alpha
    and the LR (an LR of 1e9 makes the loss NaN at step 1)."""
    study = {
        "experiment": experiment,
        "output_dir": str(tmp_path / "outputs"),
        "base": {
            "seed": 0,
            "model": {
                "kind": "gpt",
                "n_layer": 4,
                "d_model": 32,
                "n_head": 2,
                "max_seq_len": 32,
                "dropout": 0.0,
            },
            "data": {"path": str(gpt_data), "seq_len": 32},
            "train": {
                "steps": 12,
                "micro_batch": 4,
                "lr": 3.0e-3,
                "eval_every": 4,
                "eval_batches": 2,
                "checkpoint_every": 6,
                "log_every": 1,
            },
            "resources": {"workers": 1, "cpus_per_worker": 1},
            "schedule": {"depths": [1, 2, 4], "stage_ends": [0.25, 0.5]},
        },
        "search": {
            "trials": trials,
            "max_concurrent_trials": 1,
            "sampler": {"kind": "random", "seed": 0},
            "objective": "speedup",
            "space": {"schedule.alpha": {"float": [0.0, 1.0]}, "train.lr": {"choice": list(lrs)}},
        },
    }
    path = tmp_path / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="session")
def tiny_search(ray_cluster, tmp_path_factory, gpt_data) -> Path:
    """One real small search (3 trials, 2 of them diverging), run once for every test that
    inspects a finished study: its files, its MLflow records, the report and the UI. Returns the
    study's output_dir (which holds the MLflow store)."""
    from apollo_ray.tune import main

    root = tmp_path_factory.mktemp("search")
    assert main([str(tiny_study(root, gpt_data))]) == 0
    return root / "outputs"
