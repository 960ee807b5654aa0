"""Rank 0's mirror of a run into MLflow, against real MLflow stores and servers: every row and
the stage-wise checkpoints, each row exactly once across a crash and resume, a partial upload
and two processes uploading at once, the checkpoint a dying process saved, the checkpoint
policy, an unreachable server (nothing lost, `sync` uploads it later) and the relay through the
head node. (A killed Ray Train worker and a killed one-worker trial:
tests/launch/test_distributed.py and tests/launch/test_solo.py.)"""

import json
from pathlib import Path

import pytest
from conftest import checkpoint_names, expected, history, metrics_rows, records, tiny_run
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from apollo_ray.config import RunConfig
from apollo_ray.records import mirror
from apollo_ray.records.mirror import RunMirror, Target, Uploader, pending_rows, sync, tracked
from apollo_ray.records.mlflow_server import LocalServer, free_port, local_store
from apollo_ray.training import faults
from apollo_ray.training.checkpoints import LocalStore
from apollo_ray.training.checkpoints import load as load_checkpoint
from apollo_ray.training.faults import FaultInjection
from apollo_ray.training.trainer import Trainer


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
    assert checkpoint_names(client, run_id) == ALL  # not the periodic step-0000006
    local = download_artifacts(run_id=run_id, artifact_path="checkpoints", tracking_uri=target.uri)
    post = load_checkpoint(Path(local) / "step-0000006.post-growth.pt")  # weights_only=True
    meta = json.loads((Path(local) / "step-0000006.post-growth.json").read_text())
    assert post["n_physical"] == meta["n_physical"] == 4 and meta["step"] == 6
    assert post["run_config"]["schedule"]["depths"] == [1, 2, 4]  # enough to resume or export


STAGES = {f"step-{s:07d}.{t}-growth" for s in (3, 6) for t in ("pre", "post")}
ALL = {f"{n}.{ext}" for n in [*STAGES, "step-0000012"] for ext in ("pt", "json")}


class Died(BaseException):
    """What the fault injection's SIGKILL becomes here (the test's process must live on)."""


@pytest.mark.parametrize(
    ("fault", "resumed_from"),
    [
        ({"kill_at_step": 8}, 6),  # step 7's row was in MLflow when it died: it comes again
        ({"kill_after_checkpoint": 3}, 3),  # its pre-growth checkpoint was never announced
    ],
)
def test_a_crashed_and_resumed_run_is_recorded_exactly_once(
    tmp_path, gpt_data, monkeypatch, fault, resumed_from
):
    uri, artifacts = local_store(tmp_path / "store")
    client, run_id = new_run(uri, artifacts)
    cfg = apollo_cfg(gpt_data, tmp_path / "run")
    target = Target(uri, run_id, "all", every_s=0)  # every row uploaded as soon as it may be

    def die(pid, signal):
        raise Died

    monkeypatch.setattr(faults.os, "kill", die)
    dying = FaultInjection(cfg.output_dir, **fault)
    with pytest.raises(Died):
        mirrored = RunMirror(target, cfg.output_dir, 12)
        Trainer(cfg, progress=False, tracker=mirrored, faults=dying).fit()
    resumed = Trainer(cfg, progress=False, tracker=RunMirror(target, cfg.output_dir, 12))
    assert resumed.state.step == resumed_from
    resumed.fit()
    got, want = records(client, run_id, cfg.output_dir)
    assert got == want  # every metric: nothing twice, nothing missing
    assert checkpoint_names(client, run_id) == ALL
    assert pending_rows(cfg.output_dir) == 0


def test_the_driver_uploads_the_checkpoints_a_dead_worker_left(tmp_path, gpt_data):
    # a run trained without announcing its checkpoints (its rank 0 died after each save): the
    # driver finds them in its storage, and every row, at the end
    uri, artifacts = local_store(tmp_path / "store")
    client, run_id = new_run(uri, artifacts)
    cfg = apollo_cfg(gpt_data, tmp_path / "run")
    Trainer(cfg, progress=False).fit()
    assert sync(cfg.output_dir) is None  # never tracked
    RunMirror(Target(uri, run_id, "all"), cfg.output_dir, 12)
    store = LocalStore(cfg.output_dir, cfg.train.keep_checkpoints)
    assert sync(cfg.output_dir, ended=False, store=store) is True
    got, want = records(client, run_id, cfg.output_dir)
    assert got == want
    assert checkpoint_names(client, run_id) == ALL


