"""Run-config validation: errors name the YAML path, the value and what is allowed."""

import pytest
import yaml

from apollo_ray.config import ConfigError, RunConfig, load_run_config

GOOD = {
    "name": "t",
    "model": {"kind": "bert", "n_layer": 2, "d_model": 32, "n_head": 2, "max_seq_len": 64},
    "data": {"path": "data/x", "seq_len": 32},
}


def write(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_good_config_and_defaults(tmp_path):
    cfg = load_run_config(write(tmp_path, GOOD))
    assert cfg.model.ff_dim == 128 and cfg.model.eps == 1e-12
    assert cfg.train.steps == 1000 and cfg.output_dir.name == "t"


def test_scientific_notation_string_is_a_float(tmp_path):
    # PyYAML reads `1e-4` (no dot) as a string; the schema must still take it.
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(GOOD) + "train:\n  lr: 1e-4\n")
    assert load_run_config(path).train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"model": {**GOOD["model"], "kind": "t5"}}, ["model.kind", "'bert' or 'gpt'", "'t5'"]),
        ({"model": {**GOOD["model"], "n_layers": 3}}, ["model.n_layers", "unknown field"]),
        ({"model": {**GOOD["model"], "n_head": 3}}, ["divisible by n_head"]),
        ({"data": {"path": "x", "seq_len": 128}}, ["seq_len (128)", "max_seq_len (64)"]),
        ({"train": {"steps": "many"}}, ["train.steps", "'many'"]),
        ({"seed": -1}, ["seed", "greater than or equal to 0"]),
        ({"train": {"precision": "fp8"}}, ["train.precision", "'auto', 'fp32' or 'bf16'"]),
    ],
)
def test_bad_config_names_field_and_allowed(tmp_path, patch, expected):
    with pytest.raises(ConfigError) as err:
        load_run_config(write(tmp_path, {**GOOD, **patch}))
    for text in expected:
        assert text in str(err.value)


APOLLO = {**GOOD, "model": {**GOOD["model"], "n_layer": 6}}


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ({"depths": [1, 3, 6], "stage_ends": [0.3, 0.2]}, ["increase strictly within (0, 1)"]),
        ({"depths": [1, 3, 6], "stage_ends": [0.1]}, ["one entry per stage but the last"]),
        ({"depths": [1, 3, 12], "stage_ends": [0.1, 0.2]}, ["must end at model.n_layer (6)"]),
        ({"depths": [3, 1, 6], "stage_ends": [0.1, 0.2]}, ["strictly increasing"]),
        ({"depths": [1, 6], "stage_ends": [0.1], "alpha": 1.5}, ["schedule.alpha", "1.5"]),
        ({"depths": [1, 6], "stage_ends": [0.1], "sampler": "lvps"}, ["schedule.tau"]),
        ({"depths": [1, 6], "stage_ends": [0.1], "growth": "magic"}, ["'interpolate', 'stack'"]),
        ({"depths": [1, 3, 6], "stage_ends": [0.1, 0.9999]}, ["empty stage", "train.steps=1000"]),
    ],
)
def test_bad_schedule(tmp_path, schedule, expected):
    with pytest.raises(ConfigError) as err:
        load_run_config(write(tmp_path, {**APOLLO, "schedule": schedule}))
    for text in expected:
        assert text in str(err.value)


def test_released_recipe_is_the_schedule_default(tmp_path):
    cfg = load_run_config(
        write(tmp_path, {**GOOD, "model": {**GOOD["model"], "n_layer": 12}, "schedule": {}})
    )
    assert cfg.schedule.depths == [1, 3, 6, 12] and cfg.schedule.stage_ends == [0.05, 0.10, 0.25]
    assert cfg.schedule.sampler == "apollo" and cfg.schedule.alpha == 0.0


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_run_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(path)


def test_overrides_use_dotted_paths(tmp_path):
    cfg = load_run_config(write(tmp_path, GOOD), {"train.steps": 7, "name": "other"})
    assert cfg.train.steps == 7 and cfg.name == "other"


def test_example_configs_validate():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        assert isinstance(load_run_config(path), RunConfig)
