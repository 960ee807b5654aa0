"""The yardstick every trial of a study is read against: the scratch frontier, trained once.

The frontier is a set of from-scratch runs of the study's base model (no schedule: full depth
from step 0) at several budgets (`frontier`: 1/4, 1/2, 1 and 2 times base.train.steps by
default), each with its own warmup and full decay (docs/method.md, section 8). Each run is
cached in `<output_dir>/baselines/<key>/` by a key of what determines its curve, the config and
the prepared data, so another study with the same setup reuses it instead of training it again.
In MLflow they are the children of the study's `baseline` run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from apollo_ray.config import RunConfig
from apollo_ray.data import load_manifest
from apollo_ray.launch import distributed, solo
from apollo_ray.records.results import log_frontier, log_run_results
from apollo_ray.records.tracking import KIND, STUDY, StudyRecord, group_run, tracked_run
from apollo_ray.storage import join_uri
from apollo_ray.study.schema import BASELINES, StudyConfig
from apollo_ray.training.runlog import METRICS
from apollo_ray.yardstick.scratch import Scratch

__all__ = [
    "DONE_MARKER",
    "baseline_key",
    "ensure_frontier",
    "frontier_configs",
]

DONE_MARKER = "done.json"  # in a scratch run's folder once it trained to the end


def baseline_key(cfg: RunConfig) -> str:
    """`<config hash>-<data hash>`: 12 hex digits of what determines the curve in the config
    (model, data, train, seed and the number of workers, i.e. the global batch; not name,
    out_dir, schedule, max_failures, nor where a branch forks from a trunk: a branch ends
    bit-identical to the same run trained alone), and 8 of the prepared data's manifest (data
    prepared again is a new baseline)."""
    determines = {
        "model": cfg.model.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", exclude={"branch_steps", "fork_from"}),
        "seed": cfg.seed,
        "workers": cfg.resources.workers,
    }
    canonical = json.dumps(determines, sort_keys=True, separators=(",", ":"))
    manifest = load_manifest(cfg.data.path).model_dump_json()
    return f"{_digest(canonical)[:12]}-{_digest(manifest)[:8]}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def frontier_configs(study: StudyConfig) -> dict[float, RunConfig]:
    """budget -> the scratch run of that budget: base without a schedule, `budget` times its
    steps, named `scratch-<budget>x`, in <output_dir>/baselines/<baseline_key>."""
    configs = {}
    for budget in study.frontier:
        data = study.base.model_dump()
        data["train"]["steps"] = round(budget * study.base.train.steps)
        data |= {"schedule": None, "name": f"scratch-{budget:g}x"}
        key = baseline_key(RunConfig.model_validate(data))
        data["out_dir"] = join_uri(study.baselines_dir, key)
        configs[budget] = RunConfig.model_validate(data)
    return configs


def ensure_frontier(study: StudyConfig, record: StudyRecord | None = None) -> Scratch:
    """Train (or reuse) the scratch runs of the frontier. With `record`, they are children of
    the study's `baseline` run in MLflow (a reused one is uploaded from its files), which holds
    the frontier's points and plot."""
    tags = {KIND: "baseline", STUDY: study.experiment}
    params = {"frontier": study.frontier, "steps": study.base.train.steps}
    with group_run(record, "baseline", tags, params) as group:
        runs = {}
        for budget, cfg in frontier_configs(study).items():
            runs[budget] = str(_ensure_run(study, group, cfg, budget))
        scratch = Scratch(runs)
        if group is not None:
            log_frontier(group, scratch.frontier(), scratch.curves(), study.experiment)
    return scratch


def _ensure_run(
    study: StudyConfig, group: StudyRecord | None, cfg: RunConfig, budget: float
) -> Path:
    run_dir = cfg.output_dir
    metrics = run_dir / METRICS
    cached = (run_dir / DONE_MARKER).exists()
    searched = {"budget": budget}
    storage = study.storage(BASELINES)
    folder = join_uri(storage, run_dir.name)
    with tracked_run(
        study, group, cfg, "frontier", searched, trial_id=cfg.name, storage=folder
    ) as target:
        if cached:
            print(f"scratch {budget:g}x: reusing {run_dir}", file=sys.stderr)
            if target is not None:  # its rows and checkpoints are uploaded on the way out
                group.client().set_tag(target.run_id, "apollo.cached", str(run_dir))
        else:
            print(f"scratch {budget:g}x: training in {run_dir}", file=sys.stderr)
            if solo.applies(cfg):
                last = solo.run(cfg, tracking=target, storage_path=storage)
            else:
                last = distributed.run(cfg, tracking=target, storage_path=storage).metrics
            (run_dir / DONE_MARKER).write_text(json.dumps(last, indent=2) + "\n")
        if target is not None:
            log_run_results(group.client(), target.run_id, cfg, metrics, None, None)
    return metrics
