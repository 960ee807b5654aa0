"""Study files: schema errors name the YAML path, the value and what is allowed, including the
cross-field checks of a space against its base run (`space_checks`); the shipped studies load."""

import inspect
from pathlib import Path

import pytest
from conftest import EXAMPLE_STUDY, SEARCH_SPACES, edited_study, space_of, write_study

from apollo_ray.config import ConfigError
from apollo_ray.study.schema import PrepareConfig, StudyConfig, load_study
from apollo_ray.study.space import ChoiceParam, FloatParam, IncreasingParam, stage_end_gap


@pytest.mark.parametrize("path", SEARCH_SPACES, ids=[p.name for p in SEARCH_SPACES])
def test_search_space_files_load(path):
    study = load_study(path)
    assert study.base.name == study.experiment
    assert study.base.out_dir == f"{study.output_dir}/{study.experiment}/base"
    assert study.search.space, "a study file searches something"
    # dicts at the Ray boundary: a dumped study validates back to the same study
    assert StudyConfig.model_validate(study.model_dump(mode="json")) == study


def test_search_space_files_are_there():
    assert {p.name for p in SEARCH_SPACES} >= {"small.yaml", "bert.yaml", "gpt2.yaml"}


def test_example_study_and_defaults(tmp_path):
    study = load_study(write_study(tmp_path, EXAMPLE_STUDY))
    assert study.output_dir == str(Path("outputs").resolve())  # pinned: trials run elsewhere
    assert study.study_dir == f"{study.output_dir}/demo-bert-small"
    assert study.prepare.text_column == "text" and study.search.max_concurrent_trials == 1
    assert isinstance(study.search.space["schedule.depths"], ChoiceParam)
    ends = study.search.space["schedule.stage_ends"]
    assert isinstance(ends, IncreasingParam) and ends.min_gap is None
    assert stage_end_gap(ends, study.search.space, study.base) == pytest.approx(2 / 120)
    assert FloatParam(bounds=(0.1, 1.0), log=True).model_dump() == {
        "when": {},
        "float": (0.1, 1.0),
        "log": True,
    }


def test_prepare_fields_match_the_data_cli():
    from apollo_ray.data import prepare

    defaults = {k: p.default for k, p in inspect.signature(prepare).parameters.items()}
    for name, field in PrepareConfig.model_fields.items():
        if name != "sources":
            assert field.default == defaults[name], name


