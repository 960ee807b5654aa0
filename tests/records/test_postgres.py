"""MLflow on a database server (issue 15): a throwaway PostgreSQL on 127.0.0.1, `mlflow server`
over it, and runs logging to it at the same time from several processes (mirrors replaying
recorded runs, as rank 0 of concurrent trials would), one run uploaded twice at once (its rank 0
and its trial driver): every record holds each row of its metrics.jsonl exactly once."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apollo_ray.records.mirror import STATE, RunMirror, Target, sync
from apollo_ray.records.mlflow_server import LocalServer, free_port
from apollo_ray.training.runlog import METRICS

LIVE_RUNS = 4  # replayed by their own mirror as they "train", each in its own process
ROWS = 160  # rows of a recorded run
CHUNK = 40  # rows between two checkpoints of a replayed run (each upload is one chunk)


def _postgres_bin() -> Path | None:
    """The bin folder of Debian's newest PostgreSQL server (`apt-get install postgresql`)."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    versions = [p for p in found if re.fullmatch(r"\d+", p.parent.name)]
    return max(versions, key=lambda p: int(p.parent.name)) if versions else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster of its own on 127.0.0.1 (a free port, fsync off: it is thrown away),
    with a database `mlflow` that user `mlflow` reaches without a password from 127.0.0.1;
    yields its URI. PostgreSQL refuses to run as root, so as root it runs as `postgres`."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's postgresql (`make postgres`, see .ci/run)")
        pytest.skip("needs Debian's postgresql (`make postgres`; see README, Tests)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="apollo-pg-"))  # not pytest's tmp: only root enters it
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.fail("running as root, but there is no `postgres` user to run PostgreSQL as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*as_user, *map(str, cmd)], cwd=root, capture_output=True, text=True, timeout=120
        )
        if check and done.returncode:
            log = root / "server.log"
            server = log.read_text() if log.exists() else ""
            pytest.fail(f"{cmd[0]} failed:\n{done.stdout}{done.stderr}{server}")
        return done

    data, port = root / "data", free_port()
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": port,
        "unix_socket_directories": root,
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    options = " ".join(f"-c {k}={v}" for k, v in settings.items())
    try:
        run(bin_dir / "initdb", "-D", data, "-U", "mlflow", "--auth=trust", "--no-sync",
            "--no-locale", "-E", "UTF8")  # fmt: skip
        run(bin_dir / "pg_ctl", "-D", data, "-l", root / "server.log", "-o", options, "-w",
            "-t", "60", "start")  # fmt: skip
        run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "mlflow", "mlflow")
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        if (data / "postmaster.pid").exists():
            run(bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over the PostgreSQL database (it creates MLflow's tables)."""
    with LocalServer(tmp_path_factory.mktemp("mlflow"), backend=postgres) as local:
        yield local.uri


def recorded(seed: int) -> list[dict[str, Any]]:
    """A recorded run's metrics.jsonl rows, as a growing trial writes them (deterministic):
    an evaluation at step 0 and every 10th row, a growth in the middle (a second row at a logged
    step, with the same n_physical: two points that differ only in their time), each row with
    the time it was written."""
    t0 = 1_760_000_000.0 + 1000.0 * seed
    rows: list[dict[str, Any]] = [
        {"step": 0, "tokens": 0, "flops": 0, "eval_loss": 5.5 + 0.01 * seed, "time": t0}
    ]
    for i in range(1, ROWS):
        step, stage = 8 * i, int(i > ROWS // 2)
        row = {
            "step": step,
            "loss": round(5.0 * math.exp(-i / 80) + 0.5 + 0.001 * seed, 6),
            "stage": stage,
            "n_physical": 4 * 2**stage,
            "lr": round(1e-3 * min(1.0, i / 20), 8),
            "grad_norm": round(1.0 + 0.5 * math.sin(i + seed), 6),
            "tokens": 4096 * step,
            "flops": 1_000_000 * step,
            "time": round(t0 + 0.25 * i, 3),
        }
        if i % 10 == 0:
            row["eval_loss"] = round(row["loss"] + 0.05, 6)
        rows.append(row)
        if i == ROWS // 2:  # the growth to stage 1, after the step's training row
            rows.append(
                {
                    "step": step,
                    "event": "growth",
                    "stage": 1,
                    "n_from": 4,
                    "n_physical": 4,
                    "eval_loss": round(row["loss"] + 0.07, 6),
                    "time": round(t0 + 0.25 * i + 0.1, 3),
                }
            )
    return rows


def points(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, int, float]]]:
    """What MLflow must hold: per metric, one (step, timestamp in ms, value) per row that has it
    (`loss` is logged as `train_loss`; `step` and `time` are no metrics, nor is `event`)."""
    out: dict[str, list[tuple[int, int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key in ("step", "time", "event"):
                continue
            name = "train_loss" if key == "loss" else key
            out.setdefault(name, []).append((row["step"], int(row["time"] * 1000), float(value)))
    return {k: sorted(v) for k, v in out.items()}


def write_rows(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    with (run_dir / METRICS).open("a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))


def replay(uri: str, run_id: str, run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Rank 0 of a trial, replayed: the rows appear a chunk at a time, each chunk followed by a
    checkpoint (which makes its rows final) and an upload; the trial driver syncs at the end."""
    mirror = RunMirror(Target(uri, run_id, "none", every_s=0), run_dir, rows[-1]["step"])
    for i in range(0, len(rows), CHUNK):
        write_rows(run_dir, rows[i : i + CHUNK])
        chunk_end = rows[min(i + CHUNK, len(rows)) - 1]["step"]
        mirror.checkpoint(f"step-{chunk_end:07d}", "unused", {})
        mirror.flush()  # a failure leaves the rows behind the cursor, for `sync`
    assert sync(run_dir, uri, ended=True)


def upload(uri: str, run_dir: Path, times: int = 1) -> None:
    """The trial driver's `sync` of a run whose whole metrics.jsonl is written (`times` over:
    the first uploads, the others find nothing left but still read and save the cursor)."""
    for _ in range(times):
        assert sync(run_dir, uri, ended=True)


def at_once(jobs: list[Callable[[], None]]) -> None:
    """Run each job in a process of its own (forked: no imports to wait for), all released at
    the same moment; every one must succeed."""
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(len(jobs))

    def start(job: Callable[[], None]) -> None:
        barrier.wait(60)
        job()

    processes = [fork.Process(target=start, args=(job,)) for job in jobs]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    for p in processes:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in processes] == [0] * len(jobs)  # the tracebacks are in stderr


def expect_complete(client, runs: dict[str, tuple[Path, list[dict[str, Any]]]]) -> None:
    """Each run's record holds exactly the points of its rows: none missing, none twice."""
    for run_id, (run_dir, rows) in runs.items():
        expected = points(rows)
        assert set(client.get_run(run_id).data.metrics) == set(expected), run_dir.name
        for key, want in expected.items():
            history = client.get_metric_history(run_id, key)
            got = sorted((m.step, m.timestamp, m.value) for m in history)
            assert got == want, f"{run_dir.name}: {key}"
        assert json.loads((run_dir / STATE).read_text())["rows"] == len(rows)


def recorded_run(client, experiment: str, uri: str, run_dir: Path, seed: int):
    """A new MLflow run and a folder holding its whole recorded metrics.jsonl, registered as the
    mirror registers a run (`mlflow.json`), nothing uploaded yet."""
    run_id = client.create_run(experiment, run_name=run_dir.name).info.run_id
    rows = recorded(seed)
    run_dir.mkdir()
    write_rows(run_dir, rows)
    RunMirror(Target(uri, run_id, "none"), run_dir, rows[-1]["step"])
    return run_id, rows


@pytest.mark.slow
def test_concurrent_mirrors_log_every_row_once_on_postgres(server, tmp_path):
    """Four trials' mirrors log at the same time, each from its own process, while a fifth run
    is uploaded by two processes at once (the trial's rank 0 and its driver, each with its own
    view of the run folder): each run's record in MLflow is its metrics.jsonl, every point once
    (PostgreSQL keeps a point sent twice once), none missing."""
    from mlflow import MlflowClient

    client = MlflowClient(server)
    experiment = client.create_experiment("concurrent mirrors")
    runs: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
    jobs: list[Callable[[], None]] = []
    for seed in range(LIVE_RUNS):
        run_id = client.create_run(experiment, run_name=f"trial-{seed}").info.run_id
        run_dir, rows = tmp_path / f"trial-{seed}", recorded(seed)
        run_dir.mkdir()
        runs[run_id] = run_dir, rows
        jobs.append(lambda a=(server, run_id, run_dir, rows): replay(*a))
    twice = tmp_path / f"trial-{LIVE_RUNS}"
    run_id, rows = recorded_run(client, experiment, server, twice, LIVE_RUNS)
    runs[run_id] = twice, rows
    copy = shutil.copytree(twice, tmp_path / "trial-copy")  # the same run, seen from elsewhere
    jobs += [lambda: upload(server, twice), lambda: upload(server, copy)]

    at_once(jobs)

    expect_complete(client, runs)
    assert json.loads((copy / STATE).read_text())["rows"] == len(rows)


@pytest.mark.slow
def test_two_syncs_of_one_run_folder_at_once(server, tmp_path):
    """Two processes `sync` the same run folder at the same moment (a trial's rank 0 and the
    study driver on a shared file system): both succeed, and MLflow has every row once."""
    from mlflow import MlflowClient

    client = MlflowClient(server)
    experiment = client.create_experiment("one folder, two syncs")
    run_dir = tmp_path / "trial"
    run_id, rows = recorded_run(client, experiment, server, run_dir, 10)

    at_once([lambda: upload(server, run_dir, times=20)] * 2)

    expect_complete(client, {run_id: (run_dir, rows)})
