"""Search small, train big, without Ray: the scaling rule on plans of several depths, which
trials are carried, the rank correlation (against SciPy's) and its bootstrap, the report."""

import itertools
import math
import random
from pathlib import Path

import pytest
import yaml
from scipy import stats

from apollo_ray.config import ConfigError
from apollo_ray.search.transfer import RELEASE, carried, compare, target_params
from apollo_ray.study.scaling import scale_plan
from apollo_ray.study.schema import load_study
from apollo_ray.yardstick.stats import bootstrap_spearman, spearman


@pytest.mark.parametrize(
    ("depths", "ends", "proxy", "target", "want_depths", "want_ends"),
    [
        ([1, 2, 4], [0.05, 0.25], 4, 8, [2, 4, 8], [0.05, 0.25]),  # the demo to the benchmark
        ([1, 3, 6, 12], [0.05, 0.1, 0.25], 12, 24, [2, 6, 12, 24], [0.05, 0.1, 0.25]),
        ([1, 3, 6, 12], [0.05, 0.1, 0.25], 12, 12, [1, 3, 6, 12], [0.05, 0.1, 0.25]),
        ([1, 2, 4], [0.1, 0.3], 4, 6, [2, 3, 6], [0.1, 0.3]),  # 1.5 rounds up to 2
        ([1, 2, 4], [0.1, 0.3], 4, 2, [1, 2], [0.3]),  # 0.5 -> 1 = 1: one stage, the later end
        ([2, 3, 4], [0.1, 0.3], 4, 2, [1, 2], [0.1]),  # 1.5 -> 2 = the last: merged into it
        ([3, 4], [0.5], 4, 1, [1], []),  # one layer: no growth is left (scratch)
        ([1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.3, 0.4, 0.5], 6, 3, [1, 2, 3], [0.2, 0.4]),
        ([1, 4], [0.2], 4, 48, [12, 48], [0.2]),
    ],
)
def test_the_scaling_rule(depths, ends, proxy, target, want_depths, want_ends):
    got_depths, got_ends = scale_plan(depths, ends, proxy, target)
    assert (got_depths, got_ends) == (want_depths, want_ends)
    # always a plan the schedule accepts: depths strictly increasing to the target's layers,
    # one end per stage but the last, increasing, each one of the proxy's ends
    assert got_depths[-1] == target and all(b > a for a, b in itertools.pairwise(got_depths))
    assert len(got_ends) == len(got_depths) - 1 and set(got_ends) <= set(ends)


def test_the_scaling_rule_is_checked_against_every_valid_plan():
    """Random plans and layer counts: the result is always a valid plan with the proxy's ends."""
    rng = random.Random(0)
    for _ in range(500):
        proxy, target = rng.randint(1, 24), rng.randint(1, 48)
        depths = [*sorted(rng.sample(range(1, proxy), rng.randint(0, proxy - 1))), proxy]
        ends = sorted(rng.sample([i / 100 for i in range(1, 100)], len(depths) - 1))
        got_depths, got_ends = scale_plan(depths, ends, proxy, target)
        assert got_depths[-1] == target and got_depths == sorted(set(got_depths))
        assert got_ends == sorted(got_ends) and set(got_ends) <= set(ends)
        assert len(got_ends) == len(got_depths) - 1


def test_carried_trials_are_the_best_the_worst_and_between():
    rows = [{"trial": f"t{i}", "status": "ok"} for i in range(10)]
    rows.append({"trial": "bad", "status": "diverged: nan"})
    assert [r["trial"] for r in carried(rows, 4)] == ["t0", "t3", "t6", "t9"]
    assert [r["trial"] for r in carried(rows, 2)] == ["t0", "t9"]
    assert len(carried(rows, 20)) == 10  # every finished one, never the diverged


def test_spearman_against_scipy():
    rng = random.Random(1)
    for n in (3, 5, 8):
        for _ in range(50):
            x = [rng.choice([0.5, 0.8, 1.0, 1.2, rng.random()]) for _ in range(n)]
            y = [rng.random() for _ in range(n)]
            ours, theirs = spearman(x, y), stats.spearmanr(x, y).statistic
            assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs)


def test_the_bootstrap_interval_holds_the_estimate_and_narrows_with_agreement():
    agree = [[1.0 + i / 10] * 3 for i in range(7)]
    rho, low, high = bootstrap_spearman(agree, agree)
    assert rho == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)
    rng = random.Random(2)
    noisy_p = [[rng.lognormvariate(0, 0.3) for _ in range(3)] for _ in range(7)]
    noisy_t = [[rng.lognormvariate(0, 0.3) for _ in range(3)] for _ in range(7)]
    rho, low, high = bootstrap_spearman(noisy_p, noisy_t)
    assert -1 <= low <= rho <= high <= 1 and low < 0 < high  # unrelated: holds no difference


def _side(*test):
    return {"seeds": list(range(len(test))), "speedups": list(test), "test_speedups": list(test)}


def test_the_report_says_whether_the_ranking_held():
    entries = [
        {"schedule": f"trial{i}", "proxy": _side(s), "target": _side(s * 1.1, s * 1.2)}
        for i, s in enumerate([0.5, 0.7, 0.9, 1.1, 1.3])
    ]
    entries.append({"schedule": RELEASE, "proxy": _side(0.6, 0.62), "target": _side(0.65)})
    report = compare(entries, "trial4")
    assert report["split"] == "test" and report["spearman"]["n"] == 6
    assert report["spearman"]["rho"] == pytest.approx(1.0)
    assert report["target_best"] == "trial4" and report["same_best"]
    assert report["verdict"].startswith("the proxy's ranking held")
    assert entries[0]["target"]["interval"]["n"] == 2  # two seeds: a geometric mean, an interval
    reversed_ = [dict(e, target=_side(1 / e["proxy"]["speedups"][0])) for e in entries]
    report = compare(reversed_, "trial4")
    assert not report["same_best"] and report["target_best"] == "trial0"
    assert report["spearman"]["rho"] == pytest.approx(-1.0)


def test_target_params_scale_the_schedule_and_take_scratchs_lr(tmp_path):
    data = yaml.safe_load(Path("search_spaces/transfer-gpt.yaml").read_text())
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    study = load_study(path)
    params = {
        "schedule.depths": [1, 4],
        "schedule.stage_ends": [0.3],
        "train.lr": 1e-3,
        "schedule.alpha": 0.5,
    }
    out = target_params(study, study.target(), params, {"lr": 8e-3, "family": "wsd"})
    assert out["schedule.depths"] == [2, 8] and out["schedule.stage_ends"] == [0.3]
    assert out["schedule.alpha"] == 0.5 and out["train.lr"] == 8e-3 and out["train.decay"] == "wsd"
    target = study.target()  # base's schedule, the release, scaled too
    assert target.base.model.n_layer == 8 and target.base.schedule.depths == [2, 4, 8]
    assert target.experiment == "transfer-gpt-target" and target.base.train.steps == 1215


def test_a_transfer_section_that_cannot_make_a_target_names_the_field(tmp_path):
    data = yaml.safe_load(Path("search_spaces/transfer-gpt.yaml").read_text())
    data["transfer"]["base"]["model"]["n_head"] = 5  # 48 is not divisible by 5
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"transfer\.base\.model.*divisible by n_head"):
        load_study(path)
    data["transfer"]["base"] = {"schedule": {"depths": [8]}}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="schedule: not a section the target overrides"):
        load_study(path)
