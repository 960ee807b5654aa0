"""`python -m apollo_ray.cluster check`: Ray's validation of a cluster file plus our rules, one
line per problem naming the key and its line; over a minimal valid file, over copies of the
shipped files broken one way each, and over the shipped files themselves. No Ray is started.
Also `storage.redact`, which keeps URI passwords out of MLflow params (`fields.flatten`)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_run_dict

from apollo_ray.cluster import main
from apollo_ray.config import RunConfig
from apollo_ray.launch.cluster_check import PACKAGE, check
from apollo_ray.storage import redact
from apollo_ray.study.fields import flatten

CLUSTER = Path(__file__).parents[2] / "cluster"
SHIPPED = [CLUSTER / "gpu.yaml", CLUSTER / "gpu-gcp.yaml"]
AMI = "ami-0123456789abcdef0"

MINIMAL: dict[str, Any] = {
    "cluster_name": "apollo-test",
    "max_workers": 1,
    "provider": {"type": "aws", "region": "us-west-2"},
    "docker": {
        "image": "rayproject/ray:2.60.0-py311-gpu",
        "container_name": "apollo_ray",
        "run_options": ["--env=RAY_AUTH_MODE=token"],
        "head_run_options": ["--env=MLFLOW_BACKEND_URI='sqlite:////home/ray/mlflow/mlflow.db'"],
    },
    "available_node_types": {
        "head": {"resources": {}, "node_config": {"InstanceType": "m6i.large", "ImageId": AMI}},
        "gpu_worker": {
            "resources": {},
            "node_config": {
                "InstanceType": "p5.48xlarge",
                "ImageId": AMI,
                "IamInstanceProfile": {
                    "Arn": "arn:aws:iam::000000000000:instance-profile/apollo-worker"
                },
            },
        },
    },
    "head_node_type": "head",
    "file_mounts": {"/home/ray/apollo_ray": ".", "/home/ray/.ray/auth_token": "~/.ray/auth_token"},
    "rsync_exclude": ["/data", "/outputs", "**/__pycache__"],
    "head_start_ray_commands": [
        "ray stop",
        "ray start --head --port=6379 --dashboard-host=127.0.0.1",
        "mlflow server --host 127.0.0.1 --artifacts-destination s3://apollo-test/mlflow",
    ],
    "worker_start_ray_commands": ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"],
}


def run_check(
    tmp_path: Path, config: dict[str, Any], capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[int, list[str], Path]:
    """(exit status, stderr lines, file) of the check over `config` written to a file."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, width=100))
    status = main(["check", *flags, str(path)])
    return status, capsys.readouterr().err.splitlines(), path


def substitute(config: dict[str, Any], pattern: str, new: str) -> None:
    """Replace `pattern` (a regex) with `new` in every string of `config`, in place."""
    for key, value in list(config.items()) if isinstance(config, dict) else enumerate(config):
        if isinstance(value, str):
            config[key] = re.sub(pattern, new, value)
        elif isinstance(value, dict | list):
            substitute(value, pattern, new)


