"""MLflow records of runs and studies: what the MLflow UI shows of a search.

One MLflow experiment per study. The study is a parent run (the study YAML, Optuna's plots, the
summary table, the best trial's metrics); each trial and the scratch baseline are child runs
(tag `mlflow.parentRunId`) with the trial's whole config as params, per-step metrics, the
stage-wise checkpoints, a loss-vs-FLOPs plot against the baseline and a depth histogram per stage.

Who writes what (Ray's three tiers):
- the study driver (`apollo_ray.tune`) creates the experiment and the parent run, and at the end
  closes whatever a stopped trial left open (`TrialRunsCallback`, `close_leftovers`);
- each trial driver creates its child run (`start_run`), passes its `Target` to the workers, and
  after training uploads what is missing (`sync`), logs the scores and plots and ends the run
  (`finish_run`) in a `finally`;
- rank 0 of the Ray Train workers keeps the run up to date while training (`RunMirror`).

The default store is a SQLite database and an artifact folder under the study's output_dir.
SQLite takes one writer at a time, so a study on the local store logs through an MLflow server
that it starts on 127.0.0.1 for its own duration (`LocalServer`); on a cluster the tracking URI
(YAML `tracking.mlflow_uri` or MLFLOW_TRACKING_URI) names the head node's server.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

__all__ = [
    "DB_NAME",
    "LocalServer",
    "RunMirror",
    "Target",
    "close_leftovers",
    "find_run",
    "local_store",
    "log_params",
    "start_run",
    "sync",
]

DB_NAME = "mlflow.db"
ARTIFACTS = "mlartifacts"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
STATE = "mlflow.json"  # in a run's folder: which run it mirrors and how much is uploaded
KIND, TRIAL, STUDY = "apollo.kind", "apollo.trial_id", "apollo.study"  # tags: study|trial|baseline
POLICIES = ("all", "last", "none")


def local_store(output_dir: str | Path) -> tuple[str, str]:
    """(backend URI, artifact folder URI) of the default store under `output_dir` (absolute:
    Ray trials run in other working directories)."""
    root = Path(output_dir).resolve()
    return f"sqlite:///{root / DB_NAME}", (root / ARTIFACTS).as_uri()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`mlflow server` on 127.0.0.1 over the local store, as a context manager (`.uri`).

    The server holds the only SQLite connection, so concurrent trials do not lock each other out;
    artifacts are written by the clients straight into the artifact folder (experiments created
    here name it as their artifact location)."""

    def __init__(self, output_dir: str | Path, port: int | None = None, host: str = "127.0.0.1"):
        self.backend, self.artifacts = local_store(output_dir)
        self.host, self.port = host, port or free_port()
        self.uri = f"http://{self.host}:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = Path(output_dir).resolve() / "mlflow-server.log"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend,
            "--default-artifact-root",
            self.artifacts,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def __enter__(self) -> LocalServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            # its own session: a Ctrl-C in the terminal reaches the study, which still needs the
            # server to close its runs, and then stops it; it dies with the study if that is killed
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                # no GenAI job runners: a dozen ~250 MB processes that a training store never uses
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited at start; see {self.log}")
            if _answers(self.uri):
                return self
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} in 120 s; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _answers(uri: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def quick_failure(patient: bool) -> Iterator[None]:
    """MLflow retries a failed HTTP request 7 times with growing pauses (minutes in all); while
    training, one attempt is enough (the upload is tried again later). The timeout is the wait
    for an answer, not for a whole checkpoint upload; a refused connection fails at once."""
    if patient:
        yield
        return
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="30")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- runs (driver side)


