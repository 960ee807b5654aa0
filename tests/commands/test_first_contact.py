"""First contact: every command the README documents, run as a new user would where it cannot
succeed (no GPU, a placeholder bucket, no tracking server, missing data, a missing checkpoint,
a busy port), answers with exit status 2 and one `error:` line naming the field or file, and
no traceback.

Each command runs as its own process in a new network namespace with no network at all
(`unshare -rn`: not even loopback is up) under a deadline, so a placeholder that reached the
network, or a check waiting on it, fails the test. Only the UI's busy-port case runs with the
machine's network, since it must see the port taken."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER_DEADLINE = 45  # a placeholder is refused before anything but Python's imports
DEAD = "http://127.0.0.1:9"  # the discard port: nothing answers there


@dataclass
class Case:
    """A command (`python -m apollo_ray.<args>`) and what its error line must say."""

    args: list[str]
    says: list[str]
    env: dict[str, str] = field(default_factory=dict)
    offline: bool = True
    deadline: float = 90  # seconds: one that waits on a network it does not have runs past it


def study_copy(tmp: Path, name: str, **changes) -> str:
    """A shipped study file, in `tmp`, with `changes` to its fields (`base__data__path` is
    base.data.path)."""
    study = yaml.safe_load((ROOT / "search_spaces" / name).read_text())
    for dotted, value in changes.items():
        node = study
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(study))
    return str(path)


def cases(tmp: Path, port: int, gpt_data: Path) -> dict[str, Case]:
    spaces = ROOT / "search_spaces"
    local = tmp / "local"
    return {
        # the first documented command, with the file as shipped
        "tune bert.yaml": Case(
            ["tune", str(spaces / "bert.yaml")],
            ["replace YOUR-BUCKET in storage_path and base.data.path with your bucket"],
            deadline=PLACEHOLDER_DEADLINE,
        ),
        "tune gpt2.yaml": Case(
            ["tune", str(spaces / "gpt2.yaml")],
            ["replace YOUR-BUCKET in storage_path and base.data.path with your bucket"],
            deadline=PLACEHOLDER_DEADLINE,
        ),
        # its bucket replaced by local folders, on this machine without GPUs
        "tune bert.yaml, no GPU": Case(
            [
                "tune",
                study_copy(
                    tmp,
                    "bert.yaml",
                    storage_path=str(local / "ray"),
                    base__data__path=str(local / "wiki-book-bert"),
                ),
            ],
            ["base.resources.gpus_per_worker", "needs 8 GPUs", "ray up cluster/gpu.yaml"],
        ),
        # a tracking server that does not answer stops the study before it prepares data
        "tune small.yaml, no server": Case(
            ["tune", str(spaces / "small.yaml")],
            ["MLFLOW_TRACKING_URI: MLflow at http://127.0.0.1:9 does not answer"],
            env={"MLFLOW_TRACKING_URI": DEAD},
        ),
        "tune accel-gpt.yaml, no server": Case(
            ["tune", str(spaces / "accel-gpt.yaml"), "--resume"],
            ["MLFLOW_TRACKING_URI: MLflow at http://127.0.0.1:9 does not answer"],
            env={"MLFLOW_TRACKING_URI": DEAD},
        ),
        # a bucket that cannot be reached (here: no network) is one line naming the field
        "tune, unreachable bucket": Case(
            [
                "tune",
                study_copy(
                    tmp,
                    "small.yaml",
                    storage_path="s3://apollo-ray-first-contact/ray",
                    tracking={"mlflow_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
                ),
            ],
            ["storage_path: cannot reach s3://apollo-ray-first-contact/ray", "AWS credentials"],
        ),
        "train, missing data": Case(
            ["train", str(ROOT / "configs" / "bert-tiny.yaml"), "--no-track"],
            ["data.path: ", "data/demo-bert: no manifest.json"],
        ),
        "train, placeholder bucket": Case(
            [
                "train",
                str(ROOT / "configs" / "bert-tiny.yaml"),
                "--set",
                "data.path=s3://YOUR-BUCKET/apollo/demo-bert",
            ],
            ["replace YOUR-BUCKET in data.path with your bucket"],
            deadline=PLACEHOLDER_DEADLINE,
        ),
        # a Ray address where nothing listens (ray.init would wait for it for minutes)
        "train, no Ray cluster": Case(
            [
                "train",
                str(ROOT / "configs" / "gpt-tiny.yaml"),
                *("--set", f"data.path={gpt_data}", "--set", "data.seq_len=32"),
                *("--address", "127.0.0.1:1", "--no-track"),
            ],
            ["--address 127.0.0.1:1: no Ray cluster answers", "ray up cluster/gpu.yaml"],
        ),
        "data prepare, missing file": Case(
            ["data", "prepare", "corpus.txt", "--kind", "bert", "--out", "data/corpus"],
            ["corpus.txt: no such file or directory"],
        ),
        "export, missing checkpoint": Case(
            ["export", "runs/bert-tiny/checkpoints/step-0000100.pt", "exported"],
            ["runs/bert-tiny/checkpoints/step-0000100.pt: no such checkpoint file"],
        ),
        "report, no store": Case(
            ["report", "demo-bert-small"], ["no MLflow store at outputs/mlflow.db"]
        ),
        "ui, no store": Case(["ui"], ["no MLflow store at outputs/mlflow.db"]),
        "ui, busy port": Case(
            ["ui", "--output-dir", str(tmp / "store"), "--port", str(port)],
            [f"--port {port}", "is in use"],
            offline=False,
        ),
        "cluster check, missing file": Case(
            ["cluster", "check", "cluster/gpu-azure.yaml"], ["cluster/gpu-azure.yaml"]
        ),
    }


def run(case: Case, cwd: Path) -> tuple[int | None, str, float]:
    """The command's exit status (None: past the deadline), its output and its time."""
    command = [sys.executable, "-m", f"apollo_ray.{case.args[0]}", *case.args[1:]]
    if case.offline:
        command = ["unshare", "-rn", *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **case.env}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=case.deadline
        )
    except subprocess.TimeoutExpired as e:
        output = "".join(
            x.decode() if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)
        )
        return None, output, case.deadline
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


@pytest.mark.slow
def test_documented_commands_fail_in_one_clear_line(tmp_path, gpt_data):
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to run commands without a network")
    store = tmp_path / "store"
    store.mkdir()
    (store / "mlflow.db").touch()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        table = cases(tmp_path, busy.getsockname()[1], gpt_data)
        cwd = tmp_path / "fresh"  # a fresh checkout's working directory: nothing prepared
        cwd.mkdir()
        (cwd / "cluster").mkdir()
        with ThreadPoolExecutor(3) as pool:
            results = dict(zip(table, pool.map(lambda c: run(c, cwd), table.values()), strict=True))

    failures = []
    for name, (code, output, seconds) in results.items():
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        problems = [
            f"exit status {code}" if code != 2 else "",
            "a traceback" if "Traceback" in output else "",
            f"{len(errors)} error lines" if len(errors) != 1 else "",
            *(f"no {s!r}" for s in table[name].says if errors and s not in errors[0]),
        ]
        if any(problems):
            failures.append(
                f"{name} ({seconds:.0f} s): {', '.join(filter(None, problems))}\n{output[-1500:]}"
            )
    assert not failures, "\n\n".join(failures)
    assert not (cwd / "data").exists(), "a study prepared data before its failed check"
