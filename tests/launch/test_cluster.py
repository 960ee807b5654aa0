"""The cluster launcher files pass Ray's own config validation (offline: `ray up` has no dry
run) and keep the promises of cluster/README.md: our pinned Ray image, loopback-only services,
GPU container options on GPU nodes only, Ray's token authentication, a tracking database that
outlives the cluster, and workers with credentials of their own that write only where trials
write (cluster/iam/, evaluated against where the code puts each file).
tests/launch/test_cluster_commands.py runs their commands and rsync filters."""

import copy
import fnmatch
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from apollo_ray.storage import join_uri
from apollo_ray.study.schema import BASELINES, load_study

CLUSTER = sorted((Path(__file__).parents[2] / "cluster").glob("*.yaml"))


def test_there_are_cluster_files():
    assert {p.name for p in CLUSTER} == {"gpu.yaml", "gpu-gcp.yaml"}


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_ray_validates_the_cluster_file(path):
    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))

    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # a typo Ray must catch
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_cluster_file_pins_our_ray_and_binds_loopback(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "0.0.0.0" not in text
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server --host 127.0.0.1" in head and "--dashboard-host=127.0.0.1" in head
    setup = " ".join(config["setup_commands"])
    assert "-c ~/apollo_ray/requirements.lock" in setup  # the lock pins Ray (tests/test_lock.py)
    assert f"\nray=={ray.__version__}\n" in (ROOT / "requirements.lock").read_text()


ROOT = Path(__file__).parents[2]
IAM = ROOT / "cluster" / "iam"


def _env(options: list[str]) -> dict[str, str]:
    pairs = [o.removeprefix("--env=").split("=", 1) for o in options if o.startswith("--env=")]
    return dict(pairs)


def _mlflow_command(config: dict) -> str:
    [cmd] = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    return cmd


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_gpu_container_options_on_gpu_nodes_only(path):
    docker = yaml.safe_load(path.read_text())["docker"]
    everywhere = " ".join(docker["run_options"] + docker["head_run_options"])
    workers = " ".join(docker["worker_run_options"])
    for option in ("--gpus all", "--shm-size=", "memlock=-1"):
        assert option in workers and option not in everywhere, option


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_token_authentication_on_every_node(path):
    """Ray reads RAY_AUTH_MODE and the token file from the environment of `ray start` and of
    every driver: the container's, on head and workers alike; the file is a file mount, which
    `ray up` copies from your machine to the head and the head to each worker."""
    config = yaml.safe_load(path.read_text())
    env = _env(config["docker"]["run_options"])
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] in config["file_mounts"]


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_tracking_database_outlives_the_cluster(path):
    """The default store is SQLite on the shared file system (not in the head's container), with
    one server process writing it; the shared folders belong to the container's user, not 1777."""
    config = yaml.safe_load(path.read_text())
    db = "sqlite:////mnt/shared/mlflow/mlflow.db"
    assert _env(config["docker"]["head_run_options"])["MLFLOW_BACKEND_URI"] == f"'{db}'"
    cmd = _mlflow_command(config)
    assert f"${{MLFLOW_BACKEND_URI:-{db}}}" in cmd and "--workers 1" in cmd
    init = " ".join(config["initialization_commands"])
    assert "install -d -o 1000 -g 100 -m 0750 /mnt/shared/mlflow" in init
    assert "chmod 0775 /mnt/shared" in init and "1777" not in init


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def _allowed(statements: list[dict], action: str, arn: str) -> bool:
    """IAM's verdict for one action on one resource (`*` and `?` in a resource match any
    characters, `/` included): an explicit Deny wins, else an Allow, else no."""

    def matches(s: dict) -> bool:
        return action in _listed(s["Action"]) and any(
            fnmatch.fnmatchcase(arn, r) for r in _listed(s["Resource"])
        )

    effects = {s["Effect"] for s in statements if matches(s)}
    return "Allow" in effects and "Deny" not in effects


