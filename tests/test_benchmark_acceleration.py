"""The acceleration benchmark at toy size: its JSON holds the fields the issue names, the
arms are the levers they say they are, and finished runs are reused, not trained again."""

import itertools
import json

import pytest
import yaml

import benchmarks.acceleration as accel
from apollo_ray.config import RunConfig
from apollo_ray.data.shards import prepare


def test_arms_scale_the_released_recipe_and_vary_one_lever_each():
    arms = accel.arm_schedules(8, 1000)
    release = arms["release"]
    assert release["depths"] == [1, 2, 4, 8] and release["stage_ends"] == [0.05, 0.10, 0.25]
    assert release["optimizer_state"] == "slot" and release["plan"] == "interp"
    assert arms["start-2"]["depths"] == [2, 4, 8] and arms["start-4"]["depths"] == [4, 8]
    assert arms["rewarmup"]["rewarmup_steps"] == 25  # as long as the first warmup (2.5%)
    for name, schedule in arms.items():
        changed = {k for k in schedule.keys() | release.keys() if schedule.get(k) != release.get(k)}
        assert name == "release" or 1 <= len(changed) <= 2, (name, changed)
        RunConfig.model_validate(  # each is a valid schedule for an 8-layer run
            {
                "name": name,
                "model": {"kind": "gpt", "n_layer": 8},
                "data": {"path": "x"},
                "schedule": schedule,
            }
        )
    with pytest.raises(ValueError, match="at least 8 layers"):
        accel.arm_schedules(4, 1000)


@pytest.mark.slow  # trains about 40 toy runs of 25-100 steps
def test_benchmark_tunes_scratch_reads_test_and_resumes_from_its_cache(
    gpt_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(accel, "RESULTS", tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    argv = ["--kind", "gpt", "--preset", "toy", "--data", str(gpt_data), "--seeds", "2"]
    accel.main([*argv, "--arms", "release", "rewind", "--quiet"])
    out = json.loads((tmp_path / "results" / "acceleration-gpt-toy.json").read_text())
    regime = out["regime"]
    assert regime["tokens_per_param"] >= 0.5 and regime["unigram_entropy"] > 0
    budgets = list(accel.PRESETS["toy"].frontier)
    assert [r["budget"] for r in out["frontier"]] == budgets

    # scratch tuned per budget on the sweep seed: wsd at 4+ LRs a factor of 2 apart (each
    # chosen LR inside its sweep), cosine at the chosen LR for 1/4 to 1x; every sweep run kept
    tuning = out["scratch_tuning"]
    lrs = tuning["lrs"]
    assert len(lrs) >= 4 and all(b / a == pytest.approx(2) for a, b in itertools.pairwise(lrs))
    for budget, chosen in tuning["chosen"].items():
        assert lrs[0] < chosen["lr"] < lrs[-1] or len(lrs) == 8, (budget, chosen)
    sweep = tuning["sweep_runs"]
    assert {r["seed"] for r in sweep} == {accel.SWEEP_SEED}
    assert {(r["family"], r["budget"]) for r in sweep} >= {("cosine", 0.5), ("cosine", 1.0)}
    branches = [r for r in sweep if r["family"] == "wsd" and r["budget"] < 2]
    steps = regime["steps"]  # a branch trains its decay only
    assert branches and all(r["steps_trained"] <= 0.2 * r["budget"] * steps + 1 for r in branches)
    assert out["tuning"]["scratch_sweep_runs"] == len(sweep)
    for row in out["frontier"]:  # the reading seeds train each budget's chosen setting
        assert {"family": row["family"], "lr": row["lr"]} == tuning["chosen"][f"{row['budget']:g}"]
        assert row["seeds"] == [0, 1] and len(row["eval_loss"]) == len(row["test_loss"]) == 2
    assert out["any_checkpoint"]["reading"] in ("frontier", "lower envelope")
    for flag in out["any_checkpoint"]["flags"]:
        assert flag["by"] > 0.01 and flag["test_loss"] is not None

    rows = {(r["arm"], r["budget"]): r for r in out["arms"]}
    assert set(rows) == {("release", 1), ("rewind", 1), ("release", 0.5), ("rewind", 0.5)}
    for row in rows.values():
        for key in (
            "seeds",
            "flops",
            "wall_s",
            "eval_loss",
            "test_loss",
            "speedup_mean",
            "speedup_ci95",
            "wall_speedup_mean",
            "tokens_per_param",
            "epochs",
            "unigram_entropy",
        ):
            assert key in row, key
        assert len(row["test_loss"]) == len(row["seeds"]) == 2
        assert row["speedup_ci95"][0] <= row["speedup_mean"] <= row["speedup_ci95"][1]
        assert (row["family"], row["lr"]) == tuple(tuning["chosen"]["1"].values())
    assert out["best_other_arm"] == "rewind" and out["comparisons"]
    assert (tmp_path / "results" / "acceleration-gpt-toy.png").stat().st_size > 10_000
    capsys.readouterr()

    accel.main([*argv, "--arms", "release", "rewind", "--quiet"])  # everything is cached
    assert "s training" not in capsys.readouterr().out
    again = json.loads((tmp_path / "results" / "acceleration-gpt-toy.json").read_text())
    assert again["arms"] == out["arms"] and again["scratch_tuning"] == tuning

    # a search's best.yaml for this setup, with its own LR: its schedule runs with every seed,
    # paired with the release; one searched for another setup is refused, naming both
    bench = accel.Bench("gpt", "toy", gpt_data, 2, quiet=True)
    bench.tune()
    best = bench.config("release", 1.0, 0).model_dump(mode="json", exclude={"out_dir"})
    best["schedule"] |= {"depths": [4, 8], "stage_ends": [0.3]}
    best["train"] |= {"lr": 2e-3, "decay": "cosine"}
    (tmp_path / "best.yaml").write_text(yaml.safe_dump(best))
    accel.main([*argv, "--arms", "release", "--searched", str(tmp_path / "best.yaml"), "--quiet"])
    # searched@1 and scratch at the searched runs' compute, seeds 0 and 1
    assert capsys.readouterr().out.count("s training") == 4
    out = json.loads((tmp_path / "results" / "acceleration-gpt-toy.json").read_text())
    searched = next(r for r in out["arms"] if r["arm"] == "searched")
    assert searched["seeds"] == [0, 1] and (searched["family"], searched["lr"]) == ("cosine", 2e-3)
    (equal,) = out["equal_flops"]
    assert equal["arm"] == "searched" and 0.4 < equal["scratch_budget"] < 1
    assert equal["arm_test_loss"] == searched["test_loss"]
    assert abs(sum(equal["flops"]) / sum(searched["flops"]) - 1) < 0.05
    assert any(c["arms"] == ["searched", "release"] for c in out["comparisons"])
    best["train"]["steps"] = 99
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(best))
    with pytest.raises(SystemExit, match="searched for another setup"):
        accel.main([*argv, "--searched", str(tmp_path / "other.yaml"), "--quiet"])


def test_benchmark_refuses_data_without_a_test_split(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"document {i}. " * 50 for i in range(20)))
    data = tmp_path / "d"
    prepare([str(tmp_path / "a.txt")], data, "gpt", vocab_size=257, test_fraction=0.0)
    with pytest.raises(SystemExit, match=r"without a test split.*--test-fraction"):
        accel.Bench("gpt", "toy", data, 1, quiet=True)