def no_worker_credentials(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_worker"]["node_config"].pop("IamInstanceProfile", None)
    c["available_node_types"]["gpu_worker"]["node_config"].pop("serviceAccounts", None)


def latest_dlami(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_worker"]["node_config"]["ImageId"] = "latest_dlami"


def unanchored_data(c: dict[str, Any]) -> None:
    c["rsync_exclude"].append("data")


def artifacts_on_disk(c: dict[str, Any]) -> None:
    substitute(c, r"--artifacts-destination[=\s]+\S+", "--artifacts-destination /home/ray/art")


def token_auth_off(c: dict[str, Any]) -> None:
    substitute(c, r"RAY_AUTH_MODE=['\"]?token", "RAY_AUTH_MODE=disabled")


def password_in_uri(c: dict[str, Any]) -> None:
    c["docker"]["head_run_options"] = [
        "--env=MLFLOW_BACKEND_URI='postgresql+psycopg2://apollo:hunter2@db:5432/mlflow'"
    ]


# (edit, the keys whose lines must be named, text of the message, text on the named line)
BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], list[str], str, str]] = {
    "worker-credentials": (
        no_worker_credentials,
        ["available_node_types.gpu_worker.node_config"],
        "Ray gives its own to the head only",
        "node_config",
    ),
    "latest-dlami": (
        latest_dlami,
        ["available_node_types.gpu_worker.node_config.ImageId"],
        ", AWS Deep Learning AMI (Ubuntu 18.04) V71.0; pin a current GPU AMI",
        "latest_dlami",
    ),
    "unanchored-rsync-exclude": (
        unanchored_data,
        ["rsync_exclude["],
        '"data" also drops apollo_ray/data from the nodes',
        "data",
    ),
    "artifacts-on-disk": (
        artifacts_on_disk,
        ["head_start_ray_commands["],
        "--artifacts-destination /home/ray/art: MLflow's artifacts (checkpoints, plots) belong",
        "--artifacts-destination",
    ),
    "token-auth-off": (
        token_auth_off,
        ["head_start_ray_commands", "worker_start_ray_commands"],
        "Ray token authentication is off",
        "_start_ray_commands:",
    ),
    "password-in-uri": (
        password_in_uri,
        ["docker.head_run_options[0]"],
        "postgresql+psycopg2://apollo:***@db:5432/mlflow",
        "postgresql",
    ),
}


def assert_named(lines: list[str], path: Path, keys: list[str], message: str, on_line: str):
    """Each key has an error line with `message`, and its line number points at `on_line`."""
    text = path.read_text().splitlines()
    for key in keys:
        found = [ln for ln in lines if f": {key}" in ln and message in ln]
        assert found, f"no error for {key} among {lines}"
        number = int(re.match(rf"error: {re.escape(str(path))}:(\d+): ", found[0])[1])
        assert on_line in text[number - 1], (found[0], text[number - 1])


def test_minimal_file_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"ok: {path} (Ray's validation; worker credentials") and not err


@pytest.mark.parametrize("case", BROKEN)
def test_minimal_file_broken_each_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    edit, keys, message, on_line = BROKEN[case]
    config = copy.deepcopy(MINIMAL)
    edit(config)
    status, lines, path = run_check(tmp_path, config, capsys)
    assert status == 2 and len(lines) == len(keys), lines  # this problem only
    assert_named(lines, path, keys, message, on_line)
    assert "hunter2" not in "\n".join(lines)


@pytest.mark.parametrize("case", BROKEN)
@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.name)
def test_shipped_file_broken_each_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shipped: Path, case: str
) -> None:
    edit, keys, message, on_line = BROKEN[case]
    config = yaml.safe_load(shipped.read_text())
    if case == "latest-dlami" and config["provider"]["type"] != "aws":
        pytest.skip("an AWS image")
    edit(config)
    status, lines, path = run_check(tmp_path, config, capsys, "--allow-placeholders")
    assert status == 2
    assert_named(lines, path, keys, message, on_line)


def test_ray_validation_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = copy.deepcopy(MINIMAL)
    config["available_node_types"]["gpu_worker"]["min_worker"] = 1  # a typo Ray's schema catches
    status, lines, path = run_check(tmp_path, config, capsys)
    assert status == 2 and len(lines) == 1
    assert_named(
        lines, path, ["available_node_types.gpu_worker: Ray's schema"], "min_worker", "gpu"
    )


