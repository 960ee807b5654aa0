"""A search on a two-node Ray cluster on loopback (`ray.cluster_utils.Cluster`: a head and one
more node, each with its own raylet and object store). A custom resource only the second node
has puts each trial's Ray Train worker there, while the trial's driver stays on the head. The
worker is killed after step 7 (`--kill-at-step`, its newest checkpoint is step 6's) and then its
whole node goes: the trial waits for a node that can hold its worker, resumes from its
checkpoint on the node that comes back, and the study finishes, completely recorded in MLflow.
Ray Train's checkpoints and Tune's search state are in S3 (a moto server on loopback, spoken to
over the S3 protocol as AWS would be); the runs' logs and the prepared data are in folders both
nodes see (on a real cluster: the NFS mount of cluster/README.md). The scratch frontier is the
shared tiny search's (the same base run), reused, and the trial's rows are those of the same
trial there, which ran uninterrupted in one process."""

import json
import os
import subprocess
import sys
import time

import pyarrow.fs
import pytest
import yaml
from conftest import records, reuse_frontier, timeless, tiny_study
from mlflow import MlflowClient

from apollo_ray.records.mlflow_server import local_store
from apollo_ray.records.tracking import KIND
from apollo_ray.storage import join_uri
from apollo_ray.training.faults import FAULT_MARKER


@pytest.mark.slow
def test_search_across_two_nodes_survives_losing_one(tmp_path, gpt_data, s3, tiny_search):
    from ray import tune
    from ray.cluster_utils import Cluster

    fs, _ = pyarrow.fs.FileSystem.from_uri(s3)
    path = tiny_study(tmp_path, gpt_data, "multinode", trials=1, lrs=(3.0e-3,))
    study = yaml.safe_load(path.read_text())
    study["storage_path"] = join_uri(s3, "ray")
    study["base"]["resources"].update(
        worker_group="always", max_failures=3, worker_resources={"slot": 1}
    )
    path.write_text(yaml.safe_dump(study))
    reuse_frontier(tiny_search, tmp_path / "outputs")
    out = tmp_path / "outputs" / "multinode"

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False}
    )
    other = cluster.add_node(num_cpus=1, resources={"slot": 1})
    log = tmp_path / "study.log"
    try:
        with log.open("w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "apollo_ray.tune", str(path), "--kill-at-step", "7"],
                env={**os.environ, "RAY_ADDRESS": cluster.address},
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        deadline = time.time() + 300
        killed = []
        while time.time() < deadline and proc.poll() is None and not killed:
            killed = list((out / "trials").glob(f"*/{FAULT_MARKER}"))
            time.sleep(0.1)
        assert killed, log.read_text()[-3000:]
        cluster.remove_node(other)  # and then the node that held the worker dies
        time.sleep(1)
        assert proc.poll() is None, "the study should wait for a node that can hold the worker"
        cluster.add_node(num_cpus=1, resources={"slot": 1})
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()

    text = log.read_text()
    assert text.count(": reusing ") == 2, text
    assert "mlflow: registered models:/multinode/1" in text, text
    run_dir = killed[0].parent
    resumes = run_dir / "resumes.jsonl"  # rank 0 records every resume
    assert resumes.exists(), text[-3000:]
    resumed = [json.loads(line)["step"] for line in resumes.read_text().splitlines()]
    assert resumed and set(resumed) == {6}, resumed  # from the newest checkpoint
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))  # one record
    summary = json.loads((out / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["ok"]
    # the shared tiny search ran the same trial uninterrupted, in one process: the same rows
    (ours,) = summary["trials"]
    shared = json.loads((tiny_search / "tiny" / "summary.json").read_text())["trials"]
    same = [t["trial"] for t in shared if t["params"] == ours["params"]]
    assert same, (ours, shared)
    assert timeless(run_dir) == timeless(tiny_search / "tiny" / "trials" / same[0])

    client = MlflowClient(local_store(tmp_path / "outputs")[0])
    exp = client.get_experiment_by_name("multinode")
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags[KIND] for r in runs)
    assert kinds == ["baseline", "frontier", "frontier", "study", "trial"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    trial = next(r for r in runs if r.data.tags[KIND] == "trial")
    got, want = records(client, trial.info.run_id, run_dir)
    assert got == want  # every row once, though the steps after the checkpoint ran twice
    artifacts = {a.path for a in client.list_artifacts(trial.info.run_id, "checkpoints")}
    assert "checkpoints/step-0000012.pt" in artifacts

    # the checkpoints are in the bucket, laid out like output_dir, and not beside the logs
    stored = f"bucket/ray/multinode/trials/{run_dir.name}/step-0000012/checkpoint.pt"
    assert fs.get_file_info(stored).size > 0
    assert not list(run_dir.glob("step-*"))
    assert tune.Tuner.can_restore(join_uri(s3, "ray", "tune", "multinode", "search"))