def _keys_by_writer() -> tuple[str, dict[str, list[str]]]:
    """The bucket and its object keys, by who writes them, where the code puts them: a study
    of cluster's (search_spaces/bert.yaml) with its storage_path and data in the bucket, MLflow's
    artifacts where the cluster file sends them."""
    config = yaml.safe_load((ROOT / "cluster" / "gpu.yaml").read_text())
    artifacts = _mlflow_command(config).split("--artifacts-destination ")[1].split()[0]
    study = load_study(ROOT / "search_spaces" / "bert.yaml")
    assert study.storage_path.startswith("s3://YOUR-BUCKET/")
    head_only = [
        study.search_state("search", name)
        for name in ("tuner.pkl", "experiment_state-2026-12-06.json", "searcher-state.pkl")
    ] + [
        study.search_state("search", "trial01", "error.pkl"),
        study.storage(study.experiment, "trials", "trial01", "checkpoint_manager_snapshot.json"),
        study.storage(study.experiment, "trials", "trial01", ".validate_storage_marker"),
        join_uri(study.base.data.path, "manifest.json"),
        join_uri(study.base.data.path, "train-00000.arrow"),
        join_uri(artifacts, "1", "models", "m-1", "artifacts", "model.pt"),
    ]
    workers = [
        study.storage(study.experiment, "trials", "trial01", "step-100", "checkpoint.pt"),
        study.storage(study.experiment, "trials", "trial01", "checkpoint_000001", "x.pt"),
        study.storage(BASELINES, "a1b2", "run", "step-100", "checkpoint.pt"),
    ]
    bucket = config["head_start_ray_commands"][-1].split("s3://")[1].split("/")[0]

    def key(uri: str) -> str:
        return uri.split("://", 1)[1].split("/", 1)[1]

    return bucket, {"head": list(map(key, head_only)), "workers": list(map(key, workers))}


def test_aws_workers_write_only_where_trials_write():
    """The workers' policy, evaluated as IAM would: they read the data and checkpoints, write
    and delete the trials' and baselines' checkpoints (where the code puts them), and cannot
    write Tune's state, the Ray Train files the head reads back, the data or MLflow's
    artifacts; the head's policy writes all of the bucket's objects."""
    bucket, keys = _keys_by_writer()
    workers = json.loads((IAM / "aws-worker-policy.json").read_text())["Statement"]
    head = json.loads((IAM / "aws-head-policy.json").read_text())["Statement"]
    for action in ("s3:PutObject", "s3:DeleteObject"):
        for key in keys["workers"]:
            assert _allowed(workers, action, f"arn:aws:s3:::{bucket}/{key}"), (action, key)
        for key in keys["head"]:
            assert not _allowed(workers, action, f"arn:aws:s3:::{bucket}/{key}"), (action, key)
            assert _allowed(head, action, f"arn:aws:s3:::{bucket}/{key}"), (action, key)
    data = keys["head"][-3]
    assert _allowed(workers, "s3:GetObject", f"arn:aws:s3:::{bucket}/{data}")
    actions = {a for s in workers for a in _listed(s["Action"])}
    assert all(a.startswith("s3:") and "*" not in a for a in actions)


