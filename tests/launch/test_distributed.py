"""End-to-end on a real local Ray: Train workers with DDP (gloo), reported checkpoints, and a
worker killed mid-run that resumes and finishes exactly like the uninterrupted run, its MLflow
record holding every row exactly once. (That two
workers train like one accumulating two micro-batches is tested on two gloo processes without
Ray, tests/training/test_ddp.py; that one Ray Train worker computes the same floats as the
in-process path, tests/launch/test_solo.py.)"""

import pytest
from conftest import checkpoint_names, mlflow_target, records, stage_checkpoints, timeless, tiny_run

from apollo_ray.config import RunConfig
from apollo_ray.launch import distributed
from apollo_ray.training.faults import FAULT_MARKER

pytestmark = pytest.mark.slow


def cfg_for(data, out, workers=2, grad_accum=1) -> RunConfig:
    """The tiny run (3 stages) with dropout, evaluated and checkpointed every 4 steps."""
    return tiny_run(
        data,
        out,
        seed=1,
        model={"dropout": 0.1},
        train={"grad_accum": grad_accum, "eval_batches": 4, "checkpoint_every": 4},
        resources={"workers": workers, "cpus_per_worker": 1, "max_failures": 1},
    )


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, gpt_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "straight"
    result = distributed.run(cfg_for(gpt_data, out))
    return out, result


def test_two_workers_report_metrics_and_checkpoints(uninterrupted):
    out, result = uninterrupted
    rows = timeless(out)
    assert result.metrics["step"] == 12 and result.metrics["eval_loss"] < 9.0
    assert result.metrics["eval_loss"] == rows[-1]["eval_loss"]  # rank 0's own row
    assert result.checkpoint is not None and result.checkpoint.path.endswith("step-0000012")
    # stage boundaries and periodic checkpoints went through ray.train.report
    names = {p.name for p in out.iterdir() if p.is_dir()}
    assert {"step-0000012", "step-0000008", "step-0000006.pre-growth"} <= names
    assert "step-0000004" not in names  # train.keep_checkpoints = 2 periodic ones
    assert [r["n_physical"] for r in rows if "loss" in r] == [1] * 3 + [2] * 3 + [4] * 6


def test_killed_worker_resumes_and_finishes_identically(uninterrupted, gpt_data, tmp_path):
    out, result = uninterrupted
    killed = tmp_path / "killed"
    client, target = mlflow_target(tmp_path / "mlflow")
    # rows 6 (growth) and 7 follow the newest checkpoint when it dies: the group redoes them
    cfg = cfg_for(gpt_data, killed)
    resumed = distributed.run(cfg, faults={"kill_at_step": 8}, tracking=target)
    assert (killed / FAULT_MARKER).exists()  # the worker really was killed
    assert resumed.metrics["eval_loss"] == result.metrics["eval_loss"]
    assert timeless(killed) == timeless(out)
    got, want = records(client, target.run_id, killed)
    assert got == want  # every metric history is metrics.jsonl: nothing twice, nothing missing
    assert checkpoint_names(client, target.run_id) == stage_checkpoints()


def test_a_run_folder_the_driver_cannot_see_is_a_clear_error(gpt_data, tmp_path):
    # rank 0 on another node wrote its log on that node's disk: say so, not a bare KeyError later
    with pytest.raises(RuntimeError, match="every node sees"):
        distributed.check_finished(cfg_for(gpt_data, tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "diverged.txt").write_text("loss is nan at step 3\n")
    with pytest.raises(distributed.NonFiniteLossError, match="step 3"):
        distributed.check_finished(cfg_for(gpt_data, tmp_path / "elsewhere"))
