"""The study's summary: the ranking against the frontier, the Pareto front of (eval loss,
FLOPs) for a multi-objective search, and the note on evaluation noise."""

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from conftest import EXAMPLE_STUDY, tiny_study

from apollo_ray.search.summary import (
    answer,
    confirmation,
    confirmed_note,
    fingerprint,
    finished,
    format_confirmed,
    format_table,
    noise_note,
    pareto_front,
    ranking,
    trial_rows,
    tuning_note,
)
from apollo_ray.search.tuner import confirm_runs
from apollo_ray.study.schema import StudyConfig, load_study
from apollo_ray.yardstick.regime import Regime
from apollo_ray.yardstick.stats import log_interval


def test_pareto_front():
    rows = [
        {"eval_loss": 3.0, "flops": 10},
        {"eval_loss": 2.0, "flops": 20},
        {"eval_loss": 3.5, "flops": 15},
        {"eval_loss": 1.0, "flops": 40},
    ]
    assert [r["flops"] for r in pareto_front(rows)] == [10, 20, 40]


def test_ranking_against_the_frontier():
    rows = [
        {"trial": "a", "bound": None, "eval_loss": 3.0, "flops": 10, "speedup": 1.2},
        {"trial": "b", "bound": "lower", "eval_loss": 2.5, "flops": 30, "speedup": 1.0},
        {"trial": "c", "bound": None, "eval_loss": 3.1, "flops": 10, "speedup": 1.5},
        {"trial": "d", "bound": "upper", "eval_loss": 4.0, "flops": 10, "speedup": 0.3},
        {"trial": "e", "bound": "lower", "eval_loss": 2.4, "flops": 40, "speedup": 0.9},
    ]
    by_speedup = [r["trial"] for r in sorted(rows, key=ranking("speedup"))]
    assert by_speedup == ["e", "b", "c", "a", "d"]  # beyond the frontier first, by loss
    assert sorted(rows, key=ranking("flops_saving")) == sorted(rows, key=ranking("speedup"))
    assert min(rows, key=ranking("eval_loss"))["trial"] == "e"


def test_noise_note_says_when_the_lead_is_inside_the_noise():
    scratch = {"eval_loss": 3.00, "eval_loss_se": 0.02}
    near = noise_note({"trial": "t1", "eval_loss": 2.98, "eval_loss_se": 0.02}, scratch)
    assert "inside the evaluation noise" in near and "t1" in near and "seed" in near
    far = noise_note({"trial": "t2", "eval_loss": 2.80, "eval_loss_se": 0.02}, scratch)
    assert "outside the evaluation noise" in far
    unknown = noise_note({"trial": "t3", "eval_loss": 2.8, "eval_loss_se": None}, scratch)
    assert "no standard error" in unknown


class FakeResult:
    """What `confirmation` reads of a Tune result."""

    def __init__(
        self, run: int, speedup: float | None, loss: float = 3.0, test: float | None = None
    ) -> None:
        self.config = {"run": run}
        self.error = None if speedup is not None else RuntimeError("loss is nan")
        self.metrics = {} if speedup is None else {"speedup": speedup, "eval_loss": loss}
        if test is not None:
            self.metrics["test_speedup"] = test


def test_confirmation_ranks_on_the_means_over_fresh_seeds():
    study = StudyConfig.model_validate(
        {**EXAMPLE_STUDY, "search": {**EXAMPLE_STUDY["search"], "confirm": {"top_k": 2}}}
    )
    best = [{"trial": "a", "params": {"train.lr": 1e-3}}, {"trial": "b", "params": {}}]
    runs = confirm_runs(study, best)
    assert [(r["trial"], r["seed"]) for r in runs] == [
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("b", 1),
        ("b", 2),
        ("b", 3),
    ]
    # "a" won the search, but over fresh seeds "b" is consistently faster
    speedups = [1.05, 0.95, 1.0, 1.3, 1.2, 1.25]
    grid = [FakeResult(i, s) for i, s in enumerate(speedups)]
    confirmed = confirmation(study, runs, grid)
    assert [e["trial"] for e in confirmed] == ["b", "a"]
    assert confirmed[0]["seeds"] == [1, 2, 3] and confirmed[0]["speedup"]["n"] == 3
    note = confirmed_note(confirmed)
    assert "confirmed best trial b" in note and "paired by seed" in note
    assert "ratio to a" in note and "differs from 1" in note
    assert "evaluation noise, +-0.0588 at 95%" in confirmed_note(confirmed, scratch_se=0.03)
    # a seed that failed is left out of the mean and said
    grid[4] = FakeResult(4, None)
    confirmed = confirmation(study, runs, grid)
    (b,) = [e for e in confirmed if e["trial"] == "b"]
    assert b["seeds"] == [1, 3] and b["failed_seeds"] == [2]
    assert "failed" not in format_confirmed(confirmed)


