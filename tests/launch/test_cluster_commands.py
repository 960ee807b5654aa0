"""The cluster files' commands and file filters, run here as Ray's cluster launcher runs them (no
cloud, no container):

- the head's MLflow start command goes through Ray's own command runner (`DockerCommandRunner.run`
  and the SSH runner under it: the environment variables, `~` expansion, `bash --login -c -i`
  and `docker exec` layers of a real `ray up`); the command line that ssh would send is run in a
  local shell, with a stand-in `docker` that runs the exec'd command here. The server must answer
  afterwards, outlive the shell, and be replaced cleanly when the command runs again (`ray up`
  twice);
- the file mounts as `ray up` hashes them (Ray's `hash_runtime_conf`) and copies them (rsync
  with the arguments Ray's own code builds from `rsync_exclude`, in a dry run): the listed paths
  only, every module of the package included;
- the nodes' setup command (a copy of the mounts, installed with the lock) and the GCP nodes'
  wait for the NVIDIA driver, in a local shell with stand-ins for pip, nvidia-smi and sysfs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ray._common.usage.usage_constants import USAGE_STATS_ENABLED_ENV_VAR
from ray.autoscaler._private.command_runner import DockerCommandRunner, SSHCommandRunner
from ray.autoscaler._private.constants import RESOURCES_ENVIRONMENT_VARIABLE

from apollo_ray.records.mlflow_server import answers, free_port

ROOT = Path(__file__).parents[2]
CLUSTER = sorted((ROOT / "cluster").glob("*.yaml"))
BUCKET_ARTIFACTS = {
    "gpu.yaml": "s3://my-apollo-bucket/mlflow",
    "gpu-gcp.yaml": "gs://my-apollo-bucket/mlflow",
}

# Stands in for `docker exec [-it] [-e NAME=VALUE]... CONTAINER COMMAND...`: runs COMMAND here.
DOCKER = """#!/bin/bash
[ "$1" = exec ] || { echo "docker stand-in: exec only, got $*" >&2; exit 2; }
shift
while [ "${1#-}" != "$1" ]; do [ "$1" = -e ] && shift; shift; done
shift
exec "$@"
"""


def _ssh_command_line(config: dict, cmd: str, home: Path) -> str:
    """What `ray up` has ssh run on the head for one of its start commands: Ray's
    DockerCommandRunner (login shells, as `ray up` uses them) with the environment variables Ray's
    NodeUpdater gives head start commands; `home` is what the container's `printenv HOME` would
    answer."""
    runner = DockerCommandRunner(
        config["docker"],
        log_prefix="",
        node_id="head",
        provider=None,
        auth_config=config["auth"],
        cluster_name=config["cluster_name"],
        process_runner=subprocess,
        use_internal_ip=False,
    )
    runner.home_dir = str(home)
    ssh = runner.ssh_command_runner
    ssh.ssh_ip, ssh.ssh_control_path = "203.0.113.1", None  # no lookup, no control folder
    sent: list[list[str]] = []
    ssh._run_helper = lambda final_cmd, *_, **__: sent.append(final_cmd)
    resources = config["available_node_types"]["head"]["resources"] or {"CPU": 16, "GPU": 0}
    env = {USAGE_STATS_ENABLED_ENV_VAR: 0, RESOURCES_ENVIRONMENT_VARIABLE: resources}
    runner.run(cmd, environment_variables=env, run_env="auto")
    [argv] = sent
    target = argv.index(f"{config['auth']['ssh_user']}@203.0.113.1")
    assert argv[target + 1 : target + 5] == ["bash", "--login", "-c", "-i"]
    return " ".join(argv[target + 1 :])  # sshd hands this line to the user's shell


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop(pids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while any(map(_running, pids)) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def head(tmp_path: Path) -> Iterator[dict]:
    """A home folder standing in for the head container's, whose ~/.bashrc (which Ray's wrapper
    sources) puts this venv's mlflow and python and the docker stand-in on PATH; the server
    processes the test starts are stopped at the end, whatever happened."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(DOCKER)
    (bin_dir / "docker").chmod(0o755)
    (home / ".bashrc").write_text(f'export PATH="{bin_dir}:{Path(sys.executable).parent}:$PATH"\n')
    env = {
        "HOME": str(home),
        "PATH": os.environ["PATH"],
        "LANG": "C.UTF-8",  # as Ray's `docker run` sets them
        "LC_ALL": "C.UTF-8",
        "MLFLOW_BACKEND_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",  # docker.head_run_options
    }
    started: set[int] = set()
    yield {"home": home, "env": env, "artifacts": tmp_path / "artifacts", "started": started}
    pid_file = home / "mlflow" / "server.pid"
    if pid_file.exists() and pid_file.read_text().strip():
        started.add(int(pid_file.read_text()))  # the last one started, even if a check failed
    _stop({c for pid in started for c in _children(pid)} | started)


