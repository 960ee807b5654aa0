"""Study files: schema errors name the YAML path, the value and what is allowed; the define-by-run
space samples valid trials; the baseline key depends on what determines the baseline only."""

import copy
import inspect
import itertools
from pathlib import Path

import optuna
import pytest
import yaml

from apollo_ray.config import ConfigError, RunConfig
from apollo_ray.schedule import Schedule
from apollo_ray.study import (
    ChoiceParam,
    FloatParam,
    IncreasingParam,
    PrepareConfig,
    StudyConfig,
    baseline_config,
    baseline_key,
    flatten,
    load_study,
    materialize,
    suggest,
)

SPACES = sorted((Path(__file__).parent.parent / "search_spaces").glob("*.yaml"))

# the brief's example study: a 6-layer BERT with the whole searchable generalisation
GOOD = {
    "experiment": "demo-bert-small",
    "prepare": {"sources": ["demo"], "vocab_size": 8192, "val_fraction": 0.05},
    "base": {
        "seed": 0,
        "model": {"kind": "bert", "n_layer": 6, "d_model": 128, "n_head": 4, "max_seq_len": 64},
        "data": {"path": "data/demo-bert", "seq_len": 64},
        "train": {"steps": 120, "micro_batch": 16, "lr": 1.0e-3, "eval_every": 20},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "schedule": {"depths": [1, 3, 6], "stage_ends": [0.1, 0.25]},
    },
    "search": {
        "trials": 6,
        "sampler": {"kind": "tpe", "seed": 0},
        "objective": "flops_saving",
        "scheduler": {"kind": "asha", "grace_fraction": 0.25, "reduction_factor": 3},
        "space": {
            "train.lr": {"float": [3.0e-4, 3.0e-3], "log": True},
            "schedule.depths": {"choice": [[1, 3, 6], [2, 6], [3, 6]]},
            "schedule.stage_ends": {"increasing": [0.05, 0.5]},
            "schedule.sampler": {"choice": ["apollo", "lvps", "uniform"]},
            "schedule.tau": {
                "float": [0.1, 5.0],
                "log": True,
                "when": {"schedule.sampler": "lvps"},
            },
            "schedule.alpha": {"float": [0.0, 1.0]},
            "schedule.noise": {"float": [0.0, 0.05]},
            "schedule.optimizer_state": {"choice": ["fresh", "copy"]},
            "schedule.rewarmup_steps": {"int": [0, 30]},
        },
    },
    "tracking": {"mlflow_uri": None, "checkpoints": "last"},
}


def write(tmp_path, data):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def patched(edit):
    data = copy.deepcopy(GOOD)
    edit(data)
    return data


def space(data):
    return data["search"]["space"]


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_search_space_files_load(path):
    study = load_study(path)
    assert study.base.name == study.experiment
    assert study.base.out_dir == f"{study.output_dir}/{study.experiment}/base"
    assert study.search.space, "a study file searches something"
    # dicts at the Ray boundary: a dumped study validates back to the same study
    assert StudyConfig.model_validate(study.model_dump(mode="json")) == study


def test_search_space_files_are_there():
    assert {p.name for p in SPACES} >= {"small.yaml", "bert.yaml", "gpt2.yaml"}


