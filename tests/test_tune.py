"""`python -m apollo_ray.tune`: its pre-flight checks, then real studies on a local Ray (Optuna
suggestions, one-worker trials in their own processes, a diverging trial, a killed trial that
Tune retries, the cached baseline, and an interrupted study resumed with --resume)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import metrics_rows, reuse_frontier, tiny_study
from mlflow import MlflowClient

from apollo_ray.config import ConfigError, load_run_config
from apollo_ray.faults import FAULT_MARKER
from apollo_ray.mlflow_server import local_store
from apollo_ray.study import load_study
from apollo_ray.tracking import KIND, TRIAL
from apollo_ray.tune import check_resources, main


def test_object_storage_output_is_refused_clearly(tmp_path, gpt_data, capsys):
    path = tiny_study(tmp_path, gpt_data)
    data = yaml.safe_load(path.read_text())
    data["output_dir"] = "s3://bucket/out"
    path.write_text(yaml.safe_dump(data))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "storage_path" in err  # names the field and the way out


@pytest.mark.slow
def test_search_scores_trials_and_records_failures(tiny_search):
    out = tiny_search / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    statuses = [t["status"] for t in summary["trials"]]
    assert len(statuses) == 3 and statuses.count("ok") >= 1
    failed = [s for s in statuses if s != "ok"]
    assert failed and all(s.startswith("diverged: loss is nan") for s in failed)  # lr = 1e9
    # a diverged trial ends at once, not as an error that Tune would retry
    assert not list((out / "tune" / "search").glob("*/error.txt"))
    ok = next(t for t in summary["trials"] if t["status"] == "ok")
    assert ok["speedup"] > 0 and ok["params"]["train.lr"] == 3.0e-3
    best = load_run_config(out / "best.yaml")  # a ready-to-use run config
    assert best.train.lr == 3.0e-3 and best.schedule.alpha == ok["params"]["schedule.alpha"]
    assert "loss is nan" in (out / "summary.txt").read_text()  # the table shows the reason

    # the summary reads the trials against the frontier and says whether the lead is noise
    assert [p["budget"] for p in summary["frontier"]] == [0.5, 1.0]
    assert summary["scratch"]["eval_loss_se"] > 0 and summary["best"][0]["eval_loss_se"] > 0
    assert (
        "evaluation noise" in summary["note"]
        and summary["note"] in (out / "summary.txt").read_text()
    )

    # the finished trial was re-run with 2 fresh seeds; the best follows the confirmed ranking
    (confirmed,) = summary["confirmed"]
    assert confirmed["trial"] == ok["trial"] and confirmed["seeds"] == [1, 2]
    assert confirmed["speedup"]["n"] == 2 and confirmed["speedup"]["low"] is not None
    assert summary["best"][0]["trial"] == confirmed["trial"]
    text = (out / "summary.txt").read_text()
    assert "confirmed with fresh seeds" in text and f"confirmed best trial {ok['trial']}" in text


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
def test_interrupted_search_resumes_without_redoing_trials(
    ray_cluster, tmp_path, gpt_data, tiny_search
):
    path = tiny_study(tmp_path, gpt_data, "resumable", trials=2, lrs=(3.0e-3,))
    data = yaml.safe_load(path.read_text())
    data["base"]["resources"]["max_failures"] = 1
    path.write_text(yaml.safe_dump(data))
    reuse_frontier(tiny_search, tmp_path / "outputs")
    out = tmp_path / "outputs" / "resumable"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    # the first trial's process is killed after step 7: a one-worker trial trains in its own
    # process, so Tune retries it (base.resources.max_failures) and the retry resumes from the
    # trial's newest checkpoint
    proc = subprocess.Popen(
        [sys.executable, "-m", "apollo_ray.tune", str(path), "--kill-at-step", "7"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    scored = []
    while time.time() < deadline and proc.poll() is None and not scored:
        # a trial is finished once its driver reported the score (Tune's result.json)
        scored = [
            p
            for p in (out / "tune" / "search").glob("*/result.json")
            if '"speedup"' in p.read_text()
        ]
        time.sleep(0.2)
    assert scored, "no trial finished in time"
    time.sleep(3)  # let Tune record it as terminated
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=120)
    first = json.loads(scored[0].read_text().splitlines()[-1])["trial_id"]
    run_dir = out / "trials" / first
    assert (run_dir / FAULT_MARKER).exists()  # the trial's process really was killed
    resumes = (run_dir / "resumes.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in resumes] == [6]  # the stage boundary's checkpoint
    assert [r["step"] for r in metrics_rows(run_dir) if "loss" in r] == list(range(1, 13))
    first_mtime = (run_dir / "metrics.jsonl").stat().st_mtime_ns

    assert main([str(path), "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["ok"] * 2
    assert first in {t["trial"] for t in summary["trials"]}
    assert (out / "trials" / first / "metrics.jsonl").stat().st_mtime_ns == first_mtime

    # MLflow: the resumed study continued its own runs (one per trial), none left RUNNING
    client = MlflowClient(local_store(tmp_path / "outputs")[0])
    exp = client.get_experiment_by_name("resumable")
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags[KIND] for r in runs)
    assert kinds == ["baseline", "frontier", "frontier", "study", "trial", "trial"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    trial_runs = {r.data.tags[TRIAL] for r in runs if r.data.tags[KIND] == "trial"}
    assert trial_runs == {t["trial"] for t in summary["trials"]}
