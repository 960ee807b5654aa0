"""What a Ray cluster can hold: the nodes it has now, and the most its autoscaler may add.

A study on an autoscaling cluster (`ray up cluster/gpu.yaml`, `min_workers: 0`) starts with the
head alone: `ray.cluster_resources()` has no GPU, yet the trials' GPU nodes come as soon as they
are asked for. So the pre-flight reads the autoscaler's node types (`node_types`: their
resources and how many of each it may launch) and refuses only a trial that no growth can hold,
naming the node types (`shortfall`); a study whose trial must wait for nodes asks the
autoscaler for them at once, for no longer than it lives (`apollo_ray.launch.scaling`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "NodeType",
    "describe",
    "fits_now",
    "from_config",
    "node_types",
    "shortfall",
    "workers_that_fit",
]

MONITOR_FLAG = "--autoscaling-config="  # how the head's autoscaler (monitor.py) names its config


@dataclass(frozen=True)
class NodeType:
    """An autoscaler node type: the resources of one node and how many there may be."""

    name: str
    resources: dict[str, float]
    max_count: int


def from_config(config: dict[str, Any]) -> list[NodeType]:
    """The node types of an autoscaler config (the cluster YAML as `ray up` resolved it: each
    type's resources filled in from its instance type): the head type once, every other type up
    to its `max_workers`, and none beyond the cluster's `max_workers`."""
    head = config.get("head_node_type")
    cap = config.get("max_workers", math.inf)
    types = []
    for name, spec in config.get("available_node_types", {}).items():
        count = 1 if name == head else min(spec.get("max_workers", cap), cap)
        types.append(NodeType(name, dict(spec.get("resources", {})), int(count)))
    return types


def node_types() -> list[NodeType] | None:
    """The node types of the connected cluster's autoscaler, or None for a cluster that does not
    grow. Read from the cluster config the autoscaler publishes in the GCS (autoscaler v2,
    KubeRay), else from the config file the head's autoscaler runs with (`ray up` writes
    `~/ray_bootstrap_config.yaml`); this process must run on the head node for the latter, as a
    study's driver does."""
    from ray._private.state import state

    published = state.get_cluster_config()
    if published is not None and published.node_group_configs:
        return [
            NodeType(g.name, dict(g.resources), g.max_count if g.max_count >= 0 else 10**6)
            for g in published.node_group_configs
        ]
    import ray

    path = _monitor_config(ray.get_runtime_context().gcs_address)
    if path is None or not path.exists():
        return None
    return from_config(yaml.safe_load(path.read_text()))  # JSON or YAML: YAML reads both


def _monitor_config(gcs_address: str) -> Path | None:
    """The `--autoscaling-config` of the autoscaler process of the cluster at `gcs_address`
    running on this machine, if there is one."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if not any(Path(part).name == "monitor.py" for part in cmdline):  # not log_monitor.py
            continue
        if f"--gcs-address={gcs_address}" not in cmdline:
            continue
        for part in cmdline:
            if part.startswith(MONITOR_FLAG):
                return Path(part.removeprefix(MONITOR_FLAG)).expanduser()
    return None


def workers_that_fit(per_worker: dict[str, float], resources: dict[str, float]) -> int:
    """How many workers needing `per_worker` one node with `resources` holds."""
    counts = [
        math.floor(resources.get(kind, 0) / amount) for kind, amount in per_worker.items() if amount
    ]
    return min(counts, default=0)


def fits_now(
    per_worker: dict[str, float], workers: int, now: dict[str, float], driver_cpu: float = 0.0
) -> bool:
    """Whether the cluster's resources `now` hold the workers and their driver's CPU."""
    need = _need(per_worker, workers, driver_cpu)
    return all(now.get(kind, 0) >= amount for kind, amount in need.items())


def _need(per_worker: dict[str, float], workers: int, driver_cpu: float) -> dict[str, float]:
    """All the resources of `workers` workers and their driver, by kind."""
    need = {kind: amount * workers for kind, amount in per_worker.items() if amount}
    need["CPU"] = need.get("CPU", 0) + driver_cpu
    return need


def shortfall(
    per_worker: dict[str, float],
    workers: int,
    now: dict[str, float],
    types: list[NodeType] | None,
    driver_cpu: float = 0.0,
    one_node: bool = False,
) -> str | None:
    """Why `workers` workers needing `per_worker` each (and a driver of `driver_cpu` CPU on the
    head) can never run at once on the cluster that has `now` and may grow by `types` (None:
    it does not grow), or None if they can: now, or once the autoscaler adds nodes. With
    `one_node` (STRICT_PACK) they must all fit one node of a type."""
    whole = types and any(workers_that_fit(per_worker, t.resources) >= workers for t in types)
    if one_node and types is not None and not whole:
        return (
            f"placement STRICT_PACK puts all {workers} workers of {describe(per_worker)} "
            f"on one node, and no node type of the autoscaler holds them: {_listed(types)}"
        )
    if fits_now(per_worker, workers, now, driver_cpu):
        return None
    if types is None:
        need = _need(per_worker, workers, driver_cpu)
        kind, amount = next((k, a) for k, a in need.items() if now.get(k, 0) < a)
        who = f"{workers} workers" + (" and its driver" if driver_cpu else "")
        return (
            f"a trial needs {amount:g} {kind} ({who}) but the Ray cluster has "
            f"{now.get(kind, 0):g}, and no autoscaler to add nodes"
        )
    listed = _listed(types)
    holding = [(t, workers_that_fit(per_worker, t.resources)) for t in types]
    if not any(n for _, n in holding):
        return (
            f"one worker needs {describe(per_worker)}, more than any node type of the "
            f"autoscaler offers: {listed}"
        )
    most = sum(n * t.max_count for t, n in holding)
    if most < workers:
        return (
            f"a trial needs {workers} workers of {describe(per_worker)} at once, but the "
            f"autoscaler's node types hold at most {most}: {listed}"
        )
    return None


def _listed(types: list[NodeType]) -> str:
    return "; ".join(f"{t.name} (up to {t.max_count}): {describe(t.resources)}" for t in types)


def describe(resources: dict[str, float]) -> str:
    """Ray resources as a person reads them: `1 CPU, 1 GPU`."""
    return ", ".join(f"{amount:g} {kind}" for kind, amount in resources.items() if amount) or "-"
