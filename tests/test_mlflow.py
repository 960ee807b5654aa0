"""MLflow records, against real MLflow stores and servers: rank 0's mirror (rows, stage-wise
checkpoints, an unreachable server), closing runs left RUNNING, then what a real small search
left in MLflow (nesting, metrics, artifacts, the registered model), the report command and the
MLflow UI in headless Chromium."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from apollo_ray import report
from apollo_ray.config import RunConfig
from apollo_ray.study import load_study
from apollo_ray.tracking import (
    KIND,
    TRIAL,
    LocalServer,
    RunMirror,
    Target,
    close_leftovers,
    free_port,
    local_store,
    pending_rows,
    start_run,
    sync,
)
from apollo_ray.trainer import Trainer, load_checkpoint

SCREENSHOTS = Path(
    os.environ.get("APOLLO_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")
)


def apollo_cfg(data, out) -> RunConfig:
    """12 steps in 3 stages (N = 1, 2, 4): growths at steps 3 and 6."""
    return RunConfig.model_validate(
        {
            "name": "mirrored",
            "out_dir": str(out),
            "seed": 1,
            "model": {"kind": "gpt", "n_layer": 4, "d_model": 32, "n_head": 2, "max_seq_len": 32},
            "data": {"path": str(data), "seq_len": 32},
            "train": {
                "steps": 12,
                "micro_batch": 4,
                "eval_every": 4,
                "eval_batches": 2,
                "checkpoint_every": 6,
                "log_every": 1,
            },
            "schedule": {"depths": [1, 2, 4], "stage_ends": [0.25, 0.5]},
        }
    )


def new_run(uri: str, artifacts: str | None = None) -> tuple[MlflowClient, str]:
    client = MlflowClient(uri)
    exp = client.create_experiment("mirror", artifact_location=artifacts)
    return client, client.create_run(exp).info.run_id


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def expected(rows: list[dict], key: str, column: str | None = None) -> list[tuple[int, float]]:
    column = column or key
    return sorted((r["step"], r[column]) for r in rows if column in r)


def checkpoint_names(client: MlflowClient, run_id: str) -> set[str]:
    return {Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints")}


def test_mirror_logs_every_row_and_the_stage_checkpoints(tmp_path, gpt_data):
    client, run_id = new_run(*local_store(tmp_path / "store"))  # not ./mlruns in the repo
    cfg = apollo_cfg(gpt_data, tmp_path / "run")
    target = Target(local_store(tmp_path / "store")[0], run_id, "all")
    Trainer(cfg, progress=False, tracker=RunMirror(target, cfg.output_dir, 12, every_s=0)).fit()

    rows = rows_of(cfg.output_dir)
    assert history(client, run_id, "train_loss") == expected(rows, "train_loss", "loss")
    for key in ("eval_loss", "depth", "n_physical", "stage", "flops", "tokens", "lr"):
        assert history(client, run_id, key) == expected(rows, key), key
    assert len(history(client, run_id, "tokens_per_s")) == 12
    assert pending_rows(cfg.output_dir) == 0
    stages = {f"step-{s:07d}.{t}-growth" for s in (3, 6) for t in ("pre", "post")}
    names = {f"{n}.{ext}" for n in [*stages, "step-0000012"] for ext in ("pt", "json")}
    assert checkpoint_names(client, run_id) == names  # not the periodic step-0000006
    local = download_artifacts(run_id=run_id, artifact_path="checkpoints", tracking_uri=target.uri)
    post = load_checkpoint(Path(local) / "step-0000006.post-growth.pt")  # weights_only=True
    meta = json.loads((Path(local) / "step-0000006.post-growth.json").read_text())
    assert post["n_physical"] == meta["n_physical"] == 4 and meta["step"] == 6
    assert post["run_config"]["schedule"]["depths"] == [1, 2, 4]  # enough to resume or export


@pytest.mark.parametrize(
    ("policy", "logged"),
    [("all", {"pre", "post", "final"}), ("last", {"final"}), ("none", set())],
)
def test_checkpoint_policy(tmp_path, policy, logged):
    mirror = RunMirror(
        Target(f"sqlite:///{tmp_path / 'unused.db'}", "r", policy), tmp_path, final_step=12
    )
    names = {"pre": "step-0000003.pre-growth", "post": "step-0000003.post-growth"}
    names |= {"final": "step-0000012", "periodic": "step-0000006"}
    assert {k for k, name in names.items() if mirror.wants(name)} == logged


def test_unreachable_server_loses_nothing(tmp_path, gpt_data):
    port, store = free_port(), tmp_path / "store"
    with LocalServer(store, port=port) as server:
        client, run_id = new_run(server.uri)
    # the server is down while the run trains: training goes on, the rows wait on disk
    cfg = apollo_cfg(gpt_data, tmp_path / "run")
    mirror = RunMirror(Target(server.uri, run_id, "all"), cfg.output_dir, 12, every_s=0)
    with pytest.warns(RuntimeWarning, match="training goes on"):
        state = Trainer(cfg, progress=False, tracker=mirror).fit()
    assert state.step == 12
    rows = rows_of(cfg.output_dir)
    assert pending_rows(cfg.output_dir) == len(rows)
    assert len(json.loads((cfg.output_dir / "mlflow.json").read_text())["pending"]) == 5

    with LocalServer(store, port=port):  # back: everything arrives
        assert sync(cfg.output_dir) is True
        assert history(client, run_id, "train_loss") == expected(rows, "train_loss", "loss")
        assert history(client, run_id, "eval_loss") == expected(rows, "eval_loss")
        assert len(checkpoint_names(client, run_id)) == 10
    assert pending_rows(cfg.output_dir) == 0


def test_head_relay_uploads_from_the_head_node(ray_cluster, tmp_path, gpt_data):
    # rank 0 on a GPU node cannot reach the head's 127.0.0.1 server: it mirrors through an
    # actor on the head node (here the only node), over Ray, with the same results
    from ray.util.state import list_actors

    from apollo_ray.distributed import HeadRelay

    port, store = free_port(), tmp_path / "store"
    with LocalServer(store, port=port) as server:
        client, run_id = new_run(server.uri)
        cfg = apollo_cfg(gpt_data, tmp_path / "run")
        target = Target(server.uri, run_id, "all")
        relay = HeadRelay(server.uri, run_id)
        mirror = RunMirror(target, cfg.output_dir, 12, every_s=0, uploader=relay)
        Trainer(cfg, progress=False, tracker=mirror).fit()
        rows = rows_of(cfg.output_dir)
        assert history(client, run_id, "train_loss") == expected(rows, "train_loss", "loss")
        assert len(checkpoint_names(client, run_id)) == 10
        (actor,) = list_actors(filters=[("name", "=", f"apollo-mlflow-{run_id}")])
        assert actor.node_id == ray_cluster.get_runtime_context().get_node_id()
    with (cfg.output_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 13, "loss": 1.0}) + "\n")
    with pytest.warns(RuntimeWarning, match="training goes on"):
        assert mirror.flush() is False  # server down: a failed upload, not a stuck trainer
    assert pending_rows(cfg.output_dir) == 1


def test_runs_left_running_are_closed(tmp_path, gpt_data):
    from apollo_ray.tune import _trial_runs_callback

    uri = local_store(tmp_path)[0]
    client = MlflowClient(uri)
    exp = client.create_experiment("leftovers")
    parent = start_run(client, exp, "study", {KIND: "study"})
    stopped = start_run(client, exp, "t1", {KIND: "trial", TRIAL: "t1"}, parent)
    finished = start_run(client, exp, "t2", {KIND: "trial", TRIAL: "t2"}, parent)
    killed = start_run(client, exp, "t3", {KIND: "trial", TRIAL: "t3"}, parent)
    client.set_terminated(finished, "FINISHED")

    # a trial that ASHA stopped: Tune reports it complete while its run is still RUNNING
    study = load_study(report_study(tmp_path, gpt_data))
    callback = _trial_runs_callback(study, {"uri": uri, "experiment_id": exp, "parent_id": parent})
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="t1"))
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="t2"))
    assert client.get_run(stopped).info.status == "KILLED"
    assert client.get_run(stopped).data.tags["apollo.end"] == "stopped early by the scheduler"
    assert client.get_run(finished).info.status == "FINISHED"

    # the study's end closes whatever is left (a trial killed together with its driver)
    assert close_leftovers(client, exp, parent) == [killed]
    assert client.get_run(killed).info.status == "KILLED"


def report_study(tmp_path, gpt_data) -> Path:
    from conftest import tiny_study

    return tiny_study(tmp_path, gpt_data, "leftovers")


# ---------------------------------------------------------------- a real search, in MLflow


def search_runs(output_dir: Path, experiment: str = "tiny"):
    client = MlflowClient(local_store(output_dir)[0])
    exp = client.get_experiment_by_name(experiment)
    return client, exp, client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_search_is_recorded_in_mlflow(tiny_search):
    client, _, runs = search_runs(tiny_search)
    assert all(r.info.status != "RUNNING" for r in runs)
    (study,) = [r for r in runs if r.data.tags[KIND] == "study"]
    children = [r for r in runs if r is not study]
    assert study.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {study.info.run_id}
    kinds = sorted(r.data.tags[KIND] for r in children)
    assert kinds == ["baseline", "trial", "trial", "trial"]
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
        assert {"saving", "acc_speedup", "total_wall_time", "train_loss", "tokens_per_s"} <= set(m)
        rows = rows_of(tiny_search / "tiny" / "trials" / trial["trial"])
        assert history(client, run.info.run_id, "eval_loss") == expected(rows, "eval_loss")
        files = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert files == {"plots/loss_vs_flops.png", "plots/depth_histogram.png"}
        # policy "last": the final checkpoint only
        assert checkpoint_names(client, run.info.run_id) == {"step-0000012.pt", "step-0000012.json"}

    best = summary["best"][0]
    assert study.data.tags["apollo.best_trial"] == best["trial"]
    assert study.data.metrics["best_speedup"] == pytest.approx(best["speedup"])
    artifacts = {a.path for a in client.list_artifacts(study.info.run_id, "summary")}
    assert artifacts == {"summary/summary.json", "summary/summary.txt", "summary/best.yaml"}
    assert [a.path for a in client.list_artifacts(study.info.run_id, "study")] == [
        "study/tiny.yaml"
    ]
    optuna = {Path(a.path).name for a in client.list_artifacts(study.info.run_id, "plots/optuna")}
    assert "optimization_history.png" in optuna


@pytest.mark.slow
def test_best_model_is_registered_in_hugging_face_format(tiny_search, tmp_path):
    transformers = pytest.importorskip("transformers")
    client, _, _ = search_runs(tiny_search)
    (version,) = client.search_model_versions("name = 'tiny'")
    best = json.loads((tiny_search / "tiny" / "summary.json").read_text())["best"][0]
    assert version.tags["trial"] == best["trial"]
    source = client.get_model_version_download_uri("tiny", version.version)
    local = download_artifacts(artifact_uri=source, dst_path=str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(local)
    ckpt = load_checkpoint(
        tiny_search / "tiny" / "trials" / best["trial"] / "step-0000012" / "checkpoint.pt"
    )
    from apollo_ray.config import ModelConfig
    from apollo_ray.model import TransformerLM

    ours = TransformerLM(ModelConfig.model_validate(ckpt["model_config"]), ckpt["n_physical"])
    ours.load_state_dict(ckpt["model"])
    ids = torch.randint(0, hf.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected_logits, _ = ours.eval()(ids, None, plan=ckpt["plan"])
        assert torch.allclose(hf.eval()(ids).logits, expected_logits, atol=1e-5)


@pytest.mark.slow
def test_report_table_and_plot(tiny_search, capsys):
    out = tiny_search / "tiny" / "report" / "loss_vs_flops.png"
    assert report.main(["tiny", "--output-dir", str(tiny_search), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in rows][:2] == ["baseline", "trial"]
    assert [r["status"] for r in rows[1:]] == ["FINISHED", "FAILED", "FAILED"]
    best = json.loads((tiny_search / "tiny" / "summary.json").read_text())["best"][0]
    assert rows[1]["run"].endswith(best["trial"]) and out.stat().st_size > 10_000
    assert report.main(["missing", "--output-dir", str(tiny_search)]) == 2
    assert "no MLflow experiment 'missing'" in capsys.readouterr().err


@pytest.mark.slow
def test_mlflow_ui_shows_the_trials(tiny_search):
    """The MLflow UI on loopback over the search's store, in headless Chromium."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium and chromium-driver (see .ci/run)")
        pytest.skip("needs Debian's chromium and chromium-driver (see README, Tests)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, exp, runs = search_runs(tiny_search)
    trials = sorted(r.info.run_name for r in runs if r.data.tags[KIND] == "trial")
    ok = next(r for r in runs if r.data.tags[KIND] == "trial" and r.info.status == "FINISHED")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1600,1000",
    ):
        options.add_argument(flag)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with LocalServer(tiny_search) as server:
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
        wait = WebDriverWait(driver, 90)
        text = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
        try:
            page = f"{server.uri}/#/experiments/{exp.experiment_id}"
            driver.get(f"{page}/runs?workflowType=machine_learning")
            expand = "button[data-component-id$='runnamecellrenderer.tsx_46']"  # the study row's +
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, expand))
            for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
                close.click()  # the assistant side panel
            driver.find_element(By.CSS_SELECTOR, expand).click()
            names = "[col-id='attributes.`Run Name`'][role=gridcell] a"
            shown = lambda: {a.text for a in driver.find_elements(By.CSS_SELECTOR, names)}  # noqa: E731
            wait.until(lambda d: {"tiny", "baseline", *trials} <= shown())
            driver.save_screenshot(str(SCREENSHOTS / "mlflow-runs.png"))

            chart_view = driver.find_element(By.CSS_SELECTOR, "input[value=CHART]")
            driver.execute_script("arguments[0].click()", chart_view)
            search = "input[placeholder='Search metric charts']"
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, search))
            driver.find_element(By.CSS_SELECTOR, search).send_keys("eval_loss")
            wait.until(lambda d: f"{ok.info.run_name} (eval_loss)" in text() and "Step" in text())
            driver.save_screenshot(str(SCREENSHOTS / "mlflow-eval-loss-charts.png"))

            driver.get(f"{page}/runs/{ok.info.run_id}?workflowType=machine_learning")
            wait.until(lambda d: "final_eval_loss" in text() and "speedup" in text())
            driver.save_screenshot(str(SCREENSHOTS / "mlflow-trial.png"))
        finally:
            driver.quit()


def test_unreachable_tracking_server_at_study_start_is_a_clear_error(tmp_path, gpt_data, capsys):
    from conftest import tiny_study

    from apollo_ray.tune import main

    path = tiny_study(tmp_path, gpt_data, "nowhere")
    study = yaml.safe_load(path.read_text())
    study["tracking"] = {"mlflow_uri": f"http://127.0.0.1:{free_port()}"}
    path.write_text(yaml.safe_dump(study))
    assert main([str(path)]) == 2
    assert "tracking.mlflow_uri: MLflow at http://127.0.0.1:" in capsys.readouterr().err
