"""The yardstick every trial of a study is read against: the scratch frontier, trained once.

The frontier is a set of from-scratch runs of the study's base model (no schedule: full depth
from step 0) at several budgets (`frontier`: 1/4, 1/2, 1 and 2 times base.train.steps by
default), each with its own warmup and full decay (docs/method.md, section 8). Each run is
cached in `<output_dir>/baselines/<key>/` by a key of what determines its curve, the config and
the prepared data, so another study with the same setup reuses it instead of training it again.
In MLflow they are the children of the study's `baseline` run. Runs that do not depend on each
other (the sweep's LRs, its cosine runs, the reading seed's settings) train side by side, as many
at once as the cluster's resources hold.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import tempfile
import threading
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

from apollo_ray.config import ConfigError, RunConfig
from apollo_ray.data import DataError, load_manifest
from apollo_ray.launch import distributed, solo
from apollo_ray.records.results import log_frontier, log_run_results
from apollo_ray.records.tracking import KIND, STUDY, StudyRecord, group_run, tracked_run
from apollo_ray.search.sweep import (
    KEEP_ALL,
    Job,
    Setting,
    alone,
    choose,
    cosine_jobs,
    scratch_run,
    wsd_runs,
)
from apollo_ray.search.sweep import sweep as tune
from apollo_ray.storage import exists, fetch, join_uri
from apollo_ray.study.schema import BASELINES, StudyConfig
from apollo_ray.training.checkpoints import (
    CHECKPOINT_FILE,
    StorageStore,
    checkpoint_name,
    is_periodic,
)
from apollo_ray.training.checkpoints import load as load_checkpoint
from apollo_ray.training.optim import decay_start
from apollo_ray.training.runlog import METRICS, last_eval, read_rows
from apollo_ray.training.trainer import Trainer
from apollo_ray.yardstick.envelope import EvalPoint, Flag, check, sample_points
from apollo_ray.yardstick.scratch import Scratch

__all__ = [
    "DONE_MARKER",
    "baseline_key",
    "ensure_frontier",
    "frontier_configs",
]

T = TypeVar("T")

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
    """Train (or reuse) the scratch runs of the frontier: tuned per budget when the study has a
    `baseline` sweep (`tuned`), else one run per budget at base's LR. With `record`, they are
    children of the study's `baseline` run in MLflow (a reused one is uploaded from its files),
    which holds the frontier's points and plot."""
    tags = {KIND: "baseline", STUDY: study.experiment}
    params = {"frontier": study.frontier, "steps": study.base.train.steps}
    with group_run(record, "baseline", tags, params) as group:
        if study.baseline is None:
            runs = {
                budget: str(_ensure_run(study, group, cfg, {"budget": budget}))
                for budget, cfg in frontier_configs(study).items()
            }
            scratch = Scratch(runs)
        else:
            scratch = tuned(study, group)
        if group is not None:
            log_frontier(group, scratch.frontier(), scratch.curves(), study.experiment)
    return scratch