def rows_file(run_dir: Path, n: int) -> None:
    run_dir.mkdir(parents=True)
    rows = [{"step": i, "loss": 5.0 - i / n, "lr": 1e-3, "time": 1.7e9 + i} for i in range(n)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


class Flaky(Uploader):
    """An uploader whose second call fails (MLflow went away mid-upload)."""

    calls = 0

    def log_batch(self, run_id, metrics, patient):
        Flaky.calls += 1
        if Flaky.calls == 2:
            raise ConnectionError("connection reset")
        super().log_batch(run_id, metrics, patient)


def test_a_partial_upload_moves_the_cursor_by_the_rows_it_sent(tmp_path, monkeypatch):
    uri, artifacts = local_store(tmp_path / "store")
    client, run_id = new_run(uri, artifacts)
    rows_file(tmp_path / "run", 30)
    monkeypatch.setattr(mirror, "BATCH", 20)  # 10 rows of 2 metrics per batch
    mirrored = RunMirror(Target(uri, run_id, "none"), tmp_path / "run", 29, uploader=Flaky(uri))
    mirrored.checkpoint("step-0000029", "unused", {})  # every row is final
    with pytest.warns(RuntimeWarning, match="training goes on"):
        assert mirrored.flush() is False
    assert tracked(tmp_path / "run")["rows"] == 10  # the first batch is in, the second not
    assert mirrored.flush() is True
    got, want = records(client, run_id, tmp_path / "run")
    assert got == want and len(got["train_loss"]) == 30


def test_two_processes_uploading_the_same_rows_record_them_once(tmp_path):
    # the study driver syncs a trial that ASHA stopped while its rank 0 still uploads
    uri, artifacts = local_store(tmp_path / "store")
    client, run_id = new_run(uri, artifacts)
    rows_file(tmp_path / "run", 30)
    target = Target(uri, run_id, "none")
    rank0 = RunMirror(target, tmp_path / "run", 29)
    rank0.checkpoint("step-0000020", "unused", {})
    assert sync(tmp_path / "run", ended=True) is True  # the driver: all 30 rows
    assert rank0.flush() is True  # rank 0's cursor was still at 0: 30 rows again
    got, want = records(client, run_id, tmp_path / "run")
    assert got == want


@pytest.mark.parametrize(
    ("policy", "logged"),
    [("all", {"pre", "post", "final"}), ("last", {"final"}), ("none", set())],
)
def test_checkpoint_policy(tmp_path, policy, logged):
    mirrored = RunMirror(
        Target(f"sqlite:///{tmp_path / 'unused.db'}", "r", policy), tmp_path, final_step=12
    )
    names = {"pre": "step-0000003.pre-growth", "post": "step-0000003.post-growth"}
    names |= {"final": "step-0000012", "periodic": "step-0000006"}
    assert {k for k, name in names.items() if mirrored.wants(name)} == logged


@pytest.mark.slow  # an MLflow server
def test_unreachable_server_loses_nothing(tmp_path, gpt_data):
    store = tmp_path / "store"
    server = LocalServer(store)
    client, run_id = new_run(*local_store(store))  # its run, in the store it will serve
    # the server is down while the run trains: training goes on, the rows wait on disk
    cfg = apollo_cfg(gpt_data, tmp_path / "run")
    mirrored = RunMirror(Target(server.uri, run_id, "all"), cfg.output_dir, 12, every_s=0)
    with pytest.warns(RuntimeWarning, match="training goes on"):
        state = Trainer(cfg, progress=False, tracker=mirrored).fit()
    assert state.step == 12
    rows = metrics_rows(cfg.output_dir)
    assert pending_rows(cfg.output_dir) == len(rows)
    assert len(json.loads((cfg.output_dir / "mlflow.json").read_text())["pending"]) == 5

    with server:  # up: everything arrives
        assert sync(cfg.output_dir) is True
        assert history(client, run_id, "train_loss") == expected(rows, "train_loss", "loss")
        assert history(client, run_id, "eval_loss") == expected(rows, "eval_loss")
        assert len(checkpoint_names(client, run_id)) == 10
    assert pending_rows(cfg.output_dir) == 0


@pytest.mark.slow  # Ray and an MLflow server
def test_head_relay_uploads_from_the_head_node(ray_cluster, tmp_path, gpt_data):
    # rank 0 on a GPU node cannot reach the head's 127.0.0.1 server: it mirrors through an
    # actor on the head node (here the only node; tests/launch/test_multinode.py has rank 0 on
    # another node), over Ray, with the same results
    from apollo_ray.launch.distributed import HeadRelay

    port, store = free_port(), tmp_path / "store"
    with LocalServer(store, port=port) as server:
        client, run_id = new_run(server.uri)
        cfg = apollo_cfg(gpt_data, tmp_path / "run")
        target = Target(server.uri, run_id, "all")
        relay = HeadRelay(server.uri, run_id)
        mirrored = RunMirror(target, cfg.output_dir, 12, every_s=0, uploader=relay)
        Trainer(cfg, progress=False, tracker=mirrored).fit()
        rows = metrics_rows(cfg.output_dir)
        assert history(client, run_id, "train_loss") == expected(rows, "train_loss", "loss")
        assert len(checkpoint_names(client, run_id)) == 10
        # one named relay per run: a restarted rank 0 finds it
        assert ray_cluster.get_actor(f"apollo-mlflow-{run_id}") is not None
    with (cfg.output_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 13, "loss": 1.0}) + "\n")
    mirrored.checkpoint("step-0000013", "unused", {})  # row 13 is final: to be uploaded
    with pytest.warns(RuntimeWarning, match="training goes on"):
        assert mirrored.flush() is False  # server down: a failed upload, not a stuck trainer
    assert pending_rows(cfg.output_dir) == 1
