"""One-worker runs without a worker group (`apollo_ray.launch.solo`) on a real local Ray: the same
rows and checkpoints as the one-worker Ray Train run, and a process killed mid-run that Ray
retries and that resumes from its newest checkpoint, finishing identically, with its MLflow
record holding every row exactly once and the checkpoint it saved just before dying."""

import json

import pytest
from conftest import checkpoint_names, mlflow_target, records, stage_checkpoints, timeless, tiny_run

from apollo_ray.config import RunConfig
from apollo_ray.launch import distributed, solo
from apollo_ray.training.checkpoints import is_checkpoint
from apollo_ray.training.faults import FAULT_MARKER
from apollo_ray.training.runlog import NonFiniteLossError

pytestmark = pytest.mark.slow


def cfg_for(data, out, **train) -> RunConfig:
    """The tiny run (3 stages) with dropout, on one worker of one CPU, checkpointed every 4."""
    return tiny_run(
        data,
        out,
        seed=1,
        model={"dropout": 0.1},
        train={"eval_batches": 4, "checkpoint_every": 4, **train},
        resources={"workers": 1, "cpus_per_worker": 1, "max_failures": 1},
    )


def checkpoints(folder) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_dir() and is_checkpoint(p.name)}


@pytest.fixture(scope="module")
def ray_train(ray_cluster, gpt_data, tmp_path_factory):
    """The same run through a one-worker TorchTrainer (its checkpoints in its own folder)."""
    out = tmp_path_factory.mktemp("ray-train") / "run"
    distributed.run(cfg_for(gpt_data, out))
    return out


def test_in_process_run_is_bit_identical_to_ray_train(ray_train, gpt_data, tmp_path):
    out = tmp_path / "run"
    last = solo.run(cfg_for(gpt_data, out), storage_path=str(tmp_path))
    rows = timeless(out)
    assert rows == timeless(ray_train)  # every loss, eval loss, norm, FLOPs: the same floats
    assert last["step"] == 12 and last["eval_loss"] == rows[-1]["eval_loss"]
    assert (
        checkpoints(out)
        == checkpoints(ray_train)
        == {
            "step-0000003.pre-growth",
            "step-0000003.post-growth",
            "step-0000006.pre-growth",
            "step-0000006.post-growth",
            "step-0000008",
            "step-0000012",
        }
    )


@pytest.mark.parametrize(
    "fault",
    [
        {"kill_at_step": 8},  # rows 6 (growth) and 7 follow its newest checkpoint: redone
        {"kill_after_checkpoint": 6},  # its pre-growth checkpoint was saved, never announced
    ],
)
def test_killed_process_resumes_and_finishes_identically(ray_train, gpt_data, tmp_path, fault):
    out = tmp_path / "run"
    client, target = mlflow_target(tmp_path / "mlflow")
    solo.run(cfg_for(gpt_data, out), storage_path=str(tmp_path), faults=fault, tracking=target)
    assert (out / FAULT_MARKER).exists()  # the process really was killed
    resumes = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumes] == [6]
    assert timeless(out) == timeless(ray_train)
    got, want = records(client, target.run_id, out)
    assert got == want  # every metric history is metrics.jsonl: nothing twice, nothing missing
    assert checkpoint_names(client, target.run_id) == stage_checkpoints()


def test_a_diverged_run_stops_and_its_retry_does_not_train_again(ray_cluster, gpt_data, tmp_path):
    cfg = cfg_for(gpt_data, tmp_path / "run", lr=1.0e9)
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        solo.run(cfg, storage_path=str(tmp_path))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        solo.run(cfg, storage_path=str(tmp_path))  # what a retried trial does
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