def test_the_confirmed_speedup_a_person_reads_is_the_test_split_s():
    """Confirm ranks on validation (what selects) and reports the test split's speedup."""
    study = StudyConfig.model_validate(
        {**EXAMPLE_STUDY, "search": {**EXAMPLE_STUDY["search"], "confirm": {"top_k": 2}}}
    )
    runs = confirm_runs(study, [{"trial": "a", "params": {}}, {"trial": "b", "params": {}}])
    validation, test = [1.3, 1.2, 1.25, 1.0, 1.1, 1.05], [1.1, 1.0, 1.05, 1.2, 1.3, 1.25]
    grid = [FakeResult(i, v, test=t) for i, (v, t) in enumerate(zip(validation, test, strict=True))]
    confirmed = confirmation(study, runs, grid)
    assert [e["trial"] for e in confirmed] == ["a", "b"]  # chosen on validation
    assert confirmed[0]["test_speedups"] == [1.1, 1.0, 1.05]
    note = confirmed_note(confirmed)
    assert note.startswith("confirmed best trial a: speedup 1.05") and "on the test split" in note
    assert "validation, which chose it: speedup 1.25" in note
    table = format_confirmed(confirmed)
    assert "speedup (test)" in table and "1.05 [" in table


def test_each_trial_says_how_it_ended():
    study = StudyConfig.model_validate(EXAMPLE_STUDY)
    why = "loss is nan (gradient norm nan) at step 1; the last checkpoint and ... in /t/b2"
    ended = {
        "a1": ({"speedup": 1.2, "flops_saving": 0.1, "eval_loss": 3.0}, None),
        "b2": ({"diverged": why}, None),  # its last report: the trial ended, not retried
        "c3": ({"step": 30, "eval_loss": 4.0}, None),  # stopped by ASHA
        "d4": ({"step": 10}, RuntimeError("Traceback ...\nActorDiedError: worker died")),
    }
    grid = [
        SimpleNamespace(metrics={"trial_id": t, **m}, error=e, config={}, path=f"/t/{t}")
        for t, (m, e) in ended.items()
    ]
    assert {r["trial"]: r["status"] for r in trial_rows(study, grid)} == {
        "a1": "ok",
        "b2": f"diverged: {why}",
        "c3": "stopped early",
        "d4": "failed: ActorDiedError: worker died",
    }


def test_the_tuning_of_both_sides_and_the_flags_are_said():
    baseline = {
        "chosen": {"1": {"family": "wsd", "lr": 2e-3}},
        "tuning_runs": 26,
        "flags": [{"run": "scratch-1x-wsd-lr0.002-seed1000", "step": 600, "by": 0.2}],
    }
    note = tuning_note(baseline, 12, 1)
    assert note.startswith("tuning: scratch 26 sweep and frontier runs, the search 12 trials")
    assert "and 1 confirmed" in note
    assert "scratch-1x-wsd-lr0.002-seed1000 at step 600 is 0.200 nats below" in note
    assert "not kept, so speedups read near that compute are overstated" in note
    baseline["flags"][0] |= {"eval_loss": 2.2, "test_loss": 2.3}
    assert "read against the lower envelope with it" in tuning_note(baseline, 12, 1)
    assert (
        tuning_note(None, 5, 0) == "tuning: scratch untuned (baseline: null), the search 5 trials"
    )