def test_head_starts_mlflow_and_a_second_ray_up_replaces_it(head: dict):
    # gpu.yaml's command; gpu-gcp.yaml's is the same but for its bucket (the test below)
    path = ROOT / "cluster" / "gpu.yaml"
    config = yaml.safe_load(path.read_text())
    [cmd] = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    port = free_port()
    for old, new in [
        ("port=5000;", f"port={port};"),
        (
            f"--artifacts-destination {BUCKET_ARTIFACTS[path.name]}",
            f"--artifacts-destination {head['artifacts'].as_uri()}",
        ),
    ]:
        assert cmd.count(old) == 1, f"the MLflow command no longer holds {old!r}"
        cmd = cmd.replace(old, new)
    line = _ssh_command_line(config, cmd, head["home"])
    assert "docker exec" in line and "mlflow server" in line
    pid_file = head["home"] / "mlflow" / "server.pid"

    def ray_up() -> int:
        done = subprocess.run(
            ["bash", "-c", line],
            env=head["env"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=240,
        )
        if pid_file.exists():
            head["started"].add(int(pid_file.read_text()))
        log = head["home"] / "mlflow" / "server.log"
        assert done.returncode == 0, (
            f"{done.stdout}{done.stderr}{log.read_text() if log.exists() else ''}"
        )
        return int(pid_file.read_text())

    first = ray_up()  # the shell that started it has exited: the server must outlive it
    assert _running(first) and answers(f"http://127.0.0.1:{port}")
    first_tree = {first} | _children(first)

    second = ray_up()
    assert second != first
    assert not any(map(_running, first_tree)), "the first server (or its workers) still runs"
    assert _running(second) and answers(f"http://127.0.0.1:{port}")


def test_ray_up_fails_when_mlflow_does_not_start(head: dict):
    """A store the server cannot open: the command (and so `ray up`) fails and shows the log's
    end, instead of leaving a cluster without tracking behind an exit code of 0."""
    config = yaml.safe_load((ROOT / "cluster" / "gpu.yaml").read_text())
    [cmd] = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    cmd = cmd.replace("port=5000;", f"port={free_port()};")
    line = _ssh_command_line(config, cmd, head["home"])
    env = dict(head["env"], MLFLOW_BACKEND_URI="nosuchstore://nowhere")
    done = subprocess.run(
        ["bash", "-c", line],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode != 0
    assert "MLflow did not start" in done.stdout and "nosuchstore" in done.stdout


def test_both_files_start_the_same_mlflow_server():
    commands = {}
    for path in CLUSTER:
        config = yaml.safe_load(path.read_text())
        [cmd] = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
        commands[path.name] = cmd.replace(BUCKET_ARTIFACTS[path.name], "BUCKET")
    assert len(set(commands.values())) == 1, commands


def _rsync_or_skip() -> str:
    rsync = shutil.which("rsync")
    if rsync is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install rsync (Debian's package), as `ray up` needs it")
        pytest.skip("needs rsync (`apt-get install rsync`), as `ray up` does")
    return rsync


def _ray_copies(config: dict, source: Path, target: Path) -> set[str]:
    """The paths (relative, folders without their trailing /) that `ray up` would copy from
    `source` for a folder file mount: rsync with the exclude and filter arguments Ray builds from
    the cluster file (`SSHCommandRunner._create_rsync_filter_args`, which uses nothing of the
    runner), on the folder with a trailing / as Ray's NodeUpdater.sync_file_mounts passes it."""
    options = {
        "rsync_exclude": config.get("rsync_exclude"),
        "rsync_filter": config.get("rsync_filter"),
    }
    args = SSHCommandRunner._create_rsync_filter_args(None, options)
    done = subprocess.run(
        [_rsync_or_skip(), "-a", "--dry-run", "--out-format=%n", *args, f"{source}/", f"{target}/"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {line.rstrip("/") for line in done.stdout.splitlines()} - {".", ""}


NODE_PATHS = {
    "apollo_ray",
    "search_spaces",
    "configs",
    "pyproject.toml",
    "README.md",
    "requirements.lock",
}


def _repository_mounts(config: dict) -> dict[str, str]:
    """The file mounts that come from the repository (all but the Ray token)."""
    return {t: s for t, s in config["file_mounts"].items() if not s.startswith("~")}


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_ray_up_hashes_and_syncs_only_what_the_nodes_need(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """What `ray up`, run from the repository's top folder, reads to hash the file mounts
    (Ray's `hash_runtime_conf`, every file it opens recorded) and copies to the nodes (rsync as
    Ray runs it, per mount): the listed paths only, never .venv, .git, data/ or outputs/; every
    file git tracks under them arrives, Python's caches do not."""
    from ray.autoscaler._private import util

    config = yaml.safe_load(path.read_text())
    mounts = _repository_mounts(config)
    assert {Path(s).as_posix() for s in mounts.values()} == NODE_PATHS
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("token")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(ROOT)
    read: list[Path] = []

    def recording_open(file, *args, **kwargs):
        read.append(Path(file).resolve())
        return open(file, *args, **kwargs)

    monkeypatch.setattr(util, "open", recording_open, raising=False)
    monkeypatch.setattr(util, "_hash_cache", {})
    util.hash_runtime_conf(config["file_mounts"], None, {}, generate_file_mounts_contents_hash=True)
    hashed = {p.relative_to(ROOT).parts[0] for p in read if p.is_relative_to(ROOT)}
    assert hashed == NODE_PATHS
    assert [p for p in read if not p.is_relative_to(ROOT)] == [home / ".ray" / "auth_token"]

    synced: set[str] = set()
    for source in mounts.values():
        local = ROOT / source
        if local.is_dir():
            copied = _ray_copies(config, local, tmp_path / "node" / local.name)
            synced |= {f"{Path(source).as_posix()}/{p}" for p in copied}
        else:
            synced.add(Path(source).as_posix())
    tracked = subprocess.run(
        ["git", "ls-files", *sorted(NODE_PATHS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "apollo_ray/data/__init__.py" in tracked  # the folder an unanchored `data` dropped
    assert sorted(set(tracked) - synced) == []
    assert {p.split("/")[0] for p in synced} == NODE_PATHS
    assert not [p for p in synced if "__pycache__" in p]


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_setup_installs_a_copy_of_the_mounts_from_the_lock(path: Path, tmp_path: Path):
    """The nodes' setup command, run in a shell with a pip stand-in: it copies the mounted
    paths (whose parent Docker makes root's) to ~/apollo_ray, drops what left the mounts, keeps
    pip's metadata, and installs the package from the copy with the copy's lock."""
    config = yaml.safe_load(path.read_text())
    [setup] = [c for c in config["setup_commands"] if "requirements.lock" in c]
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    for target, source in _repository_mounts(config).items():
        local, there = ROOT / source, Path(target.replace("/home/ray", str(home)))
        if local.is_dir():
            shutil.copytree(local, there, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            there.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(local, there)
    bin_dir.mkdir()
    (bin_dir / "pip").write_text('#!/bin/sh\necho "$@" >> "$HOME/pip.log"\n')
    (bin_dir / "pip").chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    _rsync_or_skip()

    subprocess.run(["bash", "-c", setup], env=env, check=True)
    copy = home / "apollo_ray"
    assert (copy / "pyproject.toml").is_file() and (copy / "requirements.lock").is_file()
    assert (copy / "apollo_ray" / "data" / "shards.py").is_file()
    extra = {"aws": "aws", "gcp": "gcp"}[config["provider"]["type"]]
    lock = f"{copy}/requirements.lock"
    assert (home / "pip.log").read_text().split() == [
        "install",
        "-q",
        "-c",
        lock,
        "-e",
        f"{copy}[demo,{extra}]",
    ]
    (copy / "apollo_ray.egg-info").mkdir()  # what pip install -e writes
    (home / "apollo_ray-src" / "apollo_ray" / "ui.py").unlink()  # a module gone from the repo
    subprocess.run(["bash", "-c", setup], env=env, check=True)
    assert (copy / "apollo_ray.egg-info").is_dir()
    assert not (copy / "apollo_ray" / "ui.py").exists()


def test_gcp_nodes_wait_for_the_nvidia_driver(tmp_path: Path):
    """The GPU node's wait, with a stand-in PCI tree and nvidia-smi: a node without an NVIDIA
    device goes on at once; one with it waits until nvidia-smi answers (the driver is
    installed after boot, so nvidia-smi is missing or failing at first), and fails at the
    timeout."""
    config = yaml.safe_load((ROOT / "cluster" / "gpu-gcp.yaml").read_text())
    [wait] = [c for c in config["initialization_commands"] if "nvidia-smi" in c]
    devices, bin_dir = tmp_path / "devices", tmp_path / "bin"
    (devices / "0000:00:04.0").mkdir(parents=True)
    (devices / "0000:00:04.0" / "vendor").write_text("0x1af4\n")  # virtio
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "nvidia-smi").write_text(
        f'#!/bin/sh\necho x >> {calls}\n[ "$(wc -l < {calls})" -ge 3 ]\n'
    )
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    wait = wait.replace("/sys/bus/pci/devices", str(devices)).replace("sleep 5", "sleep 0.1")

    assert subprocess.run(["bash", "-c", wait], env=env).returncode == 0
    assert not calls.exists()  # the head: no NVIDIA device, no wait
    (devices / "0000:00:05.0").mkdir()
    (devices / "0000:00:05.0" / "vendor").write_text("0x10de\n")
    assert subprocess.run(["bash", "-c", wait], env=env).returncode == 0
    assert len(calls.read_text().split()) == 3
    (bin_dir / "nvidia-smi").unlink()  # no driver, ever
    never = wait.replace("timeout 900", "timeout 1")
    done = subprocess.run(["bash", "-c", never], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "no working NVIDIA driver" in done.stdout
