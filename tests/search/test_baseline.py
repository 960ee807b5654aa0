"""The scratch frontier: its runs' configs, their key over the config and the prepared data, and
cached runs reused without training."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil
import threading
import time

import pytest
from conftest import EXAMPLE_STUDY, metrics_rows, tiny_study, write_metrics

from apollo_ray.config import RunConfig
from apollo_ray.search import baseline
from apollo_ray.search.baseline import baseline_key, ensure_frontier, frontier_configs
from apollo_ray.search.sweep import KEEP_ALL, Setting, scratch_run
from apollo_ray.storage import join_uri
from apollo_ray.study.fields import flatten
from apollo_ray.study.schema import BASELINES, StudyConfig, load_study
from apollo_ray.training.checkpoints import StorageStore, checkpoint_name, is_periodic
from apollo_ray.training.trainer import Trainer
from apollo_ray.yardstick.envelope import EvalPoint, Flag
from apollo_ray.yardstick.scratch import Scratch


def good_study(data_path) -> StudyConfig:
    data = copy.deepcopy(EXAMPLE_STUDY)
    data["base"]["data"]["path"] = str(data_path)
    return StudyConfig.model_validate(data)


def test_frontier_configs(bert_data):
    study = good_study(bert_data)
    configs = frontier_configs(study)
    assert list(configs) == [0.25, 0.5, 1.0, 2.0]
    steps = study.base.train.steps
    for budget, cfg in configs.items():
        assert cfg.schedule is None and flatten(cfg)["schedule"] is None
        assert cfg.name == f"scratch-{budget:g}x" and cfg.train.steps == round(budget * steps)
        assert cfg.train.warmup == study.base.train.warmup  # its own warmup and full decay
        assert cfg.out_dir == f"{study.output_dir}/baselines/{baseline_key(cfg)}"
    assert len({cfg.out_dir for cfg in configs.values()}) == 4


def test_baseline_key(bert_data, gpt_data, tmp_path):
    study = good_study(bert_data)
    base = study.base
    baseline = frontier_configs(study)[1.0]
    key = baseline_key(base)
    assert baseline_key(baseline) == key
    config_part, data_part = key.split("-")
    assert len(config_part) == 12 and len(data_part) == 8
    assert key == baseline_key(RunConfig.model_validate(base.model_dump()))

    def changed(**sections):
        data = base.model_dump()
        for section, values in sections.items():
            data[section] = values if not isinstance(values, dict) else {**data[section], **values}
        return baseline_key(RunConfig.model_validate(data))

    # what does not change the baseline's curve
    assert changed(schedule={"depths": [2, 6], "stage_ends": [0.3], "alpha": 0.5}) == key
    assert changed(schedule=None, name="other", out_dir="elsewhere") == key
    assert changed(resources={"max_failures": 0, "cpus_per_worker": 2}) == key
    # what does
    assert changed(train={"lr": 2e-3}) != key
    assert changed(seed=1) != key
    assert changed(model={"d_model": 64}) != key
    assert changed(resources={"workers": 2}) != key
    assert changed(data={"path": str(gpt_data)}) != key

    # data with another manifest is another baseline, whatever the config says
    again = tmp_path / "again"
    shutil.copytree(bert_data, again)
    manifest = json.loads((again / "manifest.json").read_text())
    manifest["splits"]["train"]["documents"] += 1
    (again / "manifest.json").write_text(json.dumps(manifest))
    other = changed(data={"path": str(again)})
    assert other.split("-")[1] != data_part


def test_cached_frontier_is_reused_without_training(tmp_path, gpt_data):
    study = load_study(tiny_study(tmp_path, gpt_data))
    for budget, cfg in frontier_configs(study).items():
        run_dir = cfg.output_dir
        assert run_dir.parent == tmp_path / "outputs" / "baselines"
        write_metrics(run_dir / "metrics.jsonl", [(0, 9.0), (100 * budget, 8.0 - budget)])
        (run_dir / "done.json").write_text("{}")
    scratch = ensure_frontier(study)  # no Ray was needed
    assert scratch.full == frontier_configs(study)[1.0].output_dir / "metrics.jsonl"
    frontier = scratch.frontier()
    assert [p.budget for p in frontier.points] == study.frontier
    assert [p.loss for p in frontier.points] == [8.0 - b for b in study.frontier]


def test_a_flagged_scratch_point_is_read_from_its_checkpoint_and_joins_the_frontier(
    tmp_path, gpt_data
):
    """The product's any-checkpoint reading, without Ray: a tuned scratch run keeps every
    evaluation's checkpoint in the study's storage; a flagged point is read from it on
    validation and test like a finished run, and the frontier becomes the lower envelope."""
    study = load_study(tiny_study(tmp_path, gpt_data))
    cfg = baseline._placed(
        study, scratch_run(study.base, 1.0, Setting("wsd", 3e-3), 0, warmup_steps=2)
    )
    assert cfg.train.checkpoint_every == cfg.train.eval_every  # every evaluation's kept
    store = StorageStore(join_uri(study.storage(BASELINES), cfg.output_dir.name), KEEP_ALL)
    Trainer(cfg, progress=False, store=store).fit()
    rows = metrics_rows(cfg.output_dir)
    final = rows[-1]
    point = EvalPoint(cfg.output_dir.name, final["step"], final["flops"], 9.0, 1.0)
    read = baseline._read_checkpoint(study, cfg, point)
    assert read["eval_loss"] == final["eval_loss"] and read["test_loss"] == final["test_loss"]
    early = next(r for r in rows if "eval_loss" in r and 0 < r["step"] < final["step"])
    gone = dataclasses.replace(point, step=early["step"] + 1)  # no checkpoint at that step
    assert baseline._read_checkpoint(study, cfg, gone) is None
    flagged = Flag(dataclasses.replace(point, step=early["step"]), 10.0)
    baseline._keep_what_was_read(study, {cfg.output_dir.name: cfg}, [flagged])
    kept = {checkpoint_name(early["step"]), checkpoint_name(cfg.train.steps)}
    assert {n for n in store.names() if is_periodic(n)} == kept  # the rest is dropped

    runs = {
        b: str(write_metrics(tmp_path / f"{b}.jsonl", [(0, 9.0), (10 * b, 8.0 - b)]))
        for b in (0.5, 1.0)
    }
    plain = Scratch(runs)
    below = {
        "run": "r",
        "step": 3,
        "flops": 5.0 * 1.5,
        "wall": 1.0,
        "eval_loss": 7.0,
        "test_loss": None,
    }
    envelope = Scratch(runs, (below,))
    assert plain.frontier().loss_at(7.5) > 7.0 and envelope.frontier().loss_at(7.5) == 7.0
    assert envelope.frontier("test_loss") is None  # these metrics have no test split


def test_independent_runs_train_side_by_side_and_an_error_waits_for_the_rest():
    both = threading.Barrier(2, timeout=30)  # broken unless the two calls run at once

    def call(i: int) -> int:
        both.wait()
        return i

    assert baseline._side_by_side([functools.partial(call, 1), functools.partial(call, 2)]) == [
        1,
        2,
    ]
    finished = []

    def fail():
        raise ValueError("diverged")

    def slow():
        time.sleep(0.2)
        finished.append(True)

    with pytest.raises(ValueError, match="diverged"):
        baseline._side_by_side([fail, slow])
    assert finished == [True]  # the other run ended (and was cached) first
