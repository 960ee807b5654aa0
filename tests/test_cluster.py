"""The cluster launcher files pass Ray's own config validation (offline: `ray up` has no dry
run) and keep the promises of cluster/README.md: our pinned Ray image, loopback-only services."""

import copy
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = sorted((Path(__file__).parent.parent / "cluster").glob("*.yaml"))


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
    assert f"ray[default,train,tune]=={ray.__version__}" in setup
