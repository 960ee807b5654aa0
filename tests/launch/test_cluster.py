"""The cluster launcher files pass Ray's own config validation (offline: `ray up` has no dry
run) and keep the promises of cluster/README.md: our pinned Ray image, loopback-only services,
GPU container options on GPU nodes only, Ray's token authentication, a tracking database that
outlives the cluster, and workers with credentials of their own that reach the bucket only
(cluster/iam/). tests/launch/test_cluster_commands.py runs their commands and rsync filters."""

import copy
import json
import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

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


def test_aws_workers_get_a_role_of_their_own_that_reaches_the_bucket_only():
    """Each node type names its own instance profile; the workers' policy is the bucket's objects
    and nothing else; the head's adds what Ray's autoscaler calls (aws/node_provider.py: describe,
    run, tag and terminate instances) in the cluster's region, terminating and tagging only the
    instances tagged with this cluster, and may hand EC2 the workers' role and no other."""
    config = yaml.safe_load((ROOT / "cluster" / "gpu.yaml").read_text())
    region, cluster = config["provider"]["region"], config["cluster_name"]
    nodes = {k: v["node_config"] for k, v in config["available_node_types"].items()}
    profiles = {k: n["IamInstanceProfile"]["Arn"] for k, n in nodes.items()}
    assert profiles["head"] != profiles["gpu_worker"]
    assert all(n["ImageId"].startswith("ami-") for n in nodes.values())
    account, worker = profiles["gpu_worker"].split(":")[4], profiles["gpu_worker"].split("/")[-1]
    bucket = _mlflow_command(config).split("--artifacts-destination s3://")[1].split("/")[0]
    head = json.loads((IAM / "aws-head-policy.json").read_text())["Statement"]
    workers = json.loads((IAM / "aws-worker-policy.json").read_text())["Statement"]

    for statement in workers:
        assert all(a.startswith("s3:") and "*" not in a for a in _listed(statement["Action"]))
        for arn in _listed(statement["Resource"]):
            assert arn in (f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"), arn
    assert [s for s in head if _listed(s["Action"])[0].startswith("s3:")] == workers
    [pass_role] = [s for s in head if s["Action"] == "iam:PassRole"]
    assert pass_role["Resource"] == f"arn:aws:iam::{account}:role/{worker}"
    for statement in head:
        if statement not in workers and statement["Resource"] != "*":
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
