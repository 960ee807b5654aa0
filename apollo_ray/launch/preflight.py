"""The checks a run or study passes before anything costly starts, cheapest first.

`python -m apollo_ray.tune` and `python -m apollo_ray.train` run them in this order: the YAML
(`load_study` / `load_run_config`), `placeholders` (no network call for `YOUR-BUCKET`),
`machine` (a study that needs GPUs on a machine without them and no cluster named), the local
paths (`check_data` on local data), the tracking server, `storage` (each URI reached, with a
deadline), then Ray (`join_ray`) and its resources. Each failure is a `ConfigError` whose one
line names the YAML field or option and the way forward.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from apollo_ray.config import ConfigError, ResourcesConfig
from apollo_ray.storage import filesystem, is_uri, redact

__all__ = ["STORAGE_TIMEOUT", "folder", "join_ray", "machine", "placeholders", "storage"]

PLACEHOLDER = re.compile(r"\bYOUR[-_][A-Z0-9_-]*[A-Z0-9]")  # YOUR-BUCKET, YOUR_PROJECT, ...
STORAGE_TIMEOUT = 20.0  # seconds a storage URI has to answer (S3 resolves a bucket's region)
GPU_CLUSTER = (
    "run it on a GPU cluster (ray up cluster/gpu.yaml, then on its head: --address auto; "
    "see cluster/README.md), or try search_spaces/small.yaml on this machine"
)
CREDENTIALS = {
    "s3": "the bucket's name, your AWS credentials (aws sts get-caller-identity) and the network",
    "gs": "the bucket's name, your Google credentials (gcloud auth application-default login) "
    "and the network",
}

T = TypeVar("T")


def placeholders(fields: dict[str, Any]) -> None:
    """Refuse placeholders such as `YOUR-BUCKET` left in the values of `fields` (YAML field or
    option name -> value), naming every field that holds one."""
    found: dict[str, list[str]] = {}
    for field, value in fields.items():
        for token in PLACEHOLDER.findall(" ".join(map(str, _flat(value)))):
            found.setdefault(token, []).append(field)
    if found:
        token, where = next(iter(found.items()))
        what = token[len("YOUR-") :].replace("-", " ").replace("_", " ").lower()
        raise ConfigError(
            f"replace {token} in {' and '.join(where)} with your {what} (the comments at the top "
            "of the file say what goes there), or try search_spaces/small.yaml on this machine"
        )


def folder(field: str, location: str | os.PathLike | None) -> None:
    """Refuse a local folder that a run or study writes into but cannot: a file stands where
    it (or a folder above it) would be, or this user cannot write where it would be made."""
    if location is None or is_uri(str(location)):
        return
    path = Path(location).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"{field}: {existing} is a file, not a folder; name another folder, or move the file"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{field}: {existing} is not writable by you; name a folder you can write"
        )


def machine(resources: ResourcesConfig, address: str | None, field: str = "resources") -> None:
    """Refuse a run whose workers need more GPUs than this machine has when no Ray cluster is
    named (`address`, else RAY_ADDRESS): the local Ray it would start could never hold them."""
    if address or os.environ.get("RAY_ADDRESS"):
        return
    need = resources.workers * resources.gpus_per_worker
    if not need:
        return
    import torch

    have = torch.cuda.device_count()
    if have < need:
        raise ConfigError(
            f"{field}.gpus_per_worker: a run needs {need:g} GPUs ({resources.workers} workers x "
            f"{resources.gpus_per_worker:g}), this machine has {have}, and no Ray cluster was "
            f"named (--address or RAY_ADDRESS): {GPU_CLUSTER}"
        )


def storage(field: str, location: str | None, timeout: float = STORAGE_TIMEOUT) -> None:
    """Refuse a storage URI that cannot be reached within `timeout` seconds (bucket missing, no
    credentials, no network), naming `field` and what to check; a local path passes."""
    if location is None or not is_uri(location):
        return

    def reach() -> None:
        fs, path = filesystem(location)
        fs.get_file_info(path)

    scheme = location.split("://", 1)[0]
    check = CREDENTIALS.get(scheme, "the URI and the network")
    try:
        _within(timeout, reach)
    except TimeoutError:
        raise ConfigError(
            f"{field}: {redact(location)} did not answer within {timeout:g} s; check {check}"
        ) from None
    except (OSError, ValueError) as e:  # pyarrow: OSError, ArrowInvalid (a ValueError)
        raise ConfigError(
            f"{field}: cannot reach {redact(location)}: {_line(e)}; check {check}"
        ) from None


def join_ray(address: str | None, **options: Any) -> None:
    """`ray.init` on the cluster at `address` (else RAY_ADDRESS, else a new local Ray), unless
    this process has joined one already; a named cluster that does not answer is a
    `ConfigError` naming where the address came from, whether or not Ray is up here."""
    import ray

    named = address or os.environ.get("RAY_ADDRESS")
    source = "--address" if address else "RAY_ADDRESS"
    problem = _gcs_unreachable(named) if named else None
    if problem is None and ray.is_initialized():
        return
    if problem is None:
        try:
            ray.init(address=named, **options)
            return
        except ConnectionError as e:
            problem = _line(e)
    raise ConfigError(
        f"{source} {named}: no Ray cluster answers ({problem}); start one (ray up "
        "cluster/gpu.yaml, or ray start --head here) or leave it out for a local Ray"
    )


def _gcs_unreachable(address: str) -> str | None:
    """Why nothing listens at a `host:port` Ray address, or None if something does (or it is
    `auto` or a `ray://` client address, which Ray itself resolves): `ray.init` would wait for
    such a cluster for minutes. Ray dials this machine's address for 127.0.0.1 and localhost,
    so those are tried both ways."""
    if address == "auto" or "://" in address:
        return None
    from ray._private.services import get_node_ip_address

    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return f"expected host:port, auto or ray://host:port, got {address!r}"
    hosts = [host, get_node_ip_address()] if host in ("127.0.0.1", "localhost") else [host]
    error: OSError | None = None
    for candidate in hosts:
        try:
            socket.create_connection((candidate, int(port)), timeout=5).close()
            return None
        except OSError as e:
            error = e
    return f"{type(error).__name__}: {error.strerror or error}"


def _within(seconds: float, call: Callable[[], T]) -> T:
    """`call()` in a daemon thread; TimeoutError if it has not returned after `seconds` (it is
    left running: the process is about to stop with the error)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # handed to the caller
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _line(error: BaseException) -> str:
    """The first line of an error's message, without the C++ source location pyarrow adds."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"\s+", " ", text)


def _flat(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [item for v in value for item in _flat(v)]
    return [value]
