"""Rank 0's mirror of a run into MLflow: the run's record kept up to date while it trains.

`RunMirror` implements `apollo_ray.training.tracker.Tracker`, the interface the training loop
owns (its do-nothing twin `NullTracker` is what every other rank and every untracked run gets).
metrics.jsonl is the durable buffer: the mirror uploads its rows and the checkpoints its policy
wants, never stopping training when MLflow cannot be reached, and `sync` uploads what is left
afterwards. MLflow is imported only when a run is really mirrored, so training needs no MLflow
installed.

MLflow holds each row of metrics.jsonl exactly once. The cursor counts rows (a growth writes a
second row at a logged step), advances only when an upload is confirmed, and never passes the
rows a checkpoint covers: a run that resumes rewrites the rows after its checkpoint, so those are
uploaded only once a later checkpoint (or the end of the run) makes them final. Each point is
sent with the time its row was written, so an upload repeated after an unconfirmed attempt, or
by two processes at once (a trial's rank 0 and the study driver), is the same point again, which
MLflow's database stores keep once.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from apollo_ray.storage import fetch, is_uri
from apollo_ray.training.checkpoints import checkpoint_name, is_growth, name_order
from apollo_ray.training.runlog import METRICS, read_rows

if TYPE_CHECKING:
    from mlflow.entities import Metric

    from apollo_ray.training.checkpoints import Store

__all__ = [
    "RunMirror",
    "Target",
    "Uploader",
    "head_local",
    "metrics_of",
    "pending_rows",
    "quick_failure",
    "sync",
    "tracked",
]

STATE = "mlflow.json"  # in a run's folder: which run it mirrors and how much is uploaded
POLICIES = ("all", "last", "none")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
BATCH = 1000  # MLflow's limit of metrics per log_batch


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


@dataclass(frozen=True)
class Target:
    """Which MLflow run a training run mirrors, and which checkpoints it uploads."""

    uri: str
    run_id: str
    checkpoints: str = "last"
    every_s: float = 10.0  # how often rank 0 uploads new rows

    def __post_init__(self) -> None:
        if self.checkpoints not in POLICIES:
            raise ValueError(f"checkpoints must be one of {POLICIES}, got {self.checkpoints!r}")


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a metrics.jsonl row (`loss` is logged as `train_loss`; `step` and
    `time`, when the row was written, are the points' step and timestamp)."""
    out = {}
    for key, value in row.items():
        if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, int | float):
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
        from mlflow import MlflowClient

        self.client = MlflowClient(uri)

    def log_batch(self, run_id: str, metrics: list[Metric], patient: bool) -> None:
        with quick_failure(patient):
            for i in range(0, len(metrics), BATCH):
                self.client.log_batch(run_id, metrics=metrics[i : i + BATCH])

    def log_checkpoint(
        self, run_id: str, name: str, location: str, meta: dict[str, Any], patient: bool
    ) -> None:
        """Upload checkpoint `location` (a path or a pyarrow.fs URI) as `checkpoints/<name>.pt`,
        with `meta` beside it as `<name>.json`."""
        with tempfile.TemporaryDirectory() as tmp, quick_failure(patient):
            file = Path(tmp) / f"{name}.pt"
            if is_uri(location):
                if not fetch(location, file):  # not (yet) in storage: try again later
                    raise FileNotFoundError(f"checkpoint {location} is not in storage")
            else:
                os.symlink(Path(location).resolve(), file)
            (Path(tmp) / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
            self.client.log_artifacts(run_id, tmp, "checkpoints")


class RunMirror:
    """Keeps a run's MLflow record up to date from rank 0, without ever stopping training.

    metrics.jsonl is the durable buffer: the mirror uploads the rows that checkpoints cover (see
    the module's docstring) at most every `every_s` seconds, and the checkpoints the policy
    wants when they are saved; its cursor lives in `<run_dir>/mlflow.json`. If MLflow cannot be
    reached, the attempt fails fast (no HTTP retries), a warning is printed once, and nothing is
    lost: the rows stay behind the cursor and the checkpoint is listed as pending, both tried
    again after a growing pause (5 s up to 5 min) and by `sync` after training (the trial driver
    calls it; `python -m apollo_ray.report EXPERIMENT --sync` later)."""

    def __init__(
        self,
        target: Target,
        run_dir: str | Path,
        final_step: int,
        every_s: float | None = None,
        patient: bool = False,
        uploader: Uploader | None = None,
    ) -> None:
        self.target, self.run_dir = target, Path(run_dir)
        self.final = checkpoint_name(final_step)
        self.every_s = target.every_s if every_s is None else every_s
        self.patient = patient
        self.uploader = uploader or Uploader(target.uri)
        self.metrics = self.run_dir / METRICS
        # rows: how many rows MLflow has; covered: how many rows a checkpoint makes final
        self.state = {"rows": 0, "covered": 0, "logged": [], "pending": []}
        path = self.run_dir / STATE
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("run_id") == target.run_id:
                self.state.update({k: saved[k] for k in self.state if k in saved})
        self.last = 0.0
        self.pause, self.retry_at, self.warned = 5.0, 0.0, False
        self._save()  # the run folder names its MLflow run from the start (for `sync`)

    def start(self, store: Store) -> None:
        """Called when training (re)starts, once the metrics log holds exactly the rows its
        checkpoint covers; checkpoints the policy wants that are in `store` but not in MLflow
        (saved just before a worker died) are queued."""
        rows = len(read_rows(self.metrics))
        self.state["covered"] = rows
        self.state["rows"] = min(self.state["rows"], rows)
        self.found(store)

    def found(self, store: Store) -> None:
        """Queue the checkpoints in `store` that the policy wants and MLflow lacks."""
        known = set(self.state["logged"]) | {p[0] for p in self.state["pending"]}
        for name in store.names():
            if self.wants(name) and name not in known:
                self.state["pending"].append([name, store.location(name), self._row_of(name)])
        self._save()

    def settle(self, ended: bool, store: Store | None = None) -> None:
        """After training, from the driver: a run that `ended` (finished or diverged: it will
        not resume) has every row final; otherwise the rows its newest checkpoint in `store`
        covers are (the rows a retry would keep). Wanted checkpoints in `store` are queued."""
        rows = read_rows(self.metrics)
        covered = len(rows)
        if not ended:
            names = store.names() if store is not None else []
            covered = _covered(rows, names[-1]) if names else 0
        self.state["covered"] = max(self.state["covered"], covered)
        if store is not None:
            self.found(store)
        self._save()

    def wants(self, name: str) -> bool:
        policy = self.target.checkpoints
        if policy == "none":
            return False
        return name == self.final or (policy == "all" and is_growth(name))

    def poll(self) -> None:
        """Upload new rows if `every_s` has passed (and MLflow is not pausing after a failure)."""
        now = time.monotonic()
        if now - self.last >= self.every_s and now >= self.retry_at:
            self.flush()

    def flush(self) -> bool:
        """Upload every covered row and pending checkpoint not yet in MLflow; True when none is
        left."""
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
        """Called once a checkpoint is saved at `location` (a path or a pyarrow.fs URI): the rows
        written so far are final, and the checkpoint is queued if the policy wants it."""
        self.state["covered"] = len(read_rows(self.metrics))
        if self.wants(name) and name not in self.state["logged"]:
            self.state["pending"].append([name, location, row])
        self._save()
        if self.state["pending"] and time.monotonic() >= self.retry_at:
            self.flush()

    def close(self) -> bool:
        return self.flush()

    def _upload_rows(self) -> None:
        """Rows up to `covered`, in batches of whole rows, the cursor saved after each."""
        from mlflow.entities import Metric

        rows = read_rows(self.metrics)
        end = min(self.state["covered"], len(rows))
        batch: list[Metric] = []
        for i in range(self.state["rows"], end):
            row = rows[i]
            stamp = int(row.get("time", time.time()) * 1000)
            points = [Metric(k, v, stamp, row["step"]) for k, v in metrics_of(row).items()]
            if batch and len(batch) + len(points) > BATCH:
                self._log(batch, i)
                batch = []
            batch += points
        self._log(batch, end)

    def _log(self, batch: list[Metric], rows: int) -> None:
        """Upload `batch`, which ends with row `rows` - 1, and move the cursor past it."""
        if batch:
            self.uploader.log_batch(self.target.run_id, batch, self.patient)
        if rows > self.state["rows"]:
            self.state["rows"] = rows
            self._save()

    def _row_of(self, name: str) -> dict[str, Any]:
        """The metrics row of a checkpoint found in storage (for its metadata)."""
        step, tag = name_order(name)
        at_step = [r for r in read_rows(self.metrics) if r["step"] == step]
        growth = tag == 2  # post-growth: the growth's own row
        rows = [r for r in at_step if (r.get("event") == "growth") == growth]
        return rows[-1] if rows else {"step": step}

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
        state = {**asdict(self.target), "final": self.final, **self.state}
        tmp = self.run_dir / f"{STATE}.{os.getpid()}.tmp"  # two processes may save at once
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.run_dir / STATE)