def tuned(study: StudyConfig, group: StudyRecord | None) -> Scratch:
    """The tuned frontier: the wsd sweep over the LRs (extended past a chosen edge), cosine at
    the chosen LR for the budgets from 1/4 to 1x, on the sweep seed; the best setting per
    budget on validation, trained on the base seed. The any-checkpoint check
    (`apollo_ray/yardstick/envelope.py`) holds every scratch evaluation against that frontier;
    each flagged point is read from its checkpoint on validation and test and joins the
    frontier (its lower envelope). Every run, the choice and the flags are written to
    `<study_dir>/baseline.json`."""
    sweep, base, budgets = study.baseline, study.base, study.frontier
    warmup = sweep.warmup_steps
    if warmup is None:  # base's at 1x
        warmup = base.train.warmup_steps
    if warmup is None:
        warmup = round(base.train.warmup * base.train.steps)
    lrs = list(sweep.lrs or [base.train.lr * f for f in (0.5, 1.0, 2.0, 4.0)])
    trained: list[dict[str, Any]] = []
    configs: dict[str, RunConfig] = {}  # by run folder: what the flagged points are read with

    def train(
        setting: Setting, seed: int, among: list[float], role: str, skip: Collection[float] = ()
    ) -> dict[float, dict]:
        """Train (or reuse) `setting`'s runs of the budgets `among` on `seed` but those of
        `skip` (a wsd trunk keeps their branch checkpoints all the same): budget -> its record
        in baseline.json, and `metrics`, its metrics.jsonl (each final row read once)."""
        runs = {
            b: _placed(study, scratch_run(base, b, setting, seed, warmup, sweep.decay_fraction))
            for b in among
        }
        if setting.family == "wsd" and len(runs) > 1:
            runs = wsd_runs(runs, lambda trunk, name: _where(study, trunk, name))

        def one(budget: float) -> dict:
            cfg = runs[budget]
            if cfg.train.fork_from and not exists(cfg.train.fork_from):
                cfg = alone(cfg)  # a trunk cached without this branch's checkpoint
            searched = {
                "budget": budget,
                "family": setting.family,
                "lr": setting.lr,
                "seed": seed,
                "role": role,
            }
            metrics = _ensure_run(study, group, cfg, searched)
            final = last_eval(metrics)
            record = {
                **searched,
                "run": cfg.output_dir.name,
                "steps": cfg.train.steps,
                "forked": cfg.train.fork_from is not None,
                "eval_loss": final["eval_loss"],
                "test_loss": final.get("test_loss"),
            }
            trained.append(record)
            configs.setdefault(record["run"], cfg)  # as first trained (a seed can repeat)
            return {**record, "metrics": metrics}

        order = [b for b in sorted(runs, reverse=True) if b not in skip]
        done = {}
        if setting.family == "wsd" and order and order[0] == max(runs):  # a trunk before its
            trunk = order.pop(0)  # branches, which train side by side
            done[trunk] = one(trunk)
        done |= dict(
            zip(order, _side_by_side([functools.partial(one, b) for b in order]), strict=True)
        )
        return done

    def losses(jobs: Sequence[Job]) -> list[dict[float, float]]:
        seed = sweep.sweep_seed
        runs = _side_by_side([functools.partial(train, s, seed, list(b), "sweep") for s, b in jobs])
        return [{budget: run["eval_loss"] for budget, run in r.items()} for r in runs]

    found = tune(losses, lrs, budgets, sweep.extend, cosine=False)
    wsd = found.chosen_wsd
    cosine = cosine_jobs(wsd) if sweep.cosine else []
    # where cosine is not tried (above 1x) wsd's choice is final: those reading runs train
    # beside the cosine runs, a trunk keeping a branch checkpoint for each budget of its LR
    tried = {b for _, among in cosine for b in among}
    final = {b for b in budgets if b not in tried}
    calls = [functools.partial(train, s, sweep.sweep_seed, list(b), "sweep") for s, b in cosine]
    for s, same in _by_setting(wsd, budgets).items():
        if final & set(same):
            calls.append(
                functools.partial(train, s, base.seed, same, "frontier", set(same) - final)
            )
    results = _side_by_side(calls)
    for (setting, _), runs in zip(cosine, results[: len(cosine)], strict=True):
        found.losses.update({(b, setting): run["eval_loss"] for b, run in runs.items()})
    read_on = {b: run for runs in results[len(cosine) :] for b, run in runs.items()}
    chosen = choose(found.losses, budgets)
    calls = [  # the runs trained already are listed (a branch forks from its trunk), not trained
        functools.partial(train, s, base.seed, among, "frontier", set(read_on))
        for s, among in _by_setting(chosen, budgets).items()
        if set(among) - set(read_on)
    ]
    for runs in _side_by_side(calls):
        read_on |= runs
    reading = {budget: str(run["metrics"]) for budget, run in sorted(read_on.items())}
    trained.sort(key=lambda r: (r["role"] != "sweep", r["family"], r["lr"], -r["budget"]))
    scratch = Scratch(reading)
    samples = {  # the finished runs of each budget's choice, on any seed: the frontier itself
        r["run"] for r in trained if chosen[r["budget"]] == Setting(r["family"], r["lr"])
    }
    flags = _check(study, configs, scratch, samples)
    read = [_read_checkpoint(study, configs[f.point.run], f.point) for f in flags]
    _keep_what_was_read(study, configs, flags)
    payload = {
        "chosen": {f"{b:g}": {"family": s.family, "lr": s.lr} for b, s in chosen.items()},
        "chosen_wsd": {f"{b:g}": s.lr for b, s in found.chosen_wsd.items()},
        "runs": trained,
        "tuning_runs": len({r["run"] for r in trained}),
        "flags": [f.as_dict() | (r or {"read": None}) for f, r in zip(flags, read, strict=True)],
        "reading": "lower envelope" if any(read) else "frontier",
    }
    path = Path(study.study_dir) / "baseline.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return Scratch(reading, tuple(r for r in read if r))


def _by_setting(chosen: dict[float, Setting], budgets: Sequence[float]) -> dict[Setting, list]:
    """The budgets of each setting that `chosen` picks, settings in order."""
    return {s: [b for b in budgets if chosen[b] == s] for s in sorted(set(chosen.values()))}


def _side_by_side(calls: Sequence[Callable[[], T]]) -> list[T]:
    """The results of `calls`, run at once, each in a thread of its own that waits on its Ray
    tasks: Ray trains as many of them side by side as the cluster's resources hold. Every call
    ends before the first error is raised (what finished is cached); the threads are daemons, so a
    Ctrl-C ends the study without waiting for them (Ray stops their tasks with the driver)."""
    if len(calls) == 1:
        return [calls[0]()]
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as e:  # raised in the study's thread, below
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results


