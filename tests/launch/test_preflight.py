"""The cheap checks before a run or study: placeholders, the machine, storage reachability."""

import time

import pytest

from apollo_ray.config import ConfigError, ResourcesConfig
from apollo_ray.launch.preflight import join_ray, machine, placeholders, storage


def test_placeholders_name_every_field_that_holds_one():
    fields = {
        "storage_path": "s3://YOUR-BUCKET/apollo/ray",
        "base.data.path": "s3://YOUR-BUCKET/apollo/wiki",
        "prepare.sources": ["hub:wikimedia/wikipedia", "s3://YOUR_PROJECT_BUCKET/x"],
        "tracking.mlflow_uri": None,
    }
    with pytest.raises(ConfigError) as e:
        placeholders(fields)
    assert str(e.value).startswith(
        "replace YOUR-BUCKET in storage_path and base.data.path with your bucket"
    )
    with pytest.raises(ConfigError, match=r"replace YOUR_PROJECT_BUCKET in prepare\.sources"):
        placeholders({"prepare.sources": ["s3://YOUR_PROJECT_BUCKET/x"]})
    placeholders({"storage_path": "s3://your-bucket-name/x", "data.path": "data/demo-bert"})


def test_a_gpu_run_without_gpus_or_a_cluster_names_the_way_forward(monkeypatch):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    gpus = ResourcesConfig(workers=8, gpus_per_worker=1)
    with pytest.raises(ConfigError) as e:
        machine(gpus, None, "base.resources")
    message = str(e.value)
    assert message.startswith("base.resources.gpus_per_worker: a run needs 8 GPUs")
    assert "ray up cluster/gpu.yaml" in message and "search_spaces/small.yaml" in message
    machine(gpus, "auto")  # a named cluster is checked once Ray is up
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    machine(gpus, None)
    machine(ResourcesConfig(workers=2), None)  # CPU only


def test_unreachable_storage_is_one_line_naming_the_field(tmp_path):
    storage("storage_path", str(tmp_path / "not-yet"))  # a local folder is made when needed
    storage("storage_path", None)
    # an S3 endpoint where nothing listens: refused at once, no retries to wait for
    uri = "s3://bucket/ray?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        storage("storage_path", uri, timeout=30)
    message = str(e.value)
    assert message.startswith("storage_path: cannot reach s3://bucket/ray?") or message.startswith(
        "storage_path: s3://bucket/ray?"
    )
    assert "\n" not in message and "AWS credentials" in message
    assert time.monotonic() - start < 30


def test_storage_that_does_not_answer_in_time_is_refused(monkeypatch):
    import apollo_ray.launch.preflight as preflight

    def hang(location):
        time.sleep(5)

    monkeypatch.setattr(preflight, "filesystem", hang)
    with pytest.raises(ConfigError, match=r"base.data.path: gs://b/d did not answer within 0.2 s"):
        storage("base.data.path", "gs://b/d", timeout=0.2)


def test_a_ray_address_where_nothing_listens_is_refused_at_once(monkeypatch):
    # ray.init would wait minutes for a GCS at an address where nothing listens
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError) as e:
        join_ray("127.0.0.1:1")
    assert str(e.value).startswith("--address 127.0.0.1:1: no Ray cluster answers (")
    assert "ray up cluster/gpu.yaml" in str(e.value)
    monkeypatch.setenv("RAY_ADDRESS", "localhost:nope")
    with pytest.raises(ConfigError, match=r"RAY_ADDRESS localhost:nope: .*expected host:port"):
        join_ray(None)
