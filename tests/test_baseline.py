"""The scratch baseline: its config, its key over the config and the prepared data, and a cached
baseline reused without training."""

from __future__ import annotations

import copy
import json
import shutil

from conftest import EXAMPLE_STUDY, tiny_study, write_metrics

from apollo_ray.baseline import baseline_config, baseline_key, ensure_baseline
from apollo_ray.config import RunConfig
from apollo_ray.fields import flatten
from apollo_ray.study import StudyConfig, load_study


def good_study(data_path) -> StudyConfig:
    data = copy.deepcopy(EXAMPLE_STUDY)
    data["base"]["data"]["path"] = str(data_path)
    return StudyConfig.model_validate(data)


def test_baseline_config_and_key(bert_data, gpt_data, tmp_path):
    study = good_study(bert_data)
    base = study.base
    baseline = baseline_config(study)
    key = baseline_key(base)
    assert baseline.schedule is None and baseline.name == "baseline"
    assert flatten(baseline)["schedule"] is None
    assert baseline.out_dir == f"{study.output_dir}/baselines/{key}"
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


def test_cached_baseline_is_reused_without_training(tmp_path, gpt_data):
    study = load_study(tiny_study(tmp_path, gpt_data))
    run_dir = baseline_config(study).output_dir
    assert run_dir.parent == tmp_path / "outputs" / "baselines"
    write_metrics(run_dir / "metrics.jsonl", [(0, 9.0), (100, 8.0)])
    (run_dir / "done.json").write_text("{}")
    assert ensure_baseline(study) == run_dir / "metrics.jsonl"  # no Ray was needed
