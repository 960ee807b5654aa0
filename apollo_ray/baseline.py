"""The scratch baseline every trial of a study is measured against: its config, its key, and
training it once.

The baseline is the study's base run without a schedule (full depth from step 0). It is cached
in `<output_dir>/baselines/<key>/` by a key of what determines its curve, the config and the
prepared data, so another study with the same setup reuses it instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from apollo_ray import distributed
from apollo_ray.checkpoints import CHECKPOINT_FILE, checkpoint_name
from apollo_ray.config import RunConfig
from apollo_ray.data import load_manifest
from apollo_ray.mirror import RunMirror
from apollo_ray.results import log_run_results
from apollo_ray.runlog import METRICS
from apollo_ray.storage import join_uri
from apollo_ray.study import BASELINES, StudyConfig
from apollo_ray.tracking import StudyRecord, tracked_run

__all__ = ["DONE_MARKER", "baseline_config", "baseline_key", "ensure_baseline"]

DONE_MARKER = "done.json"  # in the baseline's folder once it trained to the end


def baseline_key(cfg: RunConfig) -> str:
    """`<config hash>-<data hash>`: 12 hex digits of what determines the curve in the config
    (model, data, train, seed and the number of workers, i.e. the global batch; not name,
    out_dir, schedule or max_failures), and 8 of the prepared data's manifest (data prepared
    again is a new baseline)."""
    determines = {
        "model": cfg.model.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "seed": cfg.seed,
        "workers": cfg.resources.workers,
    }
    canonical = json.dumps(determines, sort_keys=True, separators=(",", ":"))
    manifest = load_manifest(cfg.data.path).model_dump_json()
    return f"{_digest(canonical)[:12]}-{_digest(manifest)[:8]}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def baseline_config(study: StudyConfig) -> RunConfig:
    """The scratch baseline of a study: base without a schedule, named "baseline", in
    <output_dir>/baselines/<baseline_key>."""
    out_dir = join_uri(study.baselines_dir, baseline_key(study.base))
    data = {**study.base.model_dump(), "schedule": None, "name": "baseline", "out_dir": out_dir}
    return RunConfig.model_validate(data)


def ensure_baseline(study: StudyConfig, record: StudyRecord | None = None) -> Path:
    """Train (or reuse) the scratch baseline; returns its metrics.jsonl. With `record`, the
    baseline is a child run of the study in MLflow (a reused one is uploaded from its files)."""
    cfg = baseline_config(study)
    run_dir = cfg.output_dir
    metrics = run_dir / METRICS
    cached = (run_dir / DONE_MARKER).exists()
    with tracked_run(study, record, cfg, "baseline", {}) as target:
        if cached:
            print(f"baseline: reusing {run_dir}", file=sys.stderr)
            if target is not None:  # its rows and (policy permitting) its final checkpoint
                mirror = RunMirror(target, run_dir, cfg.train.steps)
                final = checkpoint_name(cfg.train.steps)
                location = join_uri(study.storage(BASELINES), run_dir.name, final, CHECKPOINT_FILE)
                mirror.checkpoint(final, location, _last_row(metrics))
                mirror.flush()
                record.client().set_tag(target.run_id, "apollo.cached", str(run_dir))
        else:
            print(f"baseline: training the scratch model in {run_dir}", file=sys.stderr)
            result = distributed.run(cfg, tracking=target, storage_path=study.storage(BASELINES))
            (run_dir / DONE_MARKER).write_text(json.dumps(result.metrics, indent=2) + "\n")
        if target is not None:
            log_run_results(record.client(), target.run_id, cfg, metrics, metrics, None)
    return metrics


def _last_row(metrics: Path) -> dict[str, Any]:
    return json.loads(metrics.read_text().splitlines()[-1])