def test_example_study_and_defaults(tmp_path):
    study = load_study(write(tmp_path, GOOD))
    assert study.output_dir == "outputs" and study.study_dir == "outputs/demo-bert-small"
    assert study.prepare.text_column == "text" and study.search.max_concurrent_trials == 1
    assert isinstance(study.search.space["schedule.depths"], ChoiceParam)
    ends = study.search.space["schedule.stage_ends"]
    assert isinstance(ends, IncreasingParam) and ends.min_gap == pytest.approx(2 / 120)
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
        lambda d: space(d).update({"schedule.alpha": {"float": [0.0, 1.5]}}),
        ["search.space.schedule.alpha:", "less than or equal to 1", "(got 1.5)"],
    ),
    (
        lambda d: d["base"]["schedule"].update(depths=[1, 3, 5]),
        ["base:", "must end at model.n_layer (6)", "[1, 3, 5]"],
    ),
    (
        lambda d: space(d).update({"schedule.depths": {"choice": [[2, 4], [1, 3, 6], [3, 6]]}}),
        ["search.space.schedule.depths:", "must end at model.n_layer (6)", "(got [2, 4])"],
    ),
    (
        lambda d: space(d).update({"schedule.alhpa": {"float": [0.0, 1.0]}}),
        [
            "search.space.schedule.alhpa:",
            "not a RunConfig field",
            "schedule.alpha",
            "'schedule.alhpa'",
        ],
    ),
    (
        lambda d: space(d).update({"optim.lr": {"float": [0.1, 1.0]}}),
        ["search.space.optim.lr:", "model, data, train, schedule, resources", "'optim.lr'"],
    ),
    (
        lambda d: space(d)["schedule.tau"].update(when={"schedule.samplr": "lvps"}),
        [
            "search.space.schedule.tau.when.schedule.samplr:",
            "schedule.sampler",
            "'schedule.samplr'",
        ],
    ),
    (
        lambda d: space(d)["schedule.tau"].update(when={"schedule.sampler": ["lvps", "lvsp"]}),
        ["search.space.schedule.tau.when.schedule.sampler:", "'uniform'", "(got 'lvsp')"],
    ),
    (
        lambda d: space(d)["schedule.tau"].update(when={"schedule.alpha": 0.5}),
        ["search.space.schedule.tau.when.schedule.alpha:", "must name a choice parameter"],
    ),
    (
        lambda d: space(d)["schedule.tau"].update(when={"schedule.tau": 0.5}),
        ["search.space.schedule.tau.when.schedule.tau:", "cannot depend on itself"],
    ),
    (
        lambda d: (
            space(d)["schedule.sampler"].update(when={"schedule.optimizer_state": "copy"}),
            space(d)["schedule.optimizer_state"].update(when={"schedule.sampler": "apollo"}),
        ),
        ["cycle", "schedule.sampler -> schedule.optimizer_state -> schedule.sampler"],
    ),
    (
        lambda d: space(d).update({"schedule.stage_ends": {"increasing": [0.05, 1.0]}}),
        ["search.space.schedule.stage_ends:", "0 < low < high < 1", "[0.05, 1.0]"],
    ),
    (
        lambda d: space(d).update({"schedule.stage_ends": {"increasing": [0.05, 0.06]}}),
        ["search.space.schedule.stage_ends.increasing:", "cannot hold 2 ends", "[0.05, 0.06]"],
    ),
    (
        lambda d: space(d).update({"schedule.stage_ends": {"increasing": [0.001, 0.5]}}),
        ["search.space.schedule.stage_ends:", "empty stage with train.steps=120", "0.001"],
    ),
    (
        lambda d: space(d)["schedule.stage_ends"].update(min_gap=0.001),
        ["search.space.schedule.stage_ends.min_gap:", "at least 2 / train.steps", "0.001"],
    ),
    (
        lambda d: space(d).update({"schedule.rewarmup_steps": {"float": [0, 30]}}),
        ["search.space.schedule.rewarmup_steps.float:", "integer field", "{int: [low, high]}"],
    ),
    (
        lambda d: space(d).update({"schedule.rewarmup_steps": {"int": [-1, 30]}}),
        ["search.space.schedule.rewarmup_steps:", "greater than or equal to 0", "(got -1)"],
    ),
    (
        lambda d: space(d).update({"train.lr": {"float": [0.0, 0.1], "log": True}}),
        ["search.space.train.lr:", "log: true needs low > 0", "[0.0, 0.1]"],
    ),
    (
        lambda d: space(d).update({"train.lr": {"float": [0.1, 0.01]}}),
        ["search.space.train.lr:", "low < high", "[0.1, 0.01]"],
    ),
    (
        lambda d: space(d).update({"train.lr": {"float": [0.01, 0.1], "lg": True}}),
        ["search.space.train.lr.lg:", "unknown field"],
    ),
    (
        lambda d: space(d).update({"train.lr": 0.01}),
        ["search.space.train.lr:", "{float: [low, high]}", "{choice: [...]}", "(got 0.01)"],
    ),
    (
        lambda d: space(d).update({"schedule.sampler": {"choice": []}}),
        ["search.space.schedule.sampler.choice:", "at least 1 item"],
    ),
    (
        lambda d: space(d).pop("schedule.tau"),
        ["search.space.schedule.sampler:", "needs a temperature", "(got 'lvps')"],
    ),
    (
        lambda d: space(d).pop("schedule.stage_ends"),
        ["search.space.schedule.depths:", "stage_ends needs one entry per stage", "[2, 6]"],
    ),
    (
        lambda d: space(d).update({"model.n_head": {"choice": [4, 3]}}),
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
]


