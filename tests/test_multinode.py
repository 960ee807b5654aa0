"""A search on a two-node Ray cluster on loopback (`ray.cluster_utils.Cluster`: a head and one
more node, each with its own raylet and object store), with a custom resource that puts one
of each trial's two Ray Train workers on each node. The non-head node is killed in the middle
of the trial and comes back: the trial resumes from its checkpoint and the study finishes,
completely recorded in MLflow. The prepared data, the Ray Train checkpoints and Tune's search
state are in S3 (a moto server on loopback, spoken to over the S3 protocol as AWS would be);
the runs' logs are in a folder both nodes see (on a real cluster: the NFS mount of
cluster/README.md). Every row of the trial's metrics.jsonl is in its MLflow run exactly once."""

import json
import os
import subprocess
import sys
import time

import pyarrow.fs
import pytest
import yaml
from conftest import records, tiny_study, upload
from mlflow import MlflowClient

from apollo_ray.mlflow_server import local_store
from apollo_ray.storage import join_uri
from apollo_ray.tracking import KIND

STEPS, EVERY = 160, 40  # growths at steps 40 and 80: checkpoints too


def last_step(metrics) -> int:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.slow
def test_search_across_two_nodes_survives_losing_one(tmp_path, gpt_data, s3):
    from ray import tune
    from ray.cluster_utils import Cluster

    fs, _ = pyarrow.fs.FileSystem.from_uri(s3)
    path = tiny_study(tmp_path, gpt_data, "multinode", trials=1, lrs=(3.0e-3,))
    study = yaml.safe_load(path.read_text())
    study["frontier"] = [0.125, 1.0]  # the least scratch training a frontier can have here
    study["storage_path"] = join_uri(s3, "ray")
    study["base"]["data"]["path"] = upload(gpt_data, s3, "data")
    study["base"]["train"].update(steps=STEPS, checkpoint_every=EVERY, eval_every=EVERY)
    study["base"]["train"]["log_every"] = 10
    study["base"]["resources"].update(workers=2, max_failures=3, worker_resources={"slot": 1})
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "outputs" / "multinode"

    head = {"num_cpus": 2, "resources": {"slot": 1}}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    other = cluster.add_node(num_cpus=1, resources={"slot": 1})
    log = tmp_path / "study.log"
    try:
        with log.open("w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "apollo_ray.tune", str(path)],
                env={**os.environ, "RAY_ADDRESS": cluster.address},
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        deadline = time.time() + 400
        trial_metrics = None
        while time.time() < deadline and proc.poll() is None:
            found = list((out / "trials").glob("*/metrics.jsonl"))
            if found and last_step(found[0]) >= EVERY + 20:  # past its first checkpoint
                trial_metrics = found[0]
                break
            time.sleep(0.2)
        assert trial_metrics is not None, log.read_text()[-3000:]
        cluster.remove_node(other)  # the node with one of the trial's workers dies
        time.sleep(5)
        assert proc.poll() is None, "the study should wait for the node to come back"
        cluster.add_node(num_cpus=1, resources={"slot": 1})
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()

    resumes = trial_metrics.parent / "resumes.jsonl"  # rank 0 records every resume
    assert resumes.exists(), log.read_text()[-3000:]
    resumed = [json.loads(line)["step"] for line in resumes.read_text().splitlines()]
    assert resumed and all(s % EVERY == 0 and s >= EVERY for s in resumed), resumed
    rows = [json.loads(line) for line in trial_metrics.read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(10, STEPS + 1, 10))  # one uninterrupted record after the resume
    summary = json.loads((out / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["ok"]

    client = MlflowClient(local_store(tmp_path / "outputs")[0])
    exp = client.get_experiment_by_name("multinode")
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags[KIND] for r in runs)
    assert kinds == ["baseline", "frontier", "frontier", "study", "trial"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    trial = next(r for r in runs if r.data.tags[KIND] == "trial")
    got, want = records(client, trial.info.run_id, trial_metrics.parent)
    assert got == want  # every row once, though the steps after the checkpoint ran twice
    artifacts = {a.path for a in client.list_artifacts(trial.info.run_id, "checkpoints")}
    assert f"checkpoints/step-{STEPS:07d}.pt" in artifacts

    # the checkpoints are in the bucket, laid out like output_dir, and not beside the logs
    trial_id = trial_metrics.parent.name
    stored = fs.get_file_info(pyarrow.fs.FileSelector(f"bucket/ray/multinode/trials/{trial_id}"))
    assert f"step-{STEPS:07d}" in {i.base_name for i in stored}
    assert (
        fs.get_file_info(
            f"bucket/ray/multinode/trials/{trial_id}/step-{STEPS:07d}/checkpoint.pt"
        ).size
        > 0
    )
    assert not list(trial_metrics.parent.glob("step-*"))
    baselines = fs.get_file_info(pyarrow.fs.FileSelector("bucket/ray/baselines", recursive=True))
    assert any(i.base_name == "checkpoint.pt" for i in baselines)
    assert tune.Tuner.can_restore(join_uri(s3, "ray", "multinode", "tune", "search"))