def _check(
    study: StudyConfig, configs: dict[str, RunConfig], scratch: Scratch, samples: set[str]
) -> list[Flag]:
    """The any-checkpoint check over every evaluation of every scratch run the tuning trained
    (`configs`, by run folder; a branch's rows up to its fork are its trunk's, checked there),
    on the fixed validation sample, but the final points of `samples` (runs of a budget's
    chosen setting: samples of the frontier itself, whose seed noise is no flag); the first
    flags said on stderr."""
    points = []
    for run, cfg in sorted(configs.items()):
        forked = decay_start(cfg.train) if cfg.train.fork_from else -1
        last = cfg.train.steps if run in samples else None
        rows = read_rows(Path(study.baselines_dir) / run / METRICS)
        points += [p for p in sample_points(run, rows) if forked < p.step != last]
    flags = check(scratch.sample_frontier(), points)
    for flag in flags[:3]:
        print(
            f"scratch {flag.point.run} at step {flag.point.step} is {flag.by:.3f} nats below the "
            "frontier at its compute: the frontier is not scratch's best there, so speedups "
            "are read against the lower envelope",
            file=sys.stderr,
        )
    return flags


def _read_checkpoint(study: StudyConfig, cfg: RunConfig, point: EvalPoint) -> dict | None:
    """A flagged scratch point read like a finished run, from the checkpoint its run kept at
    that step: its losses on the whole validation and test splits (None: no such checkpoint,
    a run trained before scratch runs kept every evaluation's)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / CHECKPOINT_FILE
        if not fetch(_where(study, cfg, checkpoint_name(point.step)), local):
            return None
        try:
            reader = Trainer(alone(cfg).model_copy(update={"out_dir": tmp}), progress=False)
            read = reader.read_checkpoint(load_checkpoint(local))
        except (ConfigError, DataError, OSError, ValueError, RuntimeError) as e:
            print(f"scratch {point.run} at step {point.step}: not read ({e})", file=sys.stderr)
            return None
    return {
        "run": point.run,
        "step": point.step,
        "flops": point.flops,
        "wall": point.wall,
        "eval_loss": read["eval_loss"],
        "test_loss": read.get("test_loss"),
    }


def _keep_what_was_read(
    study: StudyConfig, configs: dict[str, RunConfig], flags: list[Flag]
) -> None:
    """Once the check has read what it flagged, each scratch run keeps only its final, branch
    and flagged checkpoints: every evaluation's, of a large model, would fill the bucket."""
    flagged = {(f.point.run, checkpoint_name(f.point.step)) for f in flags}
    for run, cfg in configs.items():
        store = StorageStore(join_uri(study.storage(BASELINES), run), KEEP_ALL)
        final = checkpoint_name(cfg.train.steps)
        store.drop(
            n for n in store.names() if is_periodic(n) and n != final and (run, n) not in flagged
        )


def _placed(study: StudyConfig, cfg: RunConfig) -> RunConfig:
    """`cfg` in <output_dir>/baselines/<baseline_key>."""
    return cfg.model_copy(update={"out_dir": join_uri(study.baselines_dir, baseline_key(cfg))})


def _where(study: StudyConfig, trunk: RunConfig, name: str) -> str:
    """Where checkpoint `name` of scratch run `trunk` lies in the study's storage."""
    return join_uri(study.storage(BASELINES), trunk.output_dir.name, name, CHECKPOINT_FILE)


def _ensure_run(
    study: StudyConfig, group: StudyRecord | None, cfg: RunConfig, searched: dict[str, Any]
) -> Path:
    run_dir = cfg.output_dir
    metrics = run_dir / METRICS
    cached = (run_dir / DONE_MARKER).exists()
    storage = study.storage(BASELINES)
    folder = join_uri(storage, run_dir.name)
    with tracked_run(
        study, group, cfg, "frontier", searched, trial_id=cfg.name, storage=folder
    ) as target:
        if cached:
            print(f"{cfg.name}: reusing {run_dir}", file=sys.stderr)
            if target is not None:  # its rows and checkpoints are uploaded on the way out
                group.client().set_tag(target.run_id, "apollo.cached", str(run_dir))
        else:
            print(f"{cfg.name}: training in {run_dir}", file=sys.stderr)
            if solo.applies(cfg):
                last = solo.run(cfg, tracking=target, storage_path=storage)
            else:
                last = distributed.run(cfg, tracking=target, storage_path=storage).metrics
            (run_dir / DONE_MARKER).write_text(json.dumps(last, indent=2) + "\n")
        if target is not None:
            log_run_results(group.client(), target.run_id, cfg, metrics, None, None)
    return metrics