def find_run(client: MlflowClient, experiment_id: str, **tags: str):
    """The newest run of the experiment carrying all `tags`, or None."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], query, max_results=1, order_by=["start_time DESC"])
    return runs[0] if runs else None


def start_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    tags: dict[str, str],
    parent_id: str | None = None,
    fresh: bool = False,
) -> str:
    """The id of a RUNNING run with these tags: an existing one (a resumed study or retried trial
    continues its run) unless `fresh`, or a new one, nested under `parent_id`."""
    found = None if fresh else find_run(client, experiment_id, **tags)
    if found is not None:
        client.update_run(found.info.run_id, status="RUNNING")
        if parent_id:  # a resumed study may have a new parent run: the child moves under it
            client.set_tag(found.info.run_id, MLFLOW_PARENT_RUN_ID, parent_id)
        return found.info.run_id
    all_tags = {**tags, MLFLOW_RUN_NAME: name}
    if parent_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_id
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def log_params(
    client: MlflowClient, run_id: str, params: dict[str, Any], searched: dict[str, Any]
) -> None:
    """The run's flattened config as params, and what the search chose again as `searched.<key>`
    (so the UI's columns and parallel-coordinates view can single them out). Params already
    logged are skipped (MLflow refuses to change a param)."""
    have = client.get_run(run_id).data.params
    items = {**params, **{f"searched.{k}": v for k, v in searched.items()}}
    new = [Param(k, _param_str(v)) for k, v in items.items() if k not in have]
    for i in range(0, len(new), 100):  # MLflow's log_batch limit
        client.log_batch(run_id, params=new[i : i + 100])


def _param_str(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return "null" if value is None else str(value)


def close_leftovers(client: MlflowClient, experiment_id: str, parent_id: str) -> list[str]:
    """End every child of `parent_id` still RUNNING (a trial stopped by ASHA or killed with its
    driver) as KILLED; returns their ids."""
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and attributes.status = 'RUNNING'"
    left = client.search_runs([experiment_id], query, max_results=10_000)
    for run in left:
        client.set_tag(run.info.run_id, "apollo.end", "stopped before it finished")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return [r.info.run_id for r in left]


# ---------------------------------------------------------------- rank 0: the run's mirror


@dataclass(frozen=True)
class Target:
    """Which MLflow run a training run mirrors, and which checkpoints it uploads."""

    uri: str
    run_id: str
    checkpoints: str = "last"

    def __post_init__(self) -> None:
        if self.checkpoints not in POLICIES:
            raise ValueError(f"checkpoints must be one of {POLICIES}, got {self.checkpoints!r}")


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a metrics.jsonl row (`loss` is logged as `train_loss`)."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out["train_loss" if key == "loss" else key] = float(value)
    return out


def head_local(uri: str) -> bool:
    """Whether `uri` names a store only the machine it was made on reaches: a server on
    loopback, or a database/folder path (on a cluster: the head node's)."""
    parsed = urlparse(uri)
    return parsed.scheme not in ("http", "https") or parsed.hostname in LOOPBACK


class Uploader:
    """The mirror's two MLflow calls, made from this process. On a cluster, rank 0 may sit on a
    node that cannot reach a head-local MLflow; `distributed.HeadRelay` runs this class in an
    actor on the head node instead, with the same methods."""

    def __init__(self, uri: str) -> None:
        self.client = MlflowClient(uri)

    def log_batch(self, run_id: str, metrics: list[Metric], patient: bool) -> None:
        with quick_failure(patient):
            for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
                self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def log_checkpoint(
        self, run_id: str, name: str, location: str, meta: dict[str, Any], patient: bool
    ) -> None:
        """Upload checkpoint `location` (a path or a pyarrow.fs URI) as `checkpoints/<name>.pt`,
        with `meta` beside it as `<name>.json`."""
        with tempfile.TemporaryDirectory() as tmp, quick_failure(patient):
            file = Path(tmp) / f"{name}.pt"
            if "://" in location:
                fs, path = pyarrow.fs.FileSystem.from_uri(location)
                pyarrow.fs.copy_files(path, str(file), source_filesystem=fs)
            else:
                os.symlink(Path(location).resolve(), file)
            (Path(tmp) / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
            self.client.log_artifacts(run_id, tmp, "checkpoints")


class RunMirror:
    """Keeps a run's MLflow record up to date from rank 0, without ever stopping training.

    metrics.jsonl is the durable buffer: the mirror uploads the rows written since its cursor (a
    byte offset kept in `<run_dir>/mlflow.json`) at most every `every_s` seconds and at the end;
    checkpoints that the policy wants are uploaded when saved. If MLflow cannot be reached, the
    attempt fails fast (no HTTP retries), a warning is printed once, and nothing is lost: the
    rows stay behind the cursor and the checkpoint is listed as pending, both tried again after a
    growing pause (5 s up to 5 min) and by `sync` after training (the trial driver calls it;
    `python -m apollo_ray.report EXPERIMENT --sync` later)."""

    def __init__(
        self,
        target: Target,
        run_dir: str | Path,
        final_step: int,
        every_s: float = 10.0,
        patient: bool = False,
        uploader: Uploader | None = None,
    ) -> None:
        self.target, self.run_dir = target, Path(run_dir)
        self.final = f"step-{final_step:07d}"
        self.every_s, self.patient = every_s, patient
        self.uploader = uploader or Uploader(target.uri)
        self.metrics = self.run_dir / "metrics.jsonl"
        self.state = {"offset": 0, "logged": [], "pending": []}
        path = self.run_dir / STATE
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("run_id") == target.run_id:
                self.state.update({k: saved[k] for k in self.state})
        self.last = 0.0
        self.pause, self.retry_at, self.warned = 5.0, 0.0, False
        self.start()
        self._save()  # the run folder names its MLflow run from the start (for `sync`)

    def start(self) -> None:
        """Called when training (re)starts: a resumed run rewrote metrics.jsonl up to its
        checkpoint, so the cursor cannot lie beyond its end (rows after it come again)."""
        size = self.metrics.stat().st_size if self.metrics.exists() else 0
        self.state["offset"] = min(self.state["offset"], size)

    def wants(self, name: str) -> bool:
        policy = self.target.checkpoints
        if policy == "none":
            return False
        return name == self.final or (policy == "all" and "-growth" in name)

    def poll(self) -> None:
        """Upload new rows if `every_s` has passed (and MLflow is not pausing after a failure)."""
        now = time.monotonic()
        if now - self.last >= self.every_s and now >= self.retry_at:
            self.flush()

    def flush(self) -> bool:
        """Upload every row and pending checkpoint not yet in MLflow; True when none is left."""
        self.last = time.monotonic()
        try:
            self._upload_rows()
            for name, location, row in list(self.state["pending"]):
                self._upload_checkpoint(name, location, row)
        except Exception as e:  # any failure to upload must leave training running
            self._failed(e)
            return False
        self.pause, self.retry_at, self.warned = 5.0, 0.0, False
        return True

    def checkpoint(self, name: str, location: str, row: dict[str, Any]) -> None:
        """Called once a checkpoint is saved at `location` (a path or a pyarrow.fs URI)."""
        if not self.wants(name) or name in self.state["logged"]:
            return
        self.state["pending"].append([name, location, row])
        self._save()
        if time.monotonic() >= self.retry_at:
            self.flush()

    def close(self) -> bool:
        return self.flush()

    def _upload_rows(self) -> None:
        if not self.metrics.exists():
            return
        with self.metrics.open("rb") as f:
            f.seek(self.state["offset"])
            data = f.read()
        end = data.rfind(b"\n") + 1  # whole lines only
        batch: list[Metric] = []
        now = int(time.time() * 1000)
        for line in data[:end].splitlines():
            row = json.loads(line)
            batch += [Metric(k, v, now, row["step"]) for k, v in metrics_of(row).items()]
        if batch:
            self.uploader.log_batch(self.target.run_id, batch, self.patient)
        self.state["offset"] += end
        self._save()

    def _upload_checkpoint(self, name: str, location: str, row: dict[str, Any]) -> None:
        meta = {
            "checkpoint": f"{name}.pt",
            "stored_at": location,
            "run_dir": str(self.run_dir),
            **{k: row.get(k) for k in ("step", "stage", "n_physical", "eval_loss", "flops")},
            "resume": f"place it as the latest checkpoint of {self.run_dir} and train again",
            "export": f"python -m apollo_ray.export {name}.pt HF_DIR [--tokenizer ...]",
        }
        self.uploader.log_checkpoint(self.target.run_id, name, location, meta, self.patient)
        self.state["pending"] = [p for p in self.state["pending"] if p[0] != name]
        self.state["logged"].append(name)
        self._save()

    def _failed(self, error: Exception) -> None:
        self.retry_at = time.monotonic() + self.pause
        self.pause = min(self.pause * 2, 300.0)
        if not self.warned:
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            warnings.warn(
                f"MLflow at {self.target.uri} did not take run {self.target.run_id}'s update "
                f"({type(error).__name__}: {first}); training goes on, the rows stay in "
                f"{self.metrics} and are uploaded when MLflow answers again",
                RuntimeWarning,
                stacklevel=2,
            )
            self.warned = True

    def _save(self) -> None:
        state = {**asdict(self.target), **self.state}
        tmp = self.run_dir / f"{STATE}.tmp"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.run_dir / STATE)


def sync(run_dir: str | Path, uri: str | None = None) -> bool | None:
    """Upload what a run's mirror left behind (rows and checkpoints), retrying as MLflow does;
    None if the run was never tracked. `uri` overrides the recorded tracking URI (the study's
    local server listens on a new port each time)."""
    path = Path(run_dir) / STATE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    target = Target(uri or saved["uri"], saved["run_id"], saved["checkpoints"])
    return RunMirror(target, run_dir, final_step=0, patient=True).flush()


def tracked(run_dir: str | Path) -> dict[str, Any] | None:
    """The recorded state of a run's mirror (`uri`, `run_id`, `offset`, ...), or None."""
    path = Path(run_dir) / STATE
    return json.loads(path.read_text()) if path.exists() else None


def pending_rows(run_dir: str | Path) -> int:
    """How many metrics rows of a tracked run are not in MLflow yet."""
    state, metrics = tracked(run_dir), Path(run_dir) / "metrics.jsonl"
    if state is None or not metrics.exists():
        return 0
    with metrics.open("rb") as f:
        f.seek(state["offset"])
        return f.read().count(b"\n")


def end_status(error: BaseException | None) -> str:
    """The MLflow status for a run that ended with `error` (None: it finished)."""
    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return "KILLED"
    return "FAILED"