def _gcp_conditions(bucket: str) -> dict[str, str]:
    """The worker's two IAM Conditions of gcp-iam.sh, as the script builds them."""
    script = (IAM / "gcp-iam.sh").read_text()
    lines = [ln for ln in script.splitlines() if ln.startswith(("objects=", "reads=", "writes="))]
    shown = subprocess.run(
        ["bash", "-c", "\n".join([*lines, 'printf "%s\\n" "$reads" "$writes"'])],
        env={"BUCKET": bucket, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return dict(zip(("reads", "writes"), shown, strict=True))


def _cel(expression: str, name: str, kind: str = "storage.googleapis.com/Object") -> bool:
    """The CEL of an IAM Condition on one resource, for the forms the script uses."""
    python = (
        expression.replace("&&", " and ")
        .replace("||", " or ")
        .replace("!resource", " not resource")
        .replace(".startsWith(", ".startswith(")
        .replace(".endsWith(", ".endswith(")
    )
    assert set(re.findall(r"resource\.\w+", python)) <= {"resource.name", "resource.type"}
    resource = type("Resource", (), {"name": name, "type": kind})
    return eval(python, {"__builtins__": {}}, {"resource": resource})


def test_gcp_workers_write_only_where_trials_write():
    bucket, keys = _keys_by_writer()
    conditions = _gcp_conditions(bucket)
    objects = f"projects/_/buckets/{bucket}/objects"
    for key in keys["workers"]:
        assert _cel(conditions["writes"], f"{objects}/{key}"), key
    for key in keys["head"]:
        assert not _cel(conditions["writes"], f"{objects}/{key}"), key
    assert _cel(conditions["reads"], f"{objects}/{keys['head'][-3]}")  # the data
    assert _cel(
        conditions["reads"], f"projects/_/buckets/{bucket}", "storage.googleapis.com/Bucket"
    )
    assert not _cel(conditions["reads"], f"{objects}/{keys['head'][-1]}")  # MLflow's


def test_aws_head_may_run_this_clusters_nodes_only():
    """The head's policy adds what Ray's autoscaler calls (aws/node_provider.py: describe,
    run, tag and terminate instances) in the cluster's region, terminating and tagging only the
    instances tagged with this cluster, and may hand EC2 the workers' role and no other; each
    node type names its own instance profile."""
    config = yaml.safe_load((ROOT / "cluster" / "gpu.yaml").read_text())
    region, cluster = config["provider"]["region"], config["cluster_name"]
    nodes = {k: v["node_config"] for k, v in config["available_node_types"].items()}
    profiles = {k: n["IamInstanceProfile"]["Arn"] for k, n in nodes.items()}
    assert profiles["head"] != profiles["gpu_worker"]
    assert all(n["ImageId"].startswith("ami-") for n in nodes.values())
    account, worker = profiles["gpu_worker"].split(":")[4], profiles["gpu_worker"].split("/")[-1]
    head = json.loads((IAM / "aws-head-policy.json").read_text())["Statement"]
    [pass_role] = [s for s in head if s["Action"] == "iam:PassRole"]
    assert pass_role["Resource"] == f"arn:aws:iam::{account}:role/{worker}"
    for statement in head:
        if not _listed(statement["Action"])[0].startswith("s3:") and statement["Resource"] != "*":
            for arn in _listed(statement["Resource"]):
                assert arn.split(":")[3] in (region, ""), arn  # "": IAM is global
    terminate = [s for s in head if "ec2:TerminateInstances" in _listed(s["Action"])]
    assert [s["Condition"]["StringEquals"] for s in terminate] == [
        {"aws:ResourceTag/ray-cluster-name": cluster}
    ]


def test_gcp_workers_get_a_service_account_of_their_own():
    config = yaml.safe_load((ROOT / "cluster" / "gpu-gcp.yaml").read_text())
    nodes = {k: v["node_config"] for k, v in config["available_node_types"].items()}
    emails = {k: n["serviceAccounts"][0]["email"] for k, n in nodes.items()}
    assert emails["head"] != emails["gpu_worker"]
    script = (IAM / "gcp-iam.sh").read_text()
    for email in emails.values():
        assert email.split("@")[0] in script
    subprocess.run(["bash", "-n", str(IAM / "gcp-iam.sh")], check=True)
    for node in nodes.values():
        assert node["tags"] == {"items": ["apollo-ray"]}  # the firewall rules' target
        [disk] = node["disks"]
        assert disk["initializeParams"]["diskType"].endswith("/pd-balanced")
    assert nodes["gpu_worker"]["scheduling"] == {"onHostMaintenance": "TERMINATE"}  # an object