def _covered(rows: list[dict[str, Any]], name: str) -> int:
    """How many rows a resume from checkpoint `name` keeps (`runlog.MetricsLog`'s rule: the rows
    before its step, and at its step all but the growth's row unless it is post-growth)."""
    step, tag = name_order(name)
    n = 0
    for row in rows:
        if row["step"] > step or (row["step"] == step and row.get("event") == "growth" and tag < 2):
            break
        n += 1
    return n


def sync(
    run_dir: str | Path,
    uri: str | None = None,
    *,
    ended: bool = False,
    store: Store | None = None,
) -> bool | None:
    """Upload what a run's mirror left behind (rows and checkpoints, see `RunMirror.settle`),
    retrying as MLflow does; None if the run was never tracked. `uri` overrides the recorded
    tracking URI (the study's local server listens on a new port each time)."""
    path = Path(run_dir) / STATE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    target = Target(uri or saved["uri"], saved["run_id"], saved["checkpoints"])
    final_step = name_order(saved["final"])[0] if "final" in saved else 0
    mirror = RunMirror(target, run_dir, final_step, patient=True)
    mirror.settle(ended, store)
    return mirror.flush()


def tracked(run_dir: str | Path) -> dict[str, Any] | None:
    """The recorded state of a run's mirror (`uri`, `run_id`, `rows`, ...), or None."""
    path = Path(run_dir) / STATE
    return json.loads(path.read_text()) if path.exists() else None


def pending_rows(run_dir: str | Path) -> int:
    """How many metrics rows of a tracked run are not in MLflow yet."""
    state = tracked(run_dir)
    if state is None:
        return 0
    return len(read_rows(Path(run_dir) / METRICS)) - state.get("rows", 0)
