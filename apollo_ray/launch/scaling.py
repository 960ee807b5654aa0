"""A study's request to the autoscaler, held no longer than the study's driver lives.

Ray's `request_resources` is one cluster-wide slot without owner, job or expiry (autoscaler v1,
which `ray up` runs, keeps it in the GCS's key-value store, `ray/autoscaler/_private/
commands.py`; v2 as a cluster resource constraint): the nodes it asks for stay up, busy or
idle, until the next call replaces it. A study clears it in a `finally`, which a driver killed
by SIGKILL (an OOM kill, `ray job stop` escalating) never reaches, and one 8-GPU node would run
until `ray down`. So `requested` pairs the request with a detached watchdog actor on the head
node: it asks the GCS every `POLL_S` seconds whether the driver's job is still alive, and once
it is dead clears the request, if it is still this study's (`OWNER_KEY` names the job of the
last request made through here), and exits.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import ray
from ray.autoscaler.sdk import request_resources
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

from apollo_ray.launch.distributed import HEAD_NODE

__all__ = ["OWNER_KEY", "POLL_S", "requested"]

OWNER_KEY = b"apollo_ray/autoscaler_request_job"
NAMESPACE = "apollo_ray"
POLL_S = 2.0


@contextlib.contextmanager
def requested(bundles: list[dict[str, float]]) -> Iterator[None]:
    """Ask the autoscaler for nodes that hold `bundles` until the block ends or this driver's
    job dies, whichever comes first. The watchdog is up before the request is made."""
    job = ray.get_runtime_context().get_job_id()
    watchdog = (
        ray.remote(Watchdog)
        .options(
            name=f"request-watchdog-{job}",
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            resources={HEAD_NODE: 0.001},  # never on a node it may keep up
        )
        .remote(job)
    )
    ray.get(watchdog.ready.remote())
    _internal_kv_put(OWNER_KEY, job.encode(), overwrite=True)
    request_resources(bundles=bundles)
    try:
        yield
    finally:
        _clear(job)
        ray.kill(watchdog)


def _clear(job: str) -> None:
    """Withdraw the request if the last one was `job`'s."""
    if _internal_kv_get(OWNER_KEY) == job.encode():
        request_resources(num_cpus=0)
        _internal_kv_put(OWNER_KEY, b"", overwrite=True)


class Watchdog:
    """A detached actor that clears `job`'s request once the job is dead, then exits."""

    def __init__(self, job: str) -> None:
        self.job = job
        threading.Thread(target=self._watch, daemon=True).start()

    def ready(self) -> bool:
        return True

    def _watch(self) -> None:
        while not _dead(self.job):
            time.sleep(POLL_S)
        _clear(self.job)
        ray.kill(ray.get_runtime_context().current_actor)

    def __repr__(self) -> str:
        return f"Watchdog(job {self.job})"


def _dead(job: str) -> bool:
    """Whether the GCS has `job` (a hex job id) as finished: its driver exited or was killed
    (the GCS notices when the driver's connection drops). A private GCS call: `ray.util.state`
    needs the dashboard, which a head may run without."""
    gcs = ray._private.worker.global_worker.gcs_client
    try:
        jobs = gcs.get_all_job_info(
            job_or_submission_id=job,
            skip_submission_job_info_field=True,
            skip_is_running_tasks_field=True,
            timeout=10,
        )
    except Exception:  # the GCS restarting: ask again at the next poll
        return False
    return all(info.is_dead for info in jobs.values())
