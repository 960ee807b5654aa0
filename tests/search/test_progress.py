"""The study driver's trial lines (`apollo_ray.search.progress`), without Ray: the callback is fed
stand-ins of Tune's trials (the attributes of `ray.tune.experiment.Trial` it reads) and the rows
the trainer reports, on a fake clock; on a terminal the lines are redrawn in place, elsewhere a
trial prints one line as it starts and one as it ends."""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from apollo_ray.search.progress import TrialProgress, calm_driver, duration, last_error_line

TRACEBACK = """Failure # 1 (occurred at 2026-12-02_03-42-04)
ray::ImplicitFunc.train() (pid=3052, ip=192.0.2.2)
  File "/work/main/apollo_ray/launch/distributed.py", line 196, in check_finished
    raise NonFiniteLossError(marker.read_text().strip())
apollo_ray.training.runlog.NonFiniteLossError: loss is nan (gradient norm nan) at step 1
"""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class StandIn(SimpleNamespace):
    """A stand-in for `ray.tune.experiment.Trial`: its id, config, storage folder (`path`),
    driver-side folder (`local_path`, where `error_file` lies), last result, and its name as
    `str` gives it."""

    def __str__(self) -> str:
        return self.name


def trial(tmp_path: Path, name: str, error: str | None = None, **config) -> StandIn:
    path, local = tmp_path / "storage" / name, tmp_path / "staging" / name
    local.mkdir(parents=True)
    error_file = None
    if error is not None:
        error_file = str(local / "error.txt")
        Path(error_file).write_text(error)
    return StandIn(
        name=name,
        trial_id=f"id-{name}",
        config=config,
        path=str(path),
        local_path=str(local),
        error_file=error_file,
        last_result={},
    )


def row(step: int, **more) -> dict:
    """A report of the trainer at `step` (stage 1 of 3, 2 physical layers)."""
    base = {"step": step, "loss": 6.25, "stage": 1, "n_physical": 2, "tokens_per_s": 12345.0}
    return base | more


SCORES = {"eval_loss": 5.4321, "speedup": 1.234, "bound": None, "flops": 1e12}


