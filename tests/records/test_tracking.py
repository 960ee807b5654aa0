"""The study's MLflow runs, from the drivers: runs closed whatever happens (a trial the
scheduler stopped, runs left RUNNING), a tracking server that does not answer at the start, a
single `python -m apollo_ray.train` run recorded like a trial, then what a real small search
left in MLflow (nesting, params, metrics, artifacts, the registered model in Hugging Face
format)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    checkpoint_names,
    expected,
    history,
    metrics_rows,
    records,
    search_runs,
    stage_checkpoints,
    tiny_run_dict,
    tiny_study,
)
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from apollo_ray.records.mlflow_server import free_port, local_store
from apollo_ray.records.tracking import KIND, TRIAL, close_leftovers, start_run
from apollo_ray.study.schema import load_study
from apollo_ray.training.checkpoints import load as load_checkpoint


def test_runs_left_running_are_closed(tmp_path, gpt_data):
    from apollo_ray.records.tracking import StudyRecord, save_session, trial_runs_callback

    uri = local_store(tmp_path)[0]
    client = MlflowClient(uri)
    exp = client.create_experiment("leftovers")
    parent = start_run(client, exp, "study", {KIND: "study"})
    stopped = start_run(client, exp, "t1", {KIND: "trial", TRIAL: "t1"}, parent)
    finished = start_run(client, exp, "t2", {KIND: "trial", TRIAL: "t2"}, parent)
    killed = start_run(client, exp, "t3", {KIND: "trial", TRIAL: "t3"}, parent)
    client.set_terminated(finished, "FINISHED")

    # a trial that ASHA stopped: Tune reports it complete while its run is still RUNNING
    study = load_study(tiny_study(tmp_path, gpt_data, "leftovers"))
    save_session(study, StudyRecord(uri, exp, parent))  # as the study's start does
    callback = trial_runs_callback(study)
    callback.on_trial_complete(0, [], "t1")  # a trial's name is what str() gives
    callback.on_trial_complete(0, [], "t2")
    assert client.get_run(stopped).info.status == "KILLED"
    assert client.get_run(stopped).data.tags["apollo.end"] == "stopped early by the scheduler"
    assert client.get_run(finished).info.status == "FINISHED"

    # the study's end closes whatever is left (a trial killed together with its driver)
    assert close_leftovers(client, exp, parent) == [killed]
    assert client.get_run(killed).info.status == "KILLED"


def test_unreachable_tracking_server_at_study_start_is_a_clear_error(tmp_path, gpt_data, capsys):
    from apollo_ray.tune import main

    path = tiny_study(tmp_path, gpt_data, "nowhere")
    study = yaml.safe_load(path.read_text())
    study["tracking"] = {"mlflow_uri": f"http://127.0.0.1:{free_port()}"}
    path.write_text(yaml.safe_dump(study))
    assert main([str(path)]) == 2
    assert "tracking.mlflow_uri: MLflow at http://127.0.0.1:" in capsys.readouterr().err


@pytest.mark.slow  # an MLflow server and two tiny runs
def test_a_single_run_is_recorded_like_a_trial_through_the_running_server(
    tmp_path, gpt_data, capsys
):
    from apollo_ray.records.mlflow_server import LocalServer, serving
    from apollo_ray.train import main

    run = tiny_run_dict(gpt_data, tmp_path / "run")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    outputs = tmp_path / "outputs"
    args = [str(tmp_path / "run.yaml"), "--no-progress", "--output-dir", str(outputs)]
    with LocalServer(outputs) as server:  # a study serving the local store: the run joins it
        assert serving(outputs) == server.uri
        assert main([*args, "--checkpoints", "all"]) == 0
        assert f"at {server.uri}" in capsys.readouterr().out
        assert main(args) == 0  # again: it resumes at its end and continues its MLflow run
    assert serving(outputs) is None

    client = MlflowClient(local_store(outputs)[0])
    exp = client.get_experiment_by_name("runs")
    (found,) = client.search_runs([exp.experiment_id])
    run_id, out = found.info.run_id, tmp_path / "run"
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["schedule.depths"] == "1,2,4"  # the whole config, as a trial's
    got, want = records(client, run_id, out)
    assert got == want  # every row once, though it ran twice
    assert len(history(client, run_id, "final_eval_loss")) == 1  # its totals too
    assert checkpoint_names(client, run_id) == stage_checkpoints()
    plots = {Path(a.path).name for a in client.list_artifacts(run_id, "plots")}
    assert {"loss_vs_flops.png", "depth_histogram.png"} <= plots


# ---------------------------------------------------------------- a real search, in MLflow


@pytest.mark.slow
def test_search_is_recorded_in_mlflow(tiny_search):
    client, _, runs = search_runs(tiny_search)
    assert all(r.info.status != "RUNNING" for r in runs)
    (study,) = [r for r in runs if r.data.tags[KIND] == "study"]
    parent = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}
    children = [r for r in runs if parent[r.info.run_id] == study.info.run_id]
    assert study.info.status == "FINISHED"
    kinds = sorted(r.data.tags[KIND] for r in children)
    assert kinds == ["baseline", "confirm", "confirm", "trial", "trial", "trial"]
    # the frontier's scratch runs are the baseline run's children, with their final losses
    (baseline,) = [r for r in children if r.data.tags[KIND] == "baseline"]
    scratch = [r for r in runs if parent[r.info.run_id] == baseline.info.run_id]
    assert sorted(r.data.params["searched.budget"] for r in scratch) == ["0.5", "1.0"]
    assert {r.info.status for r in [baseline, *scratch]} == {"FINISHED"}
    for run in scratch:
        budget = float(run.data.params["searched.budget"])
        loss = baseline.data.metrics[f"frontier_loss_{budget:g}x"]
        assert run.data.metrics["final_eval_loss"] == pytest.approx(loss)
        assert {"eval_loss_se", "eval_tokens"} <= set(run.data.metrics)
    plots = {a.path for a in client.list_artifacts(baseline.info.run_id, "plots")}
    assert plots == {"plots/frontier_flops.png", "plots/frontier_wall.png"}
    summary = json.loads((tiny_search / "tiny" / "summary.json").read_text())

    for trial in summary["trials"]:
        (run,) = [r for r in children if r.data.tags.get(TRIAL) == trial["trial"]]
        params = run.data.params
        assert params["model.n_layer"] == "4" and params["schedule.depths"] == "1,2,4"
        assert float(params["searched.schedule.alpha"]) == trial["params"]["schedule.alpha"]
        if trial["status"] != "ok":
            assert run.info.status == "FAILED" and "loss is nan" in run.data.tags["apollo.end"]
            continue
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        assert m["speedup"] == pytest.approx(trial["speedup"])
        assert m["final_eval_loss"] == pytest.approx(trial["eval_loss"])
        assert m["total_flops"] == trial["flops"]
        expected_keys = {"saving", "wall_speedup", "eval_loss_se", "paper_reached", "train_loss"}
        assert expected_keys | {"speedup_is_lower_bound", "total_wall_time"} <= set(m)
        rows = metrics_rows(tiny_search / "tiny" / "trials" / trial["trial"])
        assert history(client, run.info.run_id, "eval_loss") == expected(rows, "eval_loss")
        files = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert files == {"plots/loss_vs_flops.png", "plots/depth_histogram.png"}
        # policy "last": the final checkpoint only
        assert checkpoint_names(client, run.info.run_id) == {"step-0000012.pt", "step-0000012.json"}

    best = summary["best"][0]
    assert study.data.tags["apollo.best_trial"] == best["trial"]
    confirms = [r for r in children if r.data.tags[KIND] == "confirm"]
    assert {r.data.tags["apollo.confirm_of"] for r in confirms} == {best["trial"]}
    assert sorted(r.data.params["seed"] for r in confirms) == ["1", "2"]
    assert sorted(r.info.run_name for r in confirms) == [  # named for what they re-run
        f"tiny-{best['trial']}-seed1",
        f"tiny-{best['trial']}-seed2",
    ]
    ci = summary["confirmed"][0]["speedup"]
    assert study.data.metrics["confirmed_speedup"] == pytest.approx(ci["mean"])
    assert study.data.metrics["confirmed_speedup_low"] == pytest.approx(ci["low"])
    assert study.data.metrics["best_speedup"] == pytest.approx(best["speedup"])
    test = summary["confirmed"][0]["test_speedup"]  # chosen on validation, reported on test
    assert study.data.metrics["confirmed_test_speedup"] == pytest.approx(test["mean"])
    assert study.data.metrics["best_test_loss"] == pytest.approx(best["test_loss"])
    artifacts = {a.path for a in client.list_artifacts(study.info.run_id, "summary")}
    assert artifacts == {"summary/summary.json", "summary/summary.txt", "summary/best.yaml"}
    assert [a.path for a in client.list_artifacts(study.info.run_id, "study")] == [
        "study/tiny.yaml"
    ]
    optuna = {Path(a.path).name for a in client.list_artifacts(study.info.run_id, "plots/optuna")}
    assert "optimization_history.png" in optuna
    top = {a.path for a in client.list_artifacts(study.info.run_id)}
    assert "frontier_and_best_trials.png" in top
    # at first sight: the answer as the experiment's and the study run's description, the
    # winner marked (and no other run)
    assert "apollo.end" not in study.data.tags  # the interrupted start's reason, gone once done
    note = study.data.tags["mlflow.note.content"]
    assert note.startswith(f"**{summary['answer']}**") and "confirmed with fresh seeds" in note
    experiment = client.get_experiment(study.info.experiment_id)
    assert experiment.tags["mlflow.note.content"].startswith(summary["answer"])
    winners = [r for r in children if r.data.tags.get("apollo.winner") == "true"]
    assert [r.data.tags[TRIAL] for r in winners] == [best["trial"]]
    assert winners[0].data.tags["mlflow.runColor"]


@pytest.mark.slow
def test_best_model_is_registered_in_hugging_face_format(tiny_search, tmp_path):
    transformers = pytest.importorskip("transformers")
    client, _, _ = search_runs(tiny_search)
    (version,) = client.search_model_versions("name = 'tiny'")
    best = json.loads((tiny_search / "tiny" / "summary.json").read_text())["best"][0]
    assert version.tags["trial"] == best["trial"]
    assert float(version.tags["best_test_speedup"]) == pytest.approx(best["test_speedup"], 1e-3)
    assert "confirmed_test_speedup" in version.tags
    summary = json.loads((tiny_search / "tiny" / "summary.json").read_text())
    assert version.description.startswith(summary["answer"])
    assert client.get_registered_model("tiny").description == version.description
    source = client.get_model_version_download_uri("tiny", version.version)
    local = download_artifacts(artifact_uri=source, dst_path=str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(local)
    ckpt = load_checkpoint(
        tiny_search / "tiny" / "trials" / best["trial"] / "step-0000012" / "checkpoint.pt"
    )
    from apollo_ray.config import ModelConfig
    from apollo_ray.method.model import TransformerLM

    ours = TransformerLM(ModelConfig.model_validate(ckpt["model_config"]), ckpt["n_physical"])
    ours.load_state_dict(ckpt["model"])
    ids = torch.randint(0, hf.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected_logits, _ = ours.eval()(ids, None, plan=ckpt["plan"])
        assert torch.allclose(hf.eval()(ids).logits, expected_logits, atol=1e-5)
