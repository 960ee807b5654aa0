"""Rank 0's mirror of a run into MLflow, against real MLflow stores and servers: every row and
the stage-wise checkpoints, the checkpoint policy, an unreachable server (nothing lost, `sync`
uploads it later) and the relay through the head node."""

import json
from pathlib import Path

import pytest
from conftest import checkpoint_names, expected, history, metrics_rows, tiny_run
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from apollo_ray.checkpoints import load as load_checkpoint
from apollo_ray.config import RunConfig
from apollo_ray.mirror import RunMirror, Target, pending_rows, sync
from apollo_ray.mlflow_server import LocalServer, free_port, local_store
from apollo_ray.trainer import Trainer


def apollo_cfg(data, out) -> RunConfig:
    """The tiny run (12 steps in 3 stages, N = 1, 2, 4: growths at steps 3 and 6) with the
    default dropout and LR."""
    return tiny_run(data, out, name="mirrored", seed=1, model={"dropout": 0.1}, train={"lr": 1e-4})


def new_run(uri: str, artifacts: str | None = None) -> tuple[MlflowClient, str]:
    client = MlflowClient(uri)
    exp = client.create_experiment("mirror", artifact_location=artifacts)
    return client, client.create_run(exp).info.run_id


def test_mirror_logs_every_row_and_the_stage_checkpoints(tmp_path, gpt_data):
    client, run_id = new_run(*local_store(tmp_path / "store"))  # not ./mlruns in the repo
    cfg = apollo_cfg(gpt_data, tmp_path / "run")
    target = Target(local_store(tmp_path / "store")[0], run_id, "all")
    Trainer(cfg, progress=False, tracker=RunMirror(target, cfg.output_dir, 12, every_s=0)).fit()

    rows = metrics_rows(cfg.output_dir)
    assert history(client, run_id, "train_loss") == expected(rows, "train_loss", "loss")
    for key in ("eval_loss", "depth", "n_physical", "stage", "flops", "tokens", "lr"):
        assert history(client, run_id, key) == expected(rows, key), key
    assert len(history(client, run_id, "tokens_per_s")) == 12
    assert pending_rows(cfg.output_dir) == 0
    stages = {f"step-{s:07d}.{t}-growth" for s in (3, 6) for t in ("pre", "post")}
    names = {f"{n}.{ext}" for n in [*stages, "step-0000012"] for ext in ("pt", "json")}
    assert checkpoint_names(client, run_id) == names  # not the periodic step-0000006
    local = download_artifacts(run_id=run_id, artifact_path="checkpoints", tracking_uri=target.uri)
    post = load_checkpoint(Path(local) / "step-0000006.post-growth.pt")  # weights_only=True
    meta = json.loads((Path(local) / "step-0000006.post-growth.json").read_text())
    assert post["n_physical"] == meta["n_physical"] == 4 and meta["step"] == 6
    assert post["run_config"]["schedule"]["depths"] == [1, 2, 4]  # enough to resume or export


@pytest.mark.parametrize(
    ("policy", "logged"),
    [("all", {"pre", "post", "final"}), ("last", {"final"}), ("none", set())],
)
def test_checkpoint_policy(tmp_path, policy, logged):
    mirror = RunMirror(
        Target(f"sqlite:///{tmp_path / 'unused.db'}", "r", policy), tmp_path, final_step=12
    )
    names = {"pre": "step-0000003.pre-growth", "post": "step-0000003.post-growth"}
    names |= {"final": "step-0000012", "periodic": "step-0000006"}
    assert {k for k, name in names.items() if mirror.wants(name)} == logged


@pytest.mark.slow  # an MLflow server, twice
def test_unreachable_server_loses_nothing(tmp_path, gpt_data):
    port, store = free_port(), tmp_path / "store"
    with LocalServer(store, port=port) as server:
        client, run_id = new_run(server.uri)
    # the server is down while the run trains: training goes on, the rows wait on disk
    cfg = apollo_cfg(gpt_data, tmp_path / "run")
    mirror = RunMirror(Target(server.uri, run_id, "all"), cfg.output_dir, 12, every_s=0)
    with pytest.warns(RuntimeWarning, match="training goes on"):
        state = Trainer(cfg, progress=False, tracker=mirror).fit()
    assert state.step == 12
    rows = metrics_rows(cfg.output_dir)
    assert pending_rows(cfg.output_dir) == len(rows)
    assert len(json.loads((cfg.output_dir / "mlflow.json").read_text())["pending"]) == 5

    with LocalServer(store, port=port):  # back: everything arrives
        assert sync(cfg.output_dir) is True
        assert history(client, run_id, "train_loss") == expected(rows, "train_loss", "loss")
        assert history(client, run_id, "eval_loss") == expected(rows, "eval_loss")
        assert len(checkpoint_names(client, run_id)) == 10
    assert pending_rows(cfg.output_dir) == 0


@pytest.mark.slow  # Ray and an MLflow server
def test_head_relay_uploads_from_the_head_node(ray_cluster, tmp_path, gpt_data):
    # rank 0 on a GPU node cannot reach the head's 127.0.0.1 server: it mirrors through an
    # actor on the head node (here the only node), over Ray, with the same results
    from ray.util.state import list_actors

    from apollo_ray.distributed import HeadRelay

    port, store = free_port(), tmp_path / "store"
    with LocalServer(store, port=port) as server:
        client, run_id = new_run(server.uri)
        cfg = apollo_cfg(gpt_data, tmp_path / "run")
        target = Target(server.uri, run_id, "all")
        relay = HeadRelay(server.uri, run_id)
        mirror = RunMirror(target, cfg.output_dir, 12, every_s=0, uploader=relay)
        Trainer(cfg, progress=False, tracker=mirror).fit()
        rows = metrics_rows(cfg.output_dir)
        assert history(client, run_id, "train_loss") == expected(rows, "train_loss", "loss")
        assert len(checkpoint_names(client, run_id)) == 10
        context = ray_cluster.get_runtime_context()  # this session's cluster, not any other
        named = [("name", "=", f"apollo-mlflow-{run_id}")]
        (actor,) = list_actors(address=context.gcs_address, filters=named)
        assert actor.node_id == context.get_node_id()
    with (cfg.output_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 13, "loss": 1.0}) + "\n")
    with pytest.warns(RuntimeWarning, match="training goes on"):
        assert mirror.flush() is False  # server down: a failed upload, not a stuck trainer
    assert pending_rows(cfg.output_dir) == 1