def test_placeholders_are_errors_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = copy.deepcopy(MINIMAL)
    substitute(config, "s3://apollo-test", "s3://my-apollo-bucket")
    config["available_node_types"]["head"]["node_config"]["ImageId"] = "ami-XXXXXXXX"
    status, lines, path = run_check(tmp_path, config, capsys)
    assert status == 2 and len(lines) == 2
    assert_named(lines, path, ["head_start_ray_commands[2]"], "replace my-apollo-bucket", "mlflow")
    assert_named(lines, path, ["available_node_types.head"], "replace ami-XXXXXXXX", "ImageId")
    assert main(["check", "--allow-placeholders", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: ") and len(err.splitlines()) == 2
    assert all(ln.startswith("warning: ") for ln in err.splitlines())


def test_a_password_from_the_environment_is_fine() -> None:
    config = copy.deepcopy(MINIMAL)
    config["docker"]["head_run_options"] = [
        '--env=MLFLOW_BACKEND_URI="postgresql+psycopg2://apollo:${PGPASSWORD}@db:5432/mlflow"'
    ]
    assert check(config) == []


def test_rsync_filter_file_patterns_are_checked(tmp_path: Path) -> None:
    package = tmp_path / "apollo_ray"
    (package / "data").mkdir(parents=True)
    (package / "data" / "shards.py").write_text("")
    (tmp_path / ".gitignore").write_text("# comment\n/data/\n__pycache__/\ndata/\n")
    config = copy.deepcopy(MINIMAL) | {"rsync_filter": [".gitignore"]}
    problems = check(config, package)
    assert [(p.key, p.message) for p in problems] == [
        (
            ("rsync_filter", 0),
            '.gitignore, line 4: "data/" also drops apollo_ray/data from the nodes (rsync '
            'matches it at any depth); anchor it at the top folder: "/data/"',
        )
    ]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="no rsync")
@pytest.mark.parametrize(
    "pattern", ["data", "/data", "data/", "apollo_ray/data", "*/data", "d*", "**/__pycache__"]
)
def test_the_check_agrees_with_rsync(tmp_path: Path, pattern: str) -> None:
    """A real rsync dry run of the repository with `--exclude pattern` leaves out a file of the
    package exactly when the check reports the pattern."""
    only_the_package = ["--include", f"/{PACKAGE.name}/***", "--exclude", "/*"]
    where = [f"{PACKAGE.parent}/", str(tmp_path)]
    run = subprocess.run(
        ["rsync", "-an", "--out-format=%n", "--exclude", pattern, *only_the_package, *where],
        capture_output=True,
        text=True,
        check=True,
    )
    copied = {line.rstrip("/") for line in run.stdout.splitlines()}
    files = [p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*.py")]
    dropped = [f for f in files if "__pycache__" not in f and f not in copied]
    config = copy.deepcopy(MINIMAL) | {"rsync_exclude": [pattern]}
    assert bool(dropped) == any(p.key == ("rsync_exclude", 0) for p in check(config))


def test_shipped_cluster_files_pass_the_check(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check", "--allow-placeholders", *map(str, SHIPPED)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.count("ok: ") == 2 and "error:" not in err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["check", "--help"])
    assert e.value.code == 0 and "--allow-placeholders" in capsys.readouterr().out


def test_redact_hides_uri_passwords_only() -> None:
    assert redact("s3://KEY:SECRET@bucket/data") == "s3://KEY:***@bucket/data"
    assert redact("postgresql://user:pw@host:5432/db?sslmode=require") == (
        "postgresql://user:***@host:5432/db?sslmode=require"
    )
    assert redact("see http://user:pw@host and gs://a:b@c/d") == (
        "see http://user:***@host and gs://a:***@c/d"
    )
    for kept in (
        "s3://bucket/data?endpoint_override=127.0.0.1:9000&scheme=http",
        "http://user@host:5000",
        "sqlite:////home/ray/mlflow/mlflow.db",
        "postgresql://user:${PGPASSWORD}@host/db",
        "data/demo-bert",
    ):
        assert redact(kept) == kept


def test_flatten_redacts_uri_passwords() -> None:
    run = tiny_run_dict("s3://KEY:SECRET@bucket/data", "runs/r")
    flat = flatten(RunConfig.model_validate(run))
    assert flat["data.path"] == "s3://KEY:***@bucket/data"
    assert "SECRET" not in str(flat)