REGIME = Regime(params=1000, tokens=22_000, train_tokens=10_000, entropy=3.0, scratch_loss=2.0)


def confirmed_entry(trial: str, test: list[float], bounds=None) -> dict:
    """A confirmed trial as `confirmation` leaves it, read on test."""
    return {
        "trial": trial,
        "seeds": list(range(1, len(test) + 1)),
        "bounds": bounds or [None] * len(test),
        "speedup": asdict(log_interval(test)),
        "test_speedup": asdict(log_interval(test)),
    }


def test_the_answer_is_one_sentence_with_its_interval_its_verdict_and_the_regime():
    regime = "regime: 22 tokens per parameter, 2.2 epochs, scratch at 2 nats against a unigram "
    saved = answer([confirmed_entry("a", [1.5, 1.6, 1.55])], None, REGIME)
    assert saved.startswith(
        "answer: the confirmed best schedule (trial a) saved 35% of scratch's compute for "
        "scratch's loss: speedup 1.55x, 95% interval [1.43, 1.68] over 3 seeds on the test split;"
    )
    assert regime in saved and saved.endswith("entropy of 3.") and "\n" not in saved
    same = answer([confirmed_entry("b", [0.9, 1.2, 1.0])], None, REGIME)
    assert same.startswith("answer: no schedule differed from scratch: the confirmed best ")
    assert "an interval that holds 1;" in same
    cost = answer([confirmed_entry("c", [0.5, 0.45, 0.4])], None, REGIME)
    assert "(trial c) cost 123% more compute than scratch: speedup 0.448x" in cost
    least = answer([confirmed_entry("d", [1.5, 1.6, 1.55], ["lower"] * 3)], None, REGIME)
    assert "saved at least 35%" in least and "speedup at least 1.55x" in least
    most = answer([confirmed_entry("f", [0.66, 0.66], ["upper"] * 2)], None, REGIME)
    assert "cost at least 52% more compute than scratch: speedup at most 0.66x" in most
    single = answer(None, {"trial": "e", "speedup": 1.2, "test_speedup": 1.1}, REGIME)
    assert "best trial e read a speedup of 1.1x on the test split, one seed and no" in single


def test_the_trials_table_fits_100_columns_with_the_parameters_below_it():
    long = {f"schedule.knob_{i}": [0.05, 0.1, 0.25] for i in range(8)}
    why = "loss is nan (gradient norm nan) at step 1; the last checkpoint and metrics are intact"
    rows = [
        {"trial": "a1", "status": "ok", "params": long, "eval_loss": 2.5, "speedup": 1.2},
        {"trial": "b2", "status": f"diverged: {why}", "params": {"train.lr": 1e9}},
    ]
    text = format_table(rows)
    assert all(len(line) <= 100 for line in text.splitlines()), text
    lines = text.splitlines()
    assert lines[0].split() == ["trial", "eval", "loss", "speedup", "test", "speedup", "paper",
                                "saving", "status"]  # fmt: skip
    assert lines[2].rstrip().endswith("diverged")
    legend = "\n".join(lines[lines.index("each trial's parameters (schedule.x written x):") :])
    assert "a1  knob_0=[0.05, 0.1, 0.25] knob_1=" in legend
    assert "b2  train.lr=1e+09" in legend and "at step 1; the last" in legend


def test_a_finished_study_is_known_by_what_it_asked_for(tmp_path, gpt_data):
    study = load_study(tiny_study(tmp_path, gpt_data))
    out = Path(study.study_dir)
    out.mkdir(parents=True)
    assert finished(study) is None  # not run yet
    (out / "summary.txt").write_text("the end\n")
    (out / "summary.json").write_text(json.dumps({"fingerprint": fingerprint(study)}))
    assert finished(study) == "the end\n"
    more = study.model_copy(update={"search": study.search.model_copy(update={"trials": 9})})
    assert finished(more) is None  # the study file changed since: it goes on