BAD = [
    (lambda d: d["search"].update(trials="many"), ["search.trials", "valid integer", "'many'"]),
    (lambda d: d["search"].update(spaec={}), ["search.spaec", "unknown field"]),
    (lambda d: d.update(tracking={"checkpoints": "some"}), ["tracking.checkpoints", "'all'"]),
    (
        lambda d: d["base"]["schedule"].update(stage_ends=[0.3, 0.2]),
        ["base.schedule", "stage_ends must increase strictly", "[0.3, 0.2]"],
    ),
    (
        lambda d: d["base"]["schedule"].update(alpha=1.5),
        ["base.schedule.alpha", "less than or equal to 1", "1.5"],
    ),
    (
        lambda d: space_of(d).update({"schedule.alpha": {"float": [0.0, 1.5]}}),
        ["search.space.schedule.alpha:", "less than or equal to 1", "(got 1.5)"],
    ),
    (
        lambda d: d["base"]["schedule"].update(depths=[1, 3, 5]),
        ["base:", "must end at model.n_layer (6)", "[1, 3, 5]"],
    ),
    (
        lambda d: space_of(d).update({"schedule.depths": {"choice": [[2, 4], [1, 3, 6], [3, 6]]}}),
        ["search.space.schedule.depths:", "must end at model.n_layer (6)", "(got [2, 4])"],
    ),
    (
        lambda d: space_of(d).update({"schedule.alhpa": {"float": [0.0, 1.0]}}),
        [
            "search.space.schedule.alhpa:",
            "not a RunConfig field",
            "schedule.alpha",
            "'schedule.alhpa'",
        ],
    ),
    (
        lambda d: space_of(d).update({"optim.lr": {"float": [0.1, 1.0]}}),
        ["search.space.optim.lr:", "model, data, train, schedule, resources", "'optim.lr'"],
    ),
    (
        lambda d: space_of(d)["schedule.tau"].update(when={"schedule.samplr": "lvps"}),
        [
            "search.space.schedule.tau.when.schedule.samplr:",
            "schedule.sampler",
            "'schedule.samplr'",
        ],
    ),
    (
        lambda d: space_of(d)["schedule.tau"].update(when={"schedule.sampler": ["lvps", "lvsp"]}),
        ["search.space.schedule.tau.when.schedule.sampler:", "'uniform'", "(got 'lvsp')"],
    ),
    (
        lambda d: space_of(d)["schedule.tau"].update(when={"schedule.alpha": 0.5}),
        ["search.space.schedule.tau.when.schedule.alpha:", "must name a choice parameter"],
    ),
    (
        lambda d: space_of(d)["schedule.tau"].update(when={"schedule.tau": 0.5}),
        ["search.space.schedule.tau.when.schedule.tau:", "cannot depend on itself"],
    ),
    (
        lambda d: (
            space_of(d)["schedule.sampler"].update(when={"schedule.optimizer_state": "copy"}),
            space_of(d)["schedule.optimizer_state"].update(when={"schedule.sampler": "apollo"}),
        ),
        ["cycle", "schedule.sampler -> schedule.optimizer_state -> schedule.sampler"],
    ),
    (
        lambda d: space_of(d).update({"schedule.stage_ends": {"increasing": [0.05, 1.0]}}),
        ["search.space.schedule.stage_ends:", "0 < low < high < 1", "[0.05, 1.0]"],
    ),
    (
        lambda d: space_of(d).update({"schedule.stage_ends": {"increasing": [0.05, 0.06]}}),
        ["search.space.schedule.stage_ends.increasing:", "cannot hold 2 ends", "[0.05, 0.06]"],
    ),
    (
        lambda d: space_of(d).update({"schedule.stage_ends": {"increasing": [0.001, 0.5]}}),
        ["search.space.schedule.stage_ends:", "empty stage with train.steps=120", "0.001"],
    ),
    (
        lambda d: space_of(d)["schedule.stage_ends"].update(min_gap=0.001),
        ["search.space.schedule.stage_ends.min_gap:", "at least 2 / train.steps", "0.001"],
    ),
    (
        lambda d: space_of(d).update({"schedule.rewarmup_steps": {"float": [0, 30]}}),
        ["search.space.schedule.rewarmup_steps.float:", "integer field", "{int: [low, high]}"],
    ),
    (
        lambda d: space_of(d).update({"schedule.rewarmup_steps": {"int": [-1, 30]}}),
        ["search.space.schedule.rewarmup_steps:", "greater than or equal to 0", "(got -1)"],
    ),
    (
        lambda d: space_of(d).update({"train.lr": {"float": [0.0, 0.1], "log": True}}),
        ["search.space.train.lr:", "log: true needs low > 0", "[0.0, 0.1]"],
    ),
    (
        lambda d: space_of(d).update({"train.lr": {"float": [0.1, 0.01]}}),
        ["search.space.train.lr:", "low < high", "[0.1, 0.01]"],
    ),
    (
        lambda d: space_of(d).update({"train.lr": {"float": [0.01, 0.1], "lg": True}}),
        ["search.space.train.lr.lg:", "unknown field"],
    ),
    (
        lambda d: space_of(d).update({"train.lr": 0.01}),
        ["search.space.train.lr:", "{float: [low, high]}", "{choice: [...]}", "(got 0.01)"],
    ),
    (
        lambda d: space_of(d).update({"schedule.sampler": {"choice": []}}),
        ["search.space.schedule.sampler.choice:", "at least 1 item"],
    ),
    (
        lambda d: space_of(d).pop("schedule.tau"),
        ["search.space.schedule.sampler:", "needs a temperature", "(got 'lvps')"],
    ),
    (
        lambda d: space_of(d).pop("schedule.stage_ends"),
        ["search.space.schedule.depths:", "stage_ends needs one entry per stage", "[2, 6]"],
    ),
    (
        lambda d: space_of(d).update({"model.n_head": {"choice": [4, 3]}}),
        ["search.space.model.n_head:", "divisible by n_head (3)", "(got 3)"],
    ),
    (
        lambda d: d["search"].update(objective="pareto"),
        ["search.scheduler:", "pareto", "scheduler: null"],
    ),
    (
        lambda d: d["search"].update(objective="pareto", scheduler=None, sampler={"kind": "cmaes"}),
        ["search.sampler.kind:", "tpe or random", "'cmaes'"],
    ),
    (
        lambda d: d["base"].update(schedule=None),
        ["search.space.schedule.depths:", "base.schedule is null"],
    ),
    (lambda d: d.update(experiment="a/b"), ["experiment:", "[A-Za-z0-9_.-]", "'a/b'"]),
    (lambda d: d.update(experiment="baselines"), ["experiment:", "reserved"]),
    (lambda d: d["base"].update(name="x"), ["base:", "set by the study", "'x'"]),
    (lambda d: d.update(frontier=[0.5, 2.0]), ["frontier:", "must include 1.0", "[0.5, 2.0]"]),
    (lambda d: d.update(frontier=[1.0]), ["frontier:", "at least 2 items"]),
    (lambda d: d.update(frontier=[0.0, 1.0]), ["frontier:", "distinct and positive"]),
    (lambda d: d.update(frontier=[0.001, 1.0]), ["frontier:", "gives 0 steps"]),
]


@pytest.mark.parametrize(("edit", "expected"), BAD)
def test_bad_study_names_path_value_and_what_is_allowed(tmp_path, edit, expected):
    path = write_study(tmp_path, edited_study(edit))
    with pytest.raises(ConfigError) as err:
        load_study(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message  # one line
    for text in expected:
        assert text in message, f"{text!r} not in\n{message}"


def test_a_bad_choice_is_blamed_on_its_own_key_only(tmp_path):
    data = edited_study(
        lambda d: space_of(d).update({"schedule.depths": {"choice": [[2, 4], [3, 6]]}})
    )
    with pytest.raises(ConfigError) as err:
        load_study(write_study(tmp_path, data))
    problems = str(err.value).split("; ")
    assert len(problems) == 1 and "search.space.schedule.depths:" in problems[0]


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_study(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(bad)
