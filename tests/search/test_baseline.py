"""The scratch frontier: its runs' configs, their key over the config and the prepared data, and
cached runs reused without training."""

from __future__ import annotations

import copy
import json
import shutil

from conftest import EXAMPLE_STUDY, tiny_study, write_metrics

from apollo_ray.config import RunConfig
from apollo_ray.search.baseline import baseline_key, ensure_frontier, frontier_configs
from apollo_ray.study.fields import flatten
from apollo_ray.study.schema import StudyConfig, load_study


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
