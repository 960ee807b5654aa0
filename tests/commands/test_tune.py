"""`python -m apollo_ray.tune`: its pre-flight checks, then real studies on a local Ray (Optuna
suggestions, one-worker trials in their own processes, a diverging trial, a killed trial that
Tune retries, the cached baseline, and an interrupted study resumed with --resume)."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import metrics_rows, tiny_study

from apollo_ray.config import ConfigError, load_run_config
from apollo_ray.study.schema import load_study
from apollo_ray.training.faults import FAULT_MARKER
from apollo_ray.tune import check_resources, main


def test_object_storage_output_is_refused_clearly(tmp_path, gpt_data, capsys):
    path = tiny_study(tmp_path, gpt_data)
    data = yaml.safe_load(path.read_text())
    data["output_dir"] = "s3://bucket/out"
    path.write_text(yaml.safe_dump(data))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "storage_path" in err  # names the field and the way out


def test_data_prepared_with_other_held_out_splits_is_refused(tmp_path, gpt_data, capsys):
    """Data from before the test split (or with other fractions) would select and report on
    other documents than the study says: refused before anything starts, naming both."""
    path = tiny_study(tmp_path, gpt_data)
    data = yaml.safe_load(path.read_text())
    data["prepare"] = {"sources": ["demo"], "val_fraction": 0.1, "test_fraction": 0.2}
    path.write_text(yaml.safe_dump(data))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "test_fraction 0.1, the study's prepare asks for 0.1 and 0.2" in err
    assert f"remove {gpt_data}" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_search_scores_trials_and_records_failures(tiny_search):
    out = tiny_search / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    statuses = [t["status"] for t in summary["trials"]]
    assert len(statuses) == 3 and statuses.count("ok") >= 1
    # named in the order the sampler suggested them: two clones of a study name them alike
    assert sorted(t["trial"] for t in summary["trials"]) == ["trial1", "trial2", "trial3"]
    failed = [s for s in statuses if s != "ok"]
    assert failed and all(s.startswith("diverged: loss is nan") for s in failed)  # lr = 1e9
    # a diverged trial ends at once, not as an error that Tune would retry (the finished trial
    # errored once: its process was killed, --kill-at-step, and Tune retried it)
    state = tiny_search / "tune" / "tiny" / "search"  # Tune's, apart from the trials
    errored = [p.parent.name for p in state.glob("*/error.txt")]
    diverged = [t["trial"] for t in summary["trials"] if t["status"] != "ok"]
    assert not [name for name in errored if any(trial in name for trial in diverged)], errored
    ok = next(t for t in summary["trials"] if t["status"] == "ok")
    assert ok["speedup"] > 0 and ok["params"]["train.lr"] == 3.0e-3
    best = load_run_config(out / "best.yaml")  # a ready-to-use run config
    assert best.train.lr == 3.0e-3 and best.schedule.alpha == ok["params"]["schedule.alpha"]
    assert "loss is nan" in (out / "summary.txt").read_text()  # the table shows the reason

    # the summary reads the trials against the frontier and says whether the lead is noise
    assert [p["budget"] for p in summary["frontier"]] == [0.5, 1.0]
    assert summary["scratch"]["eval_loss_se"] > 0 and summary["best"][0]["eval_loss_se"] > 0
    text = (out / "summary.txt").read_text()
    assert "evaluation noise" in summary["note"]
    assert " ".join(summary["note"].split()) in " ".join(text.split())  # wrapped to 100 columns

    # the finished trial was re-run with 2 fresh seeds; the best follows the confirmed ranking
    (confirmed,) = summary["confirmed"]
    assert confirmed["trial"] == ok["trial"] and confirmed["seeds"] == [1, 2]
    assert confirmed["speedup"]["n"] == 2 and confirmed["speedup"]["low"] is not None
    assert summary["best"][0]["trial"] == confirmed["trial"]
    assert "confirmed with fresh seeds" in text and f"confirmed best trial {ok['trial']}" in text
    # the answer in one sentence, with the regime; every line within 100 columns
    assert summary["answer"].startswith("answer: ") and "tokens per parameter" in summary["answer"]
    assert " ".join(summary["answer"].split()) in " ".join(text.split())
    assert summary["regime"]["tokens_per_param"] > 0 and summary["regime"]["unigram_entropy"] > 0
    assert all(len(line) <= 100 for line in text.splitlines()), text


@pytest.mark.slow
def test_a_finished_study_prints_its_end_again_without_ray_or_mlflow(tiny_search):
    """`--resume` on a finished study (a second `make demo`): its summary as printed, at once;
    Ray and MLflow addresses that cannot be reached show that neither is started."""
    env = {
        **os.environ,
        "RAY_ADDRESS": "127.0.0.1:9",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
    }
    path = tiny_search.parent / "tiny.yaml"
    again = subprocess.run(
        [sys.executable, "-m", "apollo_ray.tune", str(path), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith((tiny_search / "tiny" / "summary.txt").read_text())
    assert "summary: " in again.stdout and "MLflow: http://127.0.0.1:9" in again.stdout


@pytest.mark.slow
def test_more_workers_than_the_cluster_has(ray_cluster, tmp_path, gpt_data):
    path = tiny_study(tmp_path, gpt_data)
    data = yaml.safe_load(path.read_text())
    data["base"]["resources"]["workers"] = 64
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(
        ConfigError,
        match=r"base\.resources: a trial needs 64\.1 CPU \(64 workers and its driver\) but the Ray "
        r"cluster has \d+, and no autoscaler",
    ):
        check_resources(load_study(path))


@pytest.mark.slow
def test_interrupted_search_resumes_without_redoing_trials(tiny_search):
    # the shared search was interrupted (Ctrl-C) once its first trial had finished, and resumed
    out = tiny_search / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["trials"]) == 3 and len(summary["confirmed"]) == 1
    # that trial's process was killed after step 7 (--kill-at-step): it was the only one to get
    # that far (the others diverged at step 1), and Tune's retry resumed from step 6's checkpoint
    (run_dir,) = [p.parent for p in (out / "trials").glob(f"*/{FAULT_MARKER}")]
    assert run_dir.name in {t["trial"] for t in summary["trials"] if t["status"] == "ok"}
    resumes = (run_dir / "resumes.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in resumes] == [6]  # the stage boundary's checkpoint
    assert [r["step"] for r in metrics_rows(run_dir) if "loss" in r] == list(range(1, 13))
    # Ctrl-C stopped the study there: no summary, confirmation or registered model of a search
    # half done, and the way to go on
    log = (tiny_search.parent / "interrupted.log").read_text()
    assert log.endswith("exit status 130\n"), log
    assert f"python -m apollo_ray.tune {tiny_search.parent / 'tiny.yaml'} --resume" in log
    assert "re-run" not in log and "registered" not in log and "summary:" not in log, log
    assert "Tuner.restore" not in log  # Tune's own advice, for its API, is not ours
    # the resumed study did not train it again
    resumed_at = float((tiny_search.parent / "resumed_at").read_text())
    assert (run_dir / "metrics.jsonl").stat().st_mtime < resumed_at


@pytest.mark.slow
def test_the_frontier_is_tuned_per_budget(ray_cluster, tmp_path, gpt_data):
    """`baseline`: a wsd sweep of two LRs (one trunk each, the shorter runs branches of it) and
    cosine at the chosen LR up to 1x, on the sweep seed; the best setting per budget on
    validation, trained on the base seed (the 2x run, which cosine cannot change, beside the
    cosine runs, and the shorter ones of its setting branches of it); all in baseline.json."""
    from apollo_ray.search.baseline import ensure_frontier

    path = tiny_study(tmp_path, gpt_data)
    data = yaml.safe_load(path.read_text())
    data["baseline"] = {"lrs": [1.0e-3, 3.0e-3], "sweep_seed": 5, "extend": 0}
    data["frontier"] = [0.5, 1.0, 2.0]
    path.write_text(yaml.safe_dump(data))
    study = load_study(path)
    scratch = ensure_frontier(study)
    record = json.loads((tmp_path / "outputs" / "tiny" / "baseline.json").read_text())
    sweep = [r for r in record["runs"] if r["role"] == "sweep"]
    assert {(r["budget"], r["family"], r["lr"]) for r in sweep} == {
        (b, "wsd", lr) for b in (0.5, 1.0, 2.0) for lr in (1.0e-3, 3.0e-3)
    } | {(b, "cosine", record["chosen_wsd"][f"{b:g}"]) for b in (0.5, 1.0)}
    assert all(r["seed"] == 5 for r in sweep)
    assert all(r["forked"] == (r["budget"] < 2) for r in sweep if r["family"] == "wsd")
    for budget in ("0.5", "1", "2"):
        best = min((r for r in sweep if f"{r['budget']:g}" == budget), key=lambda r: r["eval_loss"])
        assert record["chosen"][budget] == {"family": best["family"], "lr": best["lr"]}
    reading = {f"{r['budget']:g}": r for r in record["runs"] if r["role"] == "frontier"}
    assert set(reading) == {"0.5", "1", "2"} and all(r["seed"] == 0 for r in reading.values())
    for budget in ("0.5", "1"):  # the same setting as 2x: a branch of its trunk
        assert reading[budget]["forked"] == (record["chosen"][budget] == record["chosen"]["2"])
    assert record["tuning_runs"] == len({r["run"] for r in record["runs"]})
    # every flagged point was read from the checkpoint its run kept, and joined the frontier
    assert all(f["eval_loss"] is not None and f["test_loss"] is not None for f in record["flags"])
    assert record["reading"] == ("lower envelope" if record["flags"] else "frontier")
    assert len(scratch.checkpoints) == len(record["flags"])
    assert sorted(scratch.runs) == [0.5, 1.0, 2.0]
    assert all(reading[f"{b:g}"]["run"] in path for b, path in scratch.runs.items())


@pytest.mark.slow
def test_a_finished_search_is_carried_to_a_deeper_target(
    ray_cluster, tmp_path, gpt_data, capsys, monkeypatch
):
    """`transfer`, added to a finished search and run with --transfer-only: the search's three
    trials and the release carried from 4 to 8 layers (depths scaled, ends kept), trained
    against the target's own frontier, the proxy's best and the release on two seeds; the
    correlation with its interval, best.yaml the target's, the transfer's MLflow run with its
    plot; then --resume prints the study's end and the transfer's without Ray. Last, the
    benchmark's transfer (benchmarks/transfer.py, which the GPU script runs) at toy size on the
    same search, against the toy preset's own tuned frontier."""
    from mlflow import MlflowClient

    import benchmarks.acceleration as accel
    import benchmarks.transfer as bench_transfer
    from apollo_ray.records.mlflow_server import local_store
    from apollo_ray.records.tracking import KIND

    path = tiny_study(tmp_path, gpt_data, "proxy", lrs=(3.0e-3, 1.0e-3, 6.0e-3))
    data = yaml.safe_load(path.read_text())
    data["search"]["confirm"] = {"top_k": 1, "seeds": 2}
    path.write_text(yaml.safe_dump(data))
    assert main([str(path), "--transfer-only"]) == 2  # no transfer section yet
    assert "needs a `transfer` section" in capsys.readouterr().err
    transfer = {
        "base": {"model": {"n_layer": 8}, "train": {"steps": 16}},
        "carry": 3,
        "seeds": 1,
        "best_seeds": 2,
        "baseline": None,
    }
    data["transfer"] = transfer
    path.write_text(yaml.safe_dump(data))
    assert main([str(path), "--transfer-only"]) == 2  # no finished search yet: said, no Ray
    assert "holds no finished search of this study" in capsys.readouterr().err
    del data["transfer"]
    path.write_text(yaml.safe_dump(data))
    assert main([str(path)]) == 0  # the search alone
    out = tmp_path / "outputs"
    summary = json.loads((out / "proxy" / "summary.json").read_text())
    data["transfer"] = transfer
    path.write_text(yaml.safe_dump(data))
    assert main([str(path), "--transfer-only"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "proxy" / "transfer.json").read_text())
    names = [e["schedule"] for e in report["schedules"]]
    done = [t["trial"] for t in summary["trials"] if t["status"] == "ok"]
    assert names == [*done, "release"] and len(done) == 3
    best = summary["best"][0]["trial"]
    for e in report["schedules"]:
        proxy_depths = e["params"].get("schedule.depths", [1, 2, 4])
        assert proxy_depths == [1, 2, 4]  # tiny_study does not search the depths
        assert e["target_params"]["schedule.depths"] == [2, 4, 8]
        assert e["target_params"]["schedule.stage_ends"] == [0.25, 0.5]
        two = e["schedule"] in (best, "release")
        assert e["target"]["seeds"] == ([1, 2] if two else [1])
        assert e["target"]["interval"]["n"] == len(e["target"]["seeds"])
        assert e["proxy"]["interval"]["n"] == (2 if two else 1)  # confirm's seeds, the release's
        run_dir = out / "proxy-target" / "trials" / f"{e['schedule']}-seed1"
        assert metrics_rows(run_dir)[-1]["step"] == 16
    s = report["spearman"]
    assert s["n"] == 4 and -1 <= s["low"] <= s["rho"] <= s["high"] <= 1
    assert report["proxy_best"] == best and report["target_best"] in names
    assert report["split"] == "test" and report["verdict"] in " ".join(printed.split())
    target = load_run_config(out / "proxy" / "best.yaml")  # the target's run of the winner
    assert target.model.n_layer == 8 and target.schedule.depths == [2, 4, 8]
    assert load_run_config(out / "proxy" / "best-proxy.yaml").model.n_layer == 4
    assert len(list((out / "baselines").iterdir())) == 4  # 2 budgets at each size
    client = MlflowClient(local_store(out)[0])
    exp = client.get_experiment_by_name("proxy")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`{KIND}` = 'transfer'")
    assert run.data.metrics["spearman_rho"] == pytest.approx(s["rho"])
    assert run.data.tags["apollo.target_best"] == report["target_best"]
    plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert plots == ["plots/proxy_vs_target.png"]
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    kinds = sorted(c.data.tags[KIND] for c in children)
    # the release at the proxy (2 seeds), the target's runs (best 2, 1, 1, release 2), its baseline
    assert kinds == ["baseline", *["reference"] * 2, *["target"] * 6]
    assert main([str(path), "--resume"]) == 0  # finished: both ends again, without Ray
    again = capsys.readouterr().out
    assert report["verdict"] in " ".join(again.split()) and "confirmed with fresh seeds" in again

    monkeypatch.setattr(accel, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench_transfer, "RESULTS", tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    argv = ["--study", str(path), "--preset", "toy", "--data", str(gpt_data), "--seeds", "2"]
    bench_transfer.main([*argv, "--quiet"])
    bench = json.loads((tmp_path / "results" / "transfer-gpt-toy.json").read_text())
    assert [e["schedule"] for e in bench["schedules"]] == names
    for ours, product in zip(bench["schedules"], report["schedules"], strict=True):
        # the same proxy readings: the release's proxy runs are the product's, found finished
        assert ours["proxy"]["test_speedups"] == pytest.approx(product["proxy"]["test_speedups"])
        assert ours["target_params"]["schedule.depths"] == [2, 4, 8]
        two = ours["schedule"] in (best, "release")
        assert ours["target"]["seeds"] == ([0, 1] if two else [0])  # the frontier's seeds
    assert bench["spearman"]["n"] == 4 and bench["target_choice"]["lr"] > 0
    assert (tmp_path / "results" / "transfer-gpt-toy.png").stat().st_size > 10_000
