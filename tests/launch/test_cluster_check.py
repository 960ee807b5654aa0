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
from conftest import tiny_run_dict, tiny_study

from apollo_ray.cluster import main
from apollo_ray.config import RunConfig
from apollo_ray.launch.cluster_check import PACKAGE, PLACEHOLDERS, check
from apollo_ray.storage import redact
from apollo_ray.study.fields import flatten

CLUSTER = Path(__file__).parents[2] / "cluster"
SHIPPED = [CLUSTER / "gpu.yaml", CLUSTER / "gpu-gcp.yaml"]
AMI = "ami-0123456789abcdef0"

HEAD_ROLE = {"Arn": "arn:aws:iam::000000000000:instance-profile/apollo-head"}
MINIMAL: dict[str, Any] = {
    "cluster_name": "apollo-test",
    "max_workers": 1,
    "provider": {"type": "aws", "region": "us-west-2"},
    "docker": {
        "image": "rayproject/ray:2.60.0-py311-gpu",
        "container_name": "apollo_ray",
        "run_options": ["--env=RAY_AUTH_MODE=token"],
        "worker_run_options": ["--gpus all"],
    },
    "available_node_types": {
        "head": {
            "resources": {"CPU": 2, "GPU": 0},
            "node_config": {
                "InstanceType": "m6i.large",
                "ImageId": AMI,
                "IamInstanceProfile": HEAD_ROLE,
            },
        },
        "gpu_worker": {
            "resources": {"CPU": 192, "GPU": 8},
            "max_workers": 1,
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
    "file_mounts": {
        "/home/ray/apollo_ray-src/apollo_ray": "./apollo_ray",
        "/home/ray/apollo_ray-src/requirements.lock": "./requirements.lock",
        "/home/ray/.ray/auth_token": "~/.ray/auth_token",
    },
    "rsync_exclude": ["**/__pycache__"],
    "initialization_commands": ["mkdir -p /mnt/scratch && chmod 0755 /mnt/scratch"],
    "head_setup_commands": [],
    "setup_commands": [
        "pip install torch==2.13.0",
        "pip install -c ~/apollo_ray-src/requirements.lock -e ~/apollo_ray-src",
    ],
    "head_start_ray_commands": [
        "ray stop",
        "ray start --head --port=6379 --dashboard-host=127.0.0.1",
        "mlflow server --host 127.0.0.1 --artifacts-destination s3://apollo-test/mlflow "
        "--backend-store-uri 'postgresql+psycopg2://apollo:${PGPASSWORD}@db:5432/mlflow'",
    ],
    "worker_start_ray_commands": ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"],
}
# realistic values for the shipped files' placeholders
FILLED = {
    "my-apollo-bucket": "acme-apollo",
    "my-project": "acme-ml",
    "123456789012": "210987654321",
    "sg-XXXXXXXX": "sg-0a1b2c3d",
    "fs-XXXXXXXX": "fs-0a1b2c3d",
    "YOUR_FILESTORE_IP": "10.20.0.2",
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


def worker(c: dict[str, Any]) -> dict[str, Any]:
    return c["available_node_types"]["gpu_worker"]["node_config"]


def no_worker_credentials(c: dict[str, Any]) -> None:
    worker(c).pop("IamInstanceProfile", None)
    worker(c).pop("serviceAccounts", None)


def the_heads_credentials(c: dict[str, Any]) -> None:
    head = c["available_node_types"]["head"]["node_config"]
    for field in ("IamInstanceProfile", "serviceAccounts"):
        if field in head:
            worker(c)[field] = copy.deepcopy(head[field])


def latest_dlami(c: dict[str, Any]) -> None:
    worker(c)["ImageId"] = "latest_dlami"


def another_ray(c: dict[str, Any]) -> None:
    c["docker"]["image"] = "rayproject/ray:2.50.0-py311-gpu"


def unanchored_data(c: dict[str, Any]) -> None:
    c["rsync_exclude"].append("data")


def whole_checkout(c: dict[str, Any]) -> None:
    c["file_mounts"] = {"/home/ray/apollo_ray": ".", **c["file_mounts"]}


def unlocked_install(c: dict[str, Any]) -> None:
    c["setup_commands"].append("pip install -q s3fs")


def artifacts_on_disk(c: dict[str, Any]) -> None:
    substitute(c, r"--artifacts-destination[=\s]+\S+", "--artifacts-destination /home/ray/art")


def database_on_head_disk(c: dict[str, Any]) -> None:
    substitute(
        c,
        r"--backend-store-uri\s+(\"[^\"]*\"|'[^']*'|\S+)",
        "--backend-store-uri sqlite:////home/ray/mlflow/mlflow.db",
    )


def token_auth_off(c: dict[str, Any]) -> None:
    substitute(c, r"RAY_AUTH_MODE=['\"]?token", "RAY_AUTH_MODE=disabled")


def workers_auth_disabled(c: dict[str, Any]) -> None:
    c["docker"]["worker_run_options"].append("--env=RAY_AUTH_MODE=disabled")


def token_not_mounted(c: dict[str, Any]) -> None:
    c["file_mounts"] = {k: v for k, v in c["file_mounts"].items() if "auth_token" not in k}


def rays_default_head_setup(c: dict[str, Any]) -> None:
    del c["head_setup_commands"]  # Ray's: pip install boto3 (AWS), the Google API client (GCP)


def pkill(c: dict[str, Any]) -> None:
    c["head_start_ray_commands"].append('pkill -f "ray::IDLE" || true')


def world_writable(c: dict[str, Any]) -> None:
    c["initialization_commands"].append("sudo chmod 1777 /mnt/shared")


def every_interface(c: dict[str, Any]) -> None:
    substitute(c, r"--dashboard-host=127\.0\.0\.1", "--dashboard-host=0.0.0.0")


def gpus_on_the_head(c: dict[str, Any]) -> None:
    c["docker"]["run_options"].append("--gpus all")


def password_in_uri(c: dict[str, Any]) -> None:
    c["docker"]["head_run_options"] = [
        "--env=MLFLOW_BACKEND_URI='postgresql+psycopg2://apollo:hunter2@db:5432/mlflow'"
    ]


def a3_pd_standard(c: dict[str, Any]) -> None:
    worker(c)["disks"][0]["initializeParams"]["diskType"] = "zones/z/diskTypes/pd-standard"


def a3_without_gvnic(c: dict[str, Any]) -> None:
    worker(c)["networkInterfaces"][0].pop("nicType")


def gpus_that_migrate(c: dict[str, Any]) -> None:
    worker(c).pop("scheduling")


# (edit, the keys whose lines must be named, text of the message, text on the named line, the
# provider it applies to or None)
Case = tuple[Callable[[dict[str, Any]], None], list[str], str, str | None, str | None]
BROKEN: dict[str, Case] = {
    "worker-credentials": (
        no_worker_credentials,
        ["available_node_types.gpu_worker.node_config"],
        "Ray gives its own to the head only",
        "node_config",
        None,
    ),
    "the-heads-credentials": (
        the_heads_credentials,
        ["available_node_types.gpu_worker.node_config."],
        "code in a trial could launch nodes and rewrite the study's Tune state",
        ":",
        None,
    ),
    "latest-dlami": (
        latest_dlami,
        ["available_node_types.gpu_worker.node_config.ImageId"],
        ", AWS Deep Learning AMI (Ubuntu 18.04) V71.0; pin a current GPU AMI",
        "latest_dlami",
        "aws",
    ),
    "another-ray": (
        another_ray,
        ["docker.image"],
        "the nodes would run Ray 2.50.0",
        "image:",
        None,
    ),
    "unanchored-rsync-exclude": (
        unanchored_data,
        ["rsync_exclude["],
        '"data" also drops apollo_ray/data from the nodes',
        "data",
        None,
    ),
    "whole-checkout": (
        whole_checkout,
        ["file_mounts./home/ray/apollo_ray"],
        ". holds .git",
        "/home/ray/apollo_ray:",
        None,
    ),
    "unlocked-install": (
        unlocked_install,
        ["setup_commands["],
        "pip install without the lock",
        "pip install -q s3fs",
        None,
    ),
    "artifacts-on-disk": (
        artifacts_on_disk,
        ["head_start_ray_commands["],
        "--artifacts-destination /home/ray/art: MLflow's artifacts (checkpoints, plots) belong",
        "--artifacts-destination",
        None,
    ),
    "database-on-head-disk": (
        database_on_head_disk,
        ["head_start_ray_commands["],
        "MLflow's database sqlite:////home/ray/mlflow/mlflow.db is not on the shared file",
        "sqlite",
        None,
    ),
    "token-auth-off": (
        token_auth_off,
        ["docker.run_options["],
        "RAY_AUTH_MODE=disabled: nodes started so leave Ray's ports open",
        "RAY_AUTH_MODE=disabled",
        None,
    ),
    "workers-auth-disabled": (
        workers_auth_disabled,
        ["docker.worker_run_options["],
        "RAY_AUTH_MODE=disabled",
        "RAY_AUTH_MODE=disabled",
        None,
    ),
    "token-not-mounted": (
        token_not_mounted,
        ["file_mounts: no file mount brings the Ray token"],
        "`ray start` with RAY_AUTH_MODE=token aborts",
        "file_mounts",
        None,
    ),
    "rays-default-head-setup": (
        rays_default_head_setup,
        ["head_setup_commands"],
        "not set, so Ray runs its defaults (pip install",
        None,
        None,
    ),
    "pkill": (
        pkill,
        ["head_start_ray_commands["],
        "`pkill -f` matches the shell running this very command",
        "pkill -f",
        None,
    ),
    "world-writable": (
        world_writable,
        ["initialization_commands["],
        "mode 1777 lets every user of the node write there",
        "1777",
        None,
    ),
    "every-interface": (
        every_interface,
        ["head_start_ray_commands["],
        "0.0.0.0: a service open to every network",
        "0.0.0.0",
        None,
    ),
    "gpus-on-the-head": (
        gpus_on_the_head,
        ["docker.run_options["],
        "--gpus all on the head too",
        "--gpus",
        None,
    ),
    "password-in-uri": (
        password_in_uri,
        ["docker.head_run_options[0]"],
        "postgresql+psycopg2://apollo:***@db:5432/mlflow",
        "postgresql",
        None,
    ),
    "a3-pd-standard": (
        a3_pd_standard,
        ["available_node_types.gpu_worker.node_config.disks[0].initializeParams.diskType"],
        "a3-highgpu-8g does not take pd-standard disks",
        "pd-standard",
        "gcp",
    ),
    "a3-without-gvnic": (
        a3_without_gvnic,
        ["available_node_types.gpu_worker.node_config.networkInterfaces[0]"],
        "a3-highgpu-8g needs Google's gVNIC",
        "subnetwork",
        "gcp",
    ),
    "gpus-that-migrate": (
        gpus_that_migrate,
        ["available_node_types.gpu_worker.node_config"],
        "cannot live-migrate",
        "node_config",
        "gcp",
    ),
}


def assert_named(
    lines: list[str], path: Path, keys: list[str], message: str, on_line: str | None
) -> None:
    """Each key has an error line with `message`, and its line number points at `on_line`
    (None: a key the file does not hold, named without a line)."""
    text = path.read_text().splitlines()
    for key in keys:
        found = [ln for ln in lines if f": {key}" in ln and message in ln]
        assert found, f"no error for {key} among {lines}"
        if on_line is None:
            assert found[0].startswith(f"error: {path}: {key}: "), found[0]
            continue
        number = int(re.match(rf"error: {re.escape(str(path))}:(\d+): ", found[0])[1])
        assert on_line in text[number - 1], (found[0], text[number - 1])


def filled(shipped: Path) -> dict[str, Any]:
    """A shipped cluster file with its placeholders replaced by values a user would write."""
    text = PLACEHOLDERS.sub(lambda m: FILLED[m[0]], shipped.read_text())
    return yaml.safe_load(text)


def test_minimal_file_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"ok: {path} (Ray's validation; credentials" in out and not err


@pytest.mark.parametrize("case", BROKEN)
def test_minimal_file_broken_each_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    edit, keys, message, on_line, provider = BROKEN[case]
    if provider not in (None, "aws"):
        pytest.skip(f"a {provider} rule")
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
    """A user's copy of a shipped file, placeholders filled in, then broken one way: refused
    with this problem alone, on the line that holds it."""
    edit, keys, message, on_line, provider = BROKEN[case]
    config = filled(shipped)
    if provider not in (None, config["provider"]["type"]):
        pytest.skip(f"a {provider} rule")
    edit(config)
    status, lines, path = run_check(tmp_path, config, capsys)
    assert status == 2 and len(lines) == len(keys), lines
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
    """Patterns of an rsync_filter file, read from the top of each mount: here the repository
    (unanchored `data/` drops the package's data/) and the package (`/data/` anchors there)."""
    package = tmp_path / "apollo_ray"
    (package / "data").mkdir(parents=True)
    (package / "data" / "shards.py").write_text("")
    (tmp_path / ".gitignore").write_text("# comment\n/data/\n__pycache__/\ndata/\n")
    config = copy.deepcopy(MINIMAL) | {"rsync_filter": [".gitignore"]}
    config["file_mounts"] = {"/home/ray/apollo_ray-src": ".", "/home/ray/.ray/auth_token": "~/t"}
    problems = check(config, package)
    assert [(p.key, p.message) for p in problems] == [
        (
            ("rsync_filter", 0),
            '.gitignore, line 4: "data/" also drops apollo_ray/data from the nodes (rsync '
            'matches it at any depth); anchor it at the top folder: "/data/"',
        )
    ]
    config["file_mounts"] |= {"/home/ray/apollo_ray-src/apollo_ray": "./apollo_ray"}
    assert [p.message.split(":")[0] for p in check(config, package)] == [
        ".gitignore, line 2",
        ".gitignore, line 4",
    ]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="no rsync")
@pytest.mark.parametrize("mount", [".", "./apollo_ray"])
@pytest.mark.parametrize(
    "pattern", ["data", "/data", "data/", "apollo_ray/data", "*/data", "d*", "**/__pycache__"]
)
def test_the_check_agrees_with_rsync(tmp_path: Path, mount: str, pattern: str) -> None:
    """A real rsync dry run of the mounted folder (the repository or the package) with
    `--exclude pattern` leaves out a file of the package exactly when the check reports the
    pattern."""
    top = (PACKAGE.parent / mount).resolve()
    only_the_package = (
        ["--include", f"/{PACKAGE.name}/***", "--exclude", "/*"] if mount == "." else []
    )
    run = subprocess.run(
        [
            "rsync",
            "-an",
            "--out-format=%n",
            "--exclude",
            pattern,
            *only_the_package,
            f"{top}/",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    copied = {line.rstrip("/") for line in run.stdout.splitlines()}
    files = [p.relative_to(top).as_posix() for p in PACKAGE.rglob("*.py")]
    dropped = [f for f in files if "__pycache__" not in f and f not in copied]
    config = copy.deepcopy(MINIMAL) | {"rsync_exclude": [pattern]}
    config["file_mounts"] = {"/home/ray/apollo_ray-src/x": mount, "~/.ray/auth_token": "~/t"}
    assert bool(dropped) == any(p.key == ("rsync_exclude", 0) for p in check(config))


def test_shipped_cluster_files_pass_the_check(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check", "--allow-placeholders", *map(str, SHIPPED)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.count("ok: ") == 2 and "error:" not in err


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_filled_in_pass_without_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shipped: Path
) -> None:
    status, lines, _ = run_check(tmp_path, filled(shipped), capsys)
    assert status == 0 and lines == []


def test_an_unfilled_placeholder_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = CLUSTER / "gpu-gcp.yaml"
    assert main(["check", str(shipped)]) == 2
    lines = capsys.readouterr().err.splitlines()
    keys = ["initialization_commands[1]", "head_start_ray_commands[2]", "provider.project_id"]
    text = shipped.read_text().splitlines()
    placeholders = ["YOUR_FILESTORE_IP", "my-apollo-bucket", "my-project"]
    for key, placeholder in zip(keys, placeholders, strict=True):
        [line] = [ln for ln in lines if f": {key}: replace {placeholder}" in ln]
        assert placeholder in text[int(line.split(":")[2]) - 1]


@pytest.mark.parametrize(
    ("resources", "problem"),
    [
        ({"workers": 8, "gpus_per_worker": 1}, None),
        ({"workers": 4, "gpus_per_worker": 1, "placement": "STRICT_PACK"}, None),
        (
            {"workers": 16, "gpus_per_worker": 1, "placement": "STRICT_PACK"},
            "placement STRICT_PACK puts all 16 workers",
        ),
        ({"workers": 40, "gpus_per_worker": 1}, "the autoscaler's node types hold at most 32"),
        ({"workers": 1, "gpus_per_worker": 16}, "more than any node type of the autoscaler"),
    ],
)
def test_a_study_whose_trials_do_not_fit_the_node_types_is_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    resources: dict[str, Any],
    problem: str | None,
) -> None:
    study = tmp_path / "study.yaml"
    text = tiny_study(tmp_path, tmp_path / "data", "fit").read_text()  # data: not read
    config = yaml.safe_load(text)
    config["base"]["resources"] = resources
    study.write_text(yaml.safe_dump(config))
    cluster = filled(CLUSTER / "gpu-gcp.yaml")  # resources spelled out: 4 nodes of 8 GPUs
    status, lines, path = run_check(tmp_path, cluster, capsys, "--study", str(study))
    if problem is None:
        assert status == 0 and lines == []
    else:
        assert status == 2 and len(lines) == 1, lines
        assert_named(
            lines,
            path,
            ["available_node_types: the study's trials do not fit"],
            problem,
            "available_node_types",
        )


def test_a_study_on_node_types_ray_sizes_at_launch_asks_for_their_resources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tiny_study(tmp_path, tmp_path / "data", "fit")
    cluster = filled(CLUSTER / "gpu.yaml")
    cluster["available_node_types"]["head"]["resources"] = {}  # Ray: from the instance type
    status, lines, path = run_check(tmp_path, cluster, capsys, "--study", str(study))
    assert status == 2 and len(lines) == 1
    assert_named(
        lines, path, ["available_node_types.head.resources"], "spell them out", "resources"
    )


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