def progress(tmp_path: Path, live: bool, **kw) -> tuple[TrialProgress, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    callback = TrialProgress(
        150,
        stages=3,
        storage=str(tmp_path / "outputs" / "tune" / "study" / "search"),
        run_root=str(tmp_path / "outputs" / "study" / "trials"),
        live=live,
        stream=out,
        clock=clock,
        **kw,
    )
    return callback, out, clock


def test_the_stand_in_has_the_attributes_of_a_real_trial():
    from ray.tune.experiment import Trial

    for name in ("trial_id", "config", "path", "local_path", "error_file", "last_result"):
        assert hasattr(Trial, name) or name in Trial.__init__.__code__.co_names, name
    assert "custom_trial_name" in Trial._trainable_name.__code__.co_names  # what str() gives


def test_without_a_terminal_a_trial_prints_one_line_as_it_starts_and_one_as_it_ends(tmp_path):
    callback, out, clock = progress(tmp_path, live=False)
    t = trial(tmp_path, "cf182f63", **{"schedule.alpha": 0.548813, "train.lr": 0.003})
    callback.on_trial_start(0, [t], t)
    for step in (25, 50, 75, 100, 125, 150):
        clock.now += 10
        callback.on_trial_result(0, [t], t, row(step))
        callback.on_step_end(0, [t])
    callback.on_trial_result(0, [t], t, SCORES)
    callback.on_trial_complete(0, [t], t)
    callback.on_experiment_end([t])
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == [
        "trial cf182f63 started: alpha=0.5488, train.lr=0.003",
        "trial cf182f63 finished in 1m00s: eval loss 5.4321, speedup 1.23",
    ]


def test_a_trial_stopped_by_the_scheduler_says_where(tmp_path):
    callback, out, clock = progress(tmp_path, live=False)
    t = trial(tmp_path, "ab12")
    callback.on_trial_start(0, [t], t)
    clock.now += 30
    callback.on_trial_result(0, [t], t, row(50, eval_loss=6.5))
    callback.on_trial_complete(0, [t], t)
    assert out.getvalue().splitlines()[-1] == (
        "trial ab12 stopped early by the scheduler at step 50/150 in 30s (eval loss 6.5000)"
    )


def test_a_diverged_trial_ends_in_one_line_saying_why(tmp_path):
    callback, out, clock = progress(tmp_path, live=False)
    t = trial(tmp_path, "d1")
    callback.on_trial_start(0, [t], t)
    clock.now += 2
    why = "loss is nan (gradient norm nan) at step 1; the last checkpoint and ... in /runs/d1"
    callback.on_trial_result(0, [t], t, {"diverged": why})  # the trial's last report
    callback.on_trial_complete(0, [t], t)
    assert out.getvalue().splitlines()[-1] == f"trial d1 diverged in 2s: {why}"


def test_a_failed_trial_prints_its_error_and_where_its_logs_are(tmp_path):
    callback, out, clock = progress(tmp_path, live=False)
    t = trial(tmp_path, "e1168725", error=TRACEBACK)
    callback.on_trial_start(0, [t], t)
    clock.now += 3
    callback.on_trial_result(0, [t], t, row(25))
    callback.on_trial_recover(0, [t], t)  # Tune retries it (resources.max_failures)
    callback.on_trial_start(0, [t], t)
    callback.on_trial_recover(0, [t], t)
    callback.on_trial_start(0, [t], t)
    clock.now += 4
    callback.on_trial_error(0, [t], t)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    error = "NonFiniteLossError: loss is nan (gradient norm nan) at step 1"
    outputs = tmp_path / "outputs"
    study = outputs / "study"
    assert lines == [
        "trial e1168725 started",
        f"trial e1168725 failed at step 25: {error}; retrying",
        "trial e1168725 failed again (the same error); retrying",
        f"trial e1168725 failed after 7s: {error}",
        f"  error: {outputs}/tune/study/search/e1168725/error.txt; run folder: "
        f"{study}/trials/e1168725",
    ]


def test_the_error_file_in_storage_serves_when_the_staging_one_is_gone(tmp_path):
    callback, out, _ = progress(tmp_path, live=False)
    t = trial(tmp_path, "x1")
    Path(t.path).mkdir(parents=True)
    (Path(t.path) / "error.txt").write_text("Traceback\nRuntimeError: worker died\n")
    callback.on_trial_error(0, [t], t)
    assert out.getvalue().splitlines()[0] == "trial x1 failed: RuntimeError: worker died"


def test_on_a_terminal_the_running_trials_are_redrawn_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    callback, out, clock = progress(tmp_path, live=True)
    a, b = trial(tmp_path, "aaaa"), trial(tmp_path, "bbbb", **{"schedule.depths": [1, 2, 4, 6]})
    callback.on_trial_start(0, [a], a)
    assert out.getvalue() == "\x1b[Jtrial aaaa: starting (0s)\n"
    callback.on_trial_start(0, [a, b], b)
    clock.now += 10
    callback.on_trial_result(0, [a, b], a, row(10))
    clock.now += 10
    out.truncate(0), out.seek(0)
    callback.on_trial_result(0, [a, b], a, row(30))  # 2 steps/s since step 10: 120 steps left
    callback.on_trial_result(0, [a, b], b, row(5, stage=0, n_physical=1))  # 4 s a step
    redraw = out.getvalue().split("\x1b[2F")[-1]  # up over the two live lines, then again
    assert redraw == (
        "\x1b[J"
        "trial aaaa: step 30/150 stage 2/3 depth 2 loss 6.250 12.3k tok/s 1m00s left\n"
        "trial bbbb: step 5/150 stage 1/4 depth 1 loss 6.250 12.3k tok/s 9m40s left\n"
    )
    out.truncate(0), out.seek(0)
    callback.on_trial_result(0, [a, b], a, SCORES)
    callback.on_trial_complete(0, [a, b], a)  # said for good above the live line left
    assert out.getvalue().endswith(
        "\x1b[2F\x1b[J"
        "trial aaaa finished in 20s: eval loss 5.4321, speedup 1.23\n"
        "trial bbbb: step 5/150 stage 1/4 depth 1 loss 6.250 12.3k tok/s 9m40s left\n"
    )
    clock.now += 0.5
    out.truncate(0), out.seek(0)
    callback.on_step_end(0, [b])  # less than a second since the last redraw
    assert out.getvalue() == ""
    clock.now += 1
    callback.on_step_end(0, [b])  # the time left moves on: down, while the step runs
    assert out.getvalue().startswith("\x1b[1F\x1b[J") and "\r" not in out.getvalue()
    assert out.getvalue().endswith("12.3k tok/s 9m38s left\n")


def test_the_live_line_shows_the_mean_rate_of_the_last_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    callback, out, clock = progress(tmp_path, live=True)
    t = trial(tmp_path, "aaaa")
    callback.on_trial_start(0, [t], t)
    for step, rate in enumerate([90_000.0, 10_000.0, 20_000.0, 30_000.0, 40_000.0, 50_000.0]):
        clock.now += 10
        callback.on_trial_result(0, [t], t, row(10 * (step + 1), tokens_per_s=rate))
    assert out.getvalue().endswith("30.0k tok/s 1m30s left\n")  # 90k has left the window


def test_a_live_line_fits_the_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    callback, out, _ = progress(tmp_path, live=True)
    t = trial(tmp_path, "aaaa")
    callback.on_trial_start(0, [t], t)
    callback.on_trial_result(0, [t], t, row(30))
    assert all(len(line) <= 39 for line in out.getvalue().split("\x1b[J")[-1].splitlines())


def test_a_re_run_is_named_for_the_trial_and_seed_it_repeats(tmp_path):
    runs = [{"trial": "trial3", "seed": 1, "params": {"train.steps": 300}}]
    callback, out, _ = progress(tmp_path, live=False, kind="re-run", runs=runs)
    t = trial(tmp_path, "trial3-seed1", run=0)
    callback.on_trial_start(0, [t], t)
    callback.on_trial_result(0, [t], t, row(100, eval_loss=6.0))
    callback.on_trial_complete(0, [t], t)
    assert out.getvalue().splitlines() == [
        "re-run trial3-seed1 started",
        "re-run trial3-seed1 stopped early by the scheduler at step 100/300 in 0s "
        "(eval loss 6.0000)",
    ]


def test_the_callback_pickles_without_its_stream_or_trials(tmp_path):
    # Tune pickles its callbacks with the search (tuner.pkl); a resumed study unpickles them
    callback, _, _ = progress(tmp_path, live=None)
    t = trial(tmp_path, "aaaa")
    callback.on_trial_start(0, [t], t)
    again = pickle.loads(pickle.dumps(callback))
    assert again.running == {} and again.stream is None and again.steps == 150
    assert again.want_live is None and again.live is False  # stdout under pytest: no terminal


def test_small_helpers():
    assert [duration(s) for s in (0.4, 59, 61, 3600 + 120)] == ["0s", "59s", "1m01s", "1h02m"]
    assert last_error_line(TRACEBACK).startswith("NonFiniteLossError: loss is nan")
    assert last_error_line("\n\n") == "unknown error"
    assert last_error_line("ray.exceptions.RayTaskError(ValueError): x") == (
        "RayTaskError(ValueError): x"
    )


@pytest.fixture
def restore_logging(monkeypatch):
    for name in (
        "RAY_AIR_NEW_OUTPUT",
        "TUNE_PRINT_ALL_TRIAL_ERRORS",
        "HF_HUB_DISABLE_PROGRESS_BARS",
    ):
        monkeypatch.delenv(name, raising=False)
    names = ("ray", "ray.tune", "ray.train", "mlflow", "ray.tune.tune")
    names += ("ray.tune.execution.tune_controller",)
    levels = {n: logging.getLogger(n).level for n in names}
    filters = {n: list(logging.getLogger(n).filters) for n in names}
    import optuna

    verbosity = optuna.logging.get_verbosity()
    yield
    optuna.logging.set_verbosity(verbosity)
    for n in names:
        logging.getLogger(n).setLevel(levels[n])
        logging.getLogger(n).filters[:] = filters[n]


def test_calm_driver_quiets_ray_unless_verbose(restore_logging):
    assert calm_driver(verbose=True) == {}
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # the output engine that verbose=0 silences
    assert "TUNE_PRINT_ALL_TRIAL_ERRORS" not in os.environ
    assert calm_driver() == {"logging_level": logging.WARNING, "log_to_driver": False}
    assert os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] == "0"
    assert logging.getLogger("ray.train").getEffectiveLevel() == logging.WARNING
    tune_log = logging.getLogger("ray.tune.tune")
    dropped = tune_log.makeRecord(
        "ray.tune.tune", logging.ERROR, "f", 1, "Trials did not complete: %s", ([],), None
    )
    kept = tune_log.makeRecord("ray.tune.tune", logging.ERROR, "f", 1, "other", (), None)
    assert not tune_log.filter(dropped) and tune_log.filter(kept)


def test_a_start_line_leaves_out_the_samplers_coordinates_and_wraps_at_100_columns(tmp_path):
    callback, out, _ = progress(tmp_path, live=False)
    config = {
        "schedule.depths": [1, 2, 4],
        "schedule.stage_ends.1of2": 0.2646,  # how the sampler draws stage_ends: not shown
        "schedule.stage_ends": [0.1212345, 0.5032],
        **{f"schedule.knob_{i}": 0.123456 for i in range(8)},
    }
    t = trial(tmp_path, "e5", **config)
    callback.on_trial_start(0, [t], t)
    lines = out.getvalue().splitlines()
    assert len(lines) > 1 and all(len(line) <= 100 for line in lines)
    assert lines[0].startswith("trial e5 started: depths=[1, 2, 4], stage_ends=[0.1212, 0.5032], ")
    assert "1of2" not in out.getvalue() and lines[1].startswith("    knob_")
