"""The local MLflow store and its server: where a study's records go when no server is named.

The default store is a SQLite database and an artifact folder under the study's output_dir.
SQLite takes one writer at a time, so a study on the local store logs through an MLflow server
that it starts on 127.0.0.1 for its own duration (`LocalServer`, via `tracking_uri`); on a
cluster the tracking URI (YAML `tracking.mlflow_uri` or MLFLOW_TRACKING_URI) names the head
node's server. `python -m apollo_ray.ui` serves the same store for browsing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apollo_ray.config import ConfigError
from apollo_ray.storage import redact

__all__ = [
    "DB_NAME",
    "LocalServer",
    "answers",
    "check_tracking",
    "local_store",
    "serving",
    "tracking_uri",
]

DB_NAME = "mlflow.db"
ARTIFACTS = "mlartifacts"
SERVING = "mlflow-server.json"  # while a LocalServer runs: its URI and process id


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
    here name it as their artifact location). `backend` replaces the SQLite database with
    another store, e.g. `postgresql://user@host:5432/db` (psycopg2 installed)."""

    def __init__(
        self,
        output_dir: str | Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        backend: str | None = None,
    ):
        self.backend, self.artifacts = local_store(output_dir)
        self.backend = backend or self.backend
        self.host, self.port = host, port or free_port()
        self.uri = f"http://{self.host}:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = Path(output_dir).resolve() / "mlflow-server.log"
        self.record = Path(output_dir).resolve() / SERVING

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
            "--app-name",
            "apollo",  # MLflow's app, opening experiments in the model-training view (ui_app)
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
                # nor the AI gateway, whose "Detect Issues" pop-up covers the page
                env={
                    **os.environ,
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                    "MLFLOW_ENABLE_AI_GATEWAY": "false",
                },
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited at start; see {self.log}")
            if answers(self.uri):
                self.record.write_text(json.dumps({"uri": self.uri, "pid": self.process.pid}))
                return self
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} in 120 s; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and serving(self.record.parent) == self.uri:
            self.record.unlink()
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


def serving(output_dir: str | Path) -> str | None:
    """The URI of the `LocalServer` another process runs over the local store in `output_dir`
    (a study, or a single run), if it still answers: a second server over one SQLite database
    would be a second writer."""
    record = Path(output_dir).resolve() / SERVING
    try:
        found = json.loads(record.read_text())
        os.kill(found["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return found["uri"] if answers(found["uri"]) else None


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def answers(uri: str) -> bool:
    """Whether an MLflow server answers its health check at `uri`."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def tracking_uri(configured: str | None, output_dir: str) -> Iterator[str]:
    """The tracking URI to log to: `configured` (a YAML's `tracking.mlflow_uri`), else
    MLFLOW_TRACKING_URI, else the server another process runs over the local store in
    `output_dir`, else a new MLflow server on 127.0.0.1 over that store, for the duration of
    the block."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one per run ended
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or serving(output_dir)
    if uri:
        yield uri
        return
    with LocalServer(output_dir) as server:
        print(
            f"mlflow: store {server.backend}, served at {server.uri} while this runs; "
            f"afterwards: python -m apollo_ray.ui --output-dir {output_dir}",
            file=sys.stderr,
        )
        yield server.uri


def check_tracking(uri: str, field: str | None = None) -> None:
    """Fail fast, before Ray starts, if MLflow does not answer at `uri`, naming where the URI
    came from: `field` (a YAML field or option), else MLFLOW_TRACKING_URI."""
    from mlflow import MlflowClient

    from apollo_ray.records.mirror import quick_failure

    try:
        with quick_failure(patient=False):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        source = field or (
            "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "MLflow"
        )
        raise ConfigError(
            f"{source}: MLflow at {redact(uri)} does not answer ({type(e).__name__}); start the "
            "server (on a cluster, ray up starts it on the head), fix the URI, or leave it out "
            "for the local store in output_dir"
        ) from None
