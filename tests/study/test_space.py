"""The define-by-run search space: `suggest` samples valid trials (stage ends that leave no stage
empty, parameters only when their condition holds, parents before children), deterministically
and replayably from Optuna's record; `materialize` makes a trial's run config."""

import itertools

import optuna
import pytest
from conftest import EXAMPLE_STUDY, SEARCH_SPACES, edited_study, space_of, write_study

from apollo_ray.config import ConfigError
from apollo_ray.method.schedule import Schedule
from apollo_ray.study.schema import StudyConfig, load_study
from apollo_ray.study.space import materialize, suggest


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(study: StudyConfig, n: int, seed: int = 0) -> list[dict]:
    """n trials asked from a seeded TPE study, told an objective so TPE leaves its startup."""
    tpe = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    trials = []
    for _ in range(n):
        trial = tpe.ask()
        params = suggest(trial, study.search.space, study.base)
        tpe.tell(trial, params.get("schedule.alpha", 0.0) + len(params["schedule.depths"]))
        trials.append(params)
    return trials


def test_suggest_samples_valid_trials(tmp_path):
    study = load_study(write_study(tmp_path, EXAMPLE_STUDY))
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


@pytest.mark.parametrize("path", SEARCH_SPACES, ids=[p.name for p in SEARCH_SPACES])
def test_suggest_on_the_shipped_spaces(path):
    study = load_study(path)
    for i, params in enumerate(sample(study, 12)):
        cfg = materialize(study.base, params, name=f"t{i}", out_dir=f"out/t{i}")
        Schedule(cfg.schedule, cfg.model.n_layer, cfg.train.steps, cfg.seed)


def test_suggest_is_deterministic():
    study = StudyConfig.model_validate(EXAMPLE_STUDY)
    assert sample(study, 15, seed=3) == sample(study, 15, seed=3)
    assert sample(study, 15, seed=3) != sample(study, 15, seed=4)


def test_suggest_orders_parents_first_and_replays_a_frozen_trial():
    # stage ends and tau listed before what they depend on
    data = edited_study(lambda d: d["search"].update(space=dict(reversed(space_of(d).items()))))
    study = StudyConfig.model_validate(data)
    tpe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = tpe.ask()
    params = suggest(trial, study.search.space, study.base)
    assert list(trial.params).index("schedule.depths") < min(
        i for i, k in enumerate(trial.params) if k.startswith("schedule.stage_ends.")
    )
    assert trial.params["schedule.depths"] == ",".join(map(str, params["schedule.depths"]))
    tpe.tell(trial, 0.0)
    assert suggest(tpe.trials[0], study.search.space, study.base) == params  # Optuna's own record


def test_when_on_a_list_choice():
    for when in ([1, 3, 6], [[1, 3, 6]]):  # one list value, or a list of list values
        data = edited_study(
            lambda d, w=when: space_of(d)["schedule.alpha"].update(when={"schedule.depths": w})
        )
        study = StudyConfig.model_validate(data)
        for params in sample(study, 20):
            assert ("schedule.alpha" in params) == (params["schedule.depths"] == [1, 3, 6])


def test_stage_end_count_follows_base_depths_when_not_searched():
    data = edited_study(lambda d: space_of(d).pop("schedule.depths"))
    study = StudyConfig.model_validate(data)
    for params in sample_no_depths(study, 10):
        assert len(params["schedule.stage_ends"]) == 2


def sample_no_depths(study, n):
    tpe = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    return [suggest(tpe.ask(), study.search.space, study.base) for _ in range(n)]


def test_materialize_rejects_unknown_paths_and_invalid_values():
    study = StudyConfig.model_validate(EXAMPLE_STUDY)
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
    with pytest.raises(ConfigError, match=r"trial t: schedule.alpha"):
        materialize(study.base, {"schedule.alpha": 2.0}, name="t", out_dir="o")