@pytest.mark.parametrize(("edit", "expected"), BAD)
def test_bad_study_names_path_value_and_what_is_allowed(tmp_path, edit, expected):
    path = write(tmp_path, patched(edit))
    with pytest.raises(ConfigError) as err:
        load_study(path)
    message = str(err.value)
    assert message.startswith(f"{path}: invalid configuration")
    for text in expected:
        assert text in message, f"{text!r} not in\n{message}"


def test_a_bad_choice_is_blamed_on_its_own_key_only(tmp_path):
    data = patched(lambda d: space(d).update({"schedule.depths": {"choice": [[2, 4], [3, 6]]}}))
    with pytest.raises(ConfigError) as err:
        load_study(write(tmp_path, data))
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1 and "search.space.schedule.depths:" in lines[0]


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_study(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(bad)


def sample(study: StudyConfig, n: int, seed: int = 0) -> list[dict]:
    """n trials asked from a seeded TPE study, told an objective so TPE leaves its startup."""
    tpe = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    trials = []
    for _ in range(n):
        trial = tpe.ask()
        params = suggest(trial, study.search.space)
        tpe.tell(trial, params.get("schedule.alpha", 0.0) + len(params["schedule.depths"]))
        trials.append(params)
    return trials


def test_suggest_samples_valid_trials(tmp_path):
    study = load_study(write(tmp_path, GOOD))
    sp = study.search.space
    trials = sample(study, 40)
    assert {len(p["schedule.depths"]) for p in trials} == {2, 3}
    assert {p["schedule.sampler"] for p in trials} == {"apollo", "lvps", "uniform"}
    for i, params in enumerate(trials):
        for key in ("train.lr", "schedule.tau", "schedule.alpha", "schedule.noise"):
            if key in params:
                assert sp[key].low <= params[key] <= sp[key].high
        assert isinstance(params["schedule.rewarmup_steps"], int)
        assert params["schedule.depths"] in sp["schedule.depths"].choices
        ends = params["schedule.stage_ends"]
        assert len(ends) == len(params["schedule.depths"]) - 1
        assert all(0.05 <= e <= 0.5 for e in ends)
        assert all(b - a >= 2 / 120 - 1e-9 for a, b in itertools.pairwise(ends))
        assert ("schedule.tau" in params) == (params["schedule.sampler"] == "lvps")
        cfg = materialize(study.base, params, name=f"t{i}", out_dir=f"out/t{i}")
        assert cfg.name == f"t{i}" and cfg.schedule.stage_ends == ends
        schedule = Schedule(cfg.schedule, cfg.model.n_layer, cfg.train.steps, cfg.seed)
        stages = [schedule.stage_at(s) for s in range(cfg.train.steps)]
        assert sorted(set(stages)) == list(range(len(cfg.schedule.depths)))  # none empty


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_suggest_on_the_shipped_spaces(path):
    study = load_study(path)
    for i, params in enumerate(sample(study, 12)):
        cfg = materialize(study.base, params, name=f"t{i}", out_dir=f"out/t{i}")
        Schedule(cfg.schedule, cfg.model.n_layer, cfg.train.steps, cfg.seed)


def test_suggest_is_deterministic():
    study = StudyConfig.model_validate(GOOD)
    assert sample(study, 15, seed=3) == sample(study, 15, seed=3)
    assert sample(study, 15, seed=3) != sample(study, 15, seed=4)


def test_suggest_orders_parents_first_and_replays_a_frozen_trial():
    # stage ends and tau listed before what they depend on
    data = patched(lambda d: d["search"].update(space=dict(reversed(space(d).items()))))
    study = StudyConfig.model_validate(data)
    tpe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = tpe.ask()
    params = suggest(trial, study.search.space)
    assert list(trial.params).index("schedule.depths") < min(
        i for i, k in enumerate(trial.params) if k.startswith("schedule.stage_ends.")
    )
    assert trial.params["schedule.depths"] == ",".join(map(str, params["schedule.depths"]))
    tpe.tell(trial, 0.0)
    assert suggest(tpe.trials[0], study.search.space) == params  # Optuna's own record


def test_when_on_a_list_choice():
    for when in ([1, 3, 6], [[1, 3, 6]]):  # one list value, or a list of list values
        data = patched(
            lambda d, w=when: space(d)["schedule.alpha"].update(when={"schedule.depths": w})
        )
        study = StudyConfig.model_validate(data)
        for params in sample(study, 20):
            assert ("schedule.alpha" in params) == (params["schedule.depths"] == [1, 3, 6])


def test_stage_end_count_follows_base_depths_when_not_searched():
    data = patched(lambda d: space(d).pop("schedule.depths"))
    study = StudyConfig.model_validate(data)
    for params in sample_no_depths(study, 10):
        assert len(params["schedule.stage_ends"]) == 2


def sample_no_depths(study, n):
    tpe = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    return [suggest(tpe.ask(), study.search.space) for _ in range(n)]


def test_materialize_rejects_unknown_paths_and_invalid_values():
    study = StudyConfig.model_validate(GOOD)
    # Tune hands the trial its Optuna coordinates next to the decoded values: ignored
    cfg = materialize(
        study.base,
        {"schedule.stage_ends.1of1": 0.3, "schedule.depths": [2, 6], "schedule.stage_ends": [0.2]},
        name="t",
        out_dir="o",
    )
    assert cfg.schedule.depths == [2, 6] and cfg.out_dir == "o"
    with pytest.raises(ConfigError, match=r"not RunConfig fields: train\.lrr"):
        materialize(study.base, {"train.lrr": 1.0}, name="t", out_dir="o")
    with pytest.raises(ConfigError, match=r"trial t: invalid configuration\n  schedule.alpha"):
        materialize(study.base, {"schedule.alpha": 2.0}, name="t", out_dir="o")


def test_flatten_for_logging():
    flat = flatten(StudyConfig.model_validate(GOOD).base)
    assert flat["schedule.depths"] == "1,3,6" and flat["schedule.stage_ends"] == "0.1,0.25"
    assert flat["train.lr"] == 1e-3 and flat["model.kind"] == "bert" and flat["seed"] == 0
    assert flat["train.betas"] == "0.9,0.999"
    assert all(not isinstance(v, list | dict) for v in flat.values())
    scratch = flatten(baseline_config(StudyConfig.model_validate(GOOD)))
    assert scratch["schedule"] is None


def test_baseline_config_and_key():
    study = StudyConfig.model_validate(GOOD)
    base = study.base
    baseline = baseline_config(study)
    key = baseline_key(base)
    assert baseline.schedule is None and baseline.name == "baseline"
    assert baseline.out_dir == f"outputs/baselines/{key}" and baseline_key(baseline) == key
    assert len(key) == 12 and key == baseline_key(RunConfig.model_validate(base.model_dump()))

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
    assert changed(data={"path": "data/other"}) != key
