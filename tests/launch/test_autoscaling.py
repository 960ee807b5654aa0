"""A study on an autoscaling cluster that starts with its head alone, as `ray up cluster/gpu.yaml`
leaves it (`min_workers: 0`): Ray's fake multi-node provider (`RAY_FAKE_CLUSTER`, the provider
behind `ray.cluster_utils.AutoscalingCluster`) launches nodes on this machine as Ray processes.
A custom resource, `fake_gpu`, stands in for the GPUs only the worker node type has. The
resource pre-flight reads the autoscaler's node types, passes the study and asks the autoscaler
for the first trial's node; the node comes up, the trial trains on it (the scratch frontier is
the shared tiny search's, reused), and it is released after its idle timeout once the study has
cleared its request. The study's output, not on a terminal, is a line per trial event and the
end, nothing of Ray's or Tune's. A study killed by SIGKILL does not keep its node either.

`AutoscalingCluster.start` runs `ray stop --force`, which would also stop the test session's own
Ray, so the head is started the way `ray.cluster_utils.Cluster` starts one, with the autoscaler
config of `ray start --autoscaling-config`; the wheel lacks the provider's `example.yaml`, so
the config is written here."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def fake_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """A head of 1 CPU whose autoscaler (the fake multi-node provider) may add one worker node
    with a `fake_gpu`, released after 3 idle seconds; stopped at the end with whatever it
    launched."""
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    # Ray dials this machine's address even when told 127.0.0.1, so the head listens there
    port = free_port()
    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(f"{get_node_ip_address()}:{port}")))
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")  # read by the autoscaler the head starts
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
    head = {"num_cpus": 1, "gcs_server_port": port, "include_dashboard": False}
    cluster = Cluster(
        initialize_head=True, head_node_args={**head, "autoscaling_config": str(config)}
    )
    address = cluster.address
    try:
        yield cluster
    finally:
        cluster.shutdown()
        stop_leftovers(address)


def gpu_study(tmp_path: Path, gpt_data: Path, tiny_search: Path) -> Path:
    """A one-trial study whose worker needs the worker node's `fake_gpu`, with the same base as
    the shared tiny search, whose scratch frontier it reuses: only the trial needs the node (the
    frontier's Ray tasks would ask for it the same way)."""
    path = tiny_study(tmp_path, gpt_data, "autoscale", trials=1, lrs=(3.0e-3,))
    study = yaml.safe_load(path.read_text())
    study["base"]["resources"]["worker_resources"] = {"fake_gpu": 1}
    path.write_text(yaml.safe_dump(study))
    reuse_frontier(tiny_search, tmp_path / "outputs")
    return path


def start_study(path: Path, address: str, log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "apollo_ray.tune", str(path)],
            env={**os.environ, "RAY_ADDRESS": address},
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def wait_for(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.slow
def test_study_grows_an_autoscaling_cluster_from_its_head_alone(
    tmp_path, gpt_data, tiny_search, monkeypatch
):
    path = gpu_study(tmp_path, gpt_data, tiny_search)
    scratch = sorted((tmp_path / "outputs" / "baselines").glob("*/metrics.jsonl"))
    mtimes = [p.stat().st_mtime_ns for p in scratch]
    log = tmp_path / "study.log"
    seen = 0
    with fake_cluster(tmp_path, monkeypatch) as cluster:
        assert worker_nodes(cluster) == 0
        proc = start_study(path, cluster.address, log)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                seen = max(seen, worker_nodes(cluster))
                time.sleep(0.2)
            assert proc.wait(timeout=10) == 0, log.read_text()[-3000:]
        finally:
            proc.kill()
        assert seen == 1, "the autoscaler should have launched one worker node"
        released = wait_for(lambda: worker_nodes(cluster) == 0, 60)
        assert released, "the idle worker node should have been released"

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


@pytest.mark.slow
def test_a_study_killed_by_sigkill_leaves_no_node_running(
    tmp_path, gpt_data, tiny_search, monkeypatch
):
    """The study's driver killed by SIGKILL (no `finally` runs) once the node it asked for is
    up: its watchdog on the head withdraws the request, so the node, idle once the job's
    actors are gone, is released after its idle timeout, within a minute; the watchdog is
    gone too. Without the watchdog the request would keep the node until `ray down`."""
    path = gpu_study(tmp_path, gpt_data, tiny_search)
    log = tmp_path / "study.log"
    with fake_cluster(tmp_path, monkeypatch) as cluster:
        proc = start_study(path, cluster.address, log)
        try:
            up = wait_for(lambda: worker_nodes(cluster) == 1 or proc.poll() is not None, 180)
            assert up and proc.poll() is None, log.read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            proc.kill()
        released = wait_for(lambda: worker_nodes(cluster) == 0, 60)
        assert released, "the killed study's node should have been released"
        actors = cluster.global_state.actor_table(None).values()
        watchdogs = [a for a in actors if a["Name"].startswith("request-watchdog-")]
        assert [a["State"] for a in watchdogs] == ["DEAD"]
    assert "asked the autoscaler for nodes for the first trial" in log.read_text()
