"""A study on an autoscaling cluster that starts with its head alone, as `ray up cluster/gpu.yaml`
leaves it (`min_workers: 0`): Ray's fake multi-node provider (`RAY_FAKE_CLUSTER`, the provider
behind `ray.cluster_utils.AutoscalingCluster`) launches nodes on this machine as Ray processes.
A custom resource, `fake_gpu`, stands in for the GPUs only the worker node type has. The
resource pre-flight reads the autoscaler's node types, passes the study and asks the autoscaler
for the first trial's node; the node comes up, the trial trains on it (the scratch frontier is
the shared tiny search's, reused), and it is released after its idle timeout once the study has
cleared its request. The study's output, not on a terminal, is a line per trial event and the
end, nothing of Ray's or Tune's.

`AutoscalingCluster.start` runs `ray stop --force`, which would also stop the test session's own
Ray, so the head is started the way `ray.cluster_utils.Cluster` starts one, with the autoscaler
config of `ray start --autoscaling-config`; the wheel lacks the provider's `example.yaml`, so
the config is written here."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml
from conftest import reuse_frontier, tiny_study

WORKER_TYPE = "gpu_worker"


def fake_cluster_config(gcs_address: str) -> dict:
    """The autoscaler config: a head with 1 CPU and up to one worker with 1 CPU and a
    `fake_gpu`, released after 3 idle seconds."""
    return {
        "cluster_name": "apollo-autoscaling-test",
        "max_workers": 1,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {
                "resources": {"CPU": 1, "fake_gpu": 1, "object_store_memory": 100 * 2**20},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.05,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def worker_nodes(cluster) -> int:
    """How many alive nodes of the worker type (the ones holding `fake_gpu`) there are."""
    nodes = cluster.global_state.node_table()
    return sum(1 for n in nodes if n["Alive"] and n["Resources"].get("fake_gpu"))


def stop_leftovers(gcs_address: str) -> None:
    """Kill Ray processes of this cluster that outlived its head (a worker node the autoscaler
    had not released), matched by the GCS address on their command line."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if any(gcs_address in part for part in process.info["cmdline"] or []):
            process.kill()


@pytest.mark.slow
def test_study_grows_an_autoscaling_cluster_from_its_head_alone(
    tmp_path, gpt_data, tiny_search, monkeypatch
):
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    # Ray dials this machine's address even when told 127.0.0.1, so the head listens there
    port = free_port()
    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(f"{get_node_ip_address()}:{port}")))
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")  # read by the autoscaler the head starts
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")

    path = tiny_study(tmp_path, gpt_data, "autoscale", trials=1, lrs=(3.0e-3,))
    study = yaml.safe_load(path.read_text())
    study["base"]["resources"]["worker_resources"] = {"fake_gpu": 1}
    path.write_text(yaml.safe_dump(study))
    # the same base as the shared tiny search: its scratch frontier is reused, so only the
    # trial needs the worker node (the frontier's Ray tasks would ask for it the same way)
    reuse_frontier(tiny_search, tmp_path / "outputs")
    scratch = sorted((tmp_path / "outputs" / "baselines").glob("*/metrics.jsonl"))
    mtimes = [p.stat().st_mtime_ns for p in scratch]

    head = {"num_cpus": 1, "gcs_server_port": port, "include_dashboard": False}
    cluster = Cluster(
        initialize_head=True, head_node_args={**head, "autoscaling_config": str(config)}
    )
    address = cluster.address
    log = tmp_path / "study.log"
    seen = 0
    assert worker_nodes(cluster) == 0
    try:
        with log.open("w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "apollo_ray.tune", str(path)],
                env={**os.environ, "RAY_ADDRESS": address},
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            seen = max(seen, worker_nodes(cluster))
            time.sleep(0.2)
        assert proc.wait(timeout=10) == 0, log.read_text()[-3000:]
        assert seen == 1, "the autoscaler should have launched one worker node"
        deadline = time.time() + 60
        while worker_nodes(cluster) and time.time() < deadline:
            time.sleep(0.2)
        assert worker_nodes(cluster) == 0, "the idle worker node should have been released"
    finally:
        if "proc" in locals() and proc.poll() is None:
            proc.kill()
        cluster.shutdown()
        stop_leftovers(address)

    text = log.read_text()
    assert "asked the autoscaler for nodes for the first trial (1 x 1 CPU, 1 fake_gpu)" in text
    # a study with the same model, data and budget reuses the scratch runs, untouched
    assert text.count(": reusing ") == 2, text
    assert len(scratch) == 2 and [p.stat().st_mtime_ns for p in scratch] == mtimes
    # a calm terminal: a line as the trial starts and one as it ends (no terminal here), the
    # table and where to look; no Tune status tables, no worker logs
    assert re.findall(r"^trial \w+ (started|finished)", text, re.M) == ["started", "finished"]
    assert "\r" not in text and "MLflow UI: python -m apollo_ray.ui" in text
    for noise in ("Trial status", "RayTrainWorker pid=", "Reporting training result", "[I "):
        assert noise not in text
    assert len(text.splitlines()) < 30, text
    summary = json.loads((tmp_path / "outputs" / "autoscale" / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["ok"]
