"""Fault injection: a training process really dies by SIGKILL at the chosen point, once (the
marker file), and the run it leaves resumes from its last checkpoint to exactly the rows of an
uninterrupted run. The kills happen in a child process; the resumes in this one."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import metrics_rows, timeless, tiny_run

from apollo_ray.training.faults import FAULT_MARKER, FaultInjection
from apollo_ray.training.trainer import Trainer

# The tiny run with dropout (a resume must restore its RNG): growths at steps 3 and 6,
# periodic checkpoints every 4 steps (and the final one at 12).
TRAIN = {"checkpoint_every": 4}
DROPOUT = {"dropout": 0.1}

CHILD = """
import json, sys
from apollo_ray.config import RunConfig
from apollo_ray.training.faults import FaultInjection
from apollo_ray.training.trainer import Trainer

cfg = RunConfig.model_validate_json(sys.argv[1])
faults = FaultInjection(cfg.output_dir, **json.loads(sys.argv[2]))
Trainer(cfg, "cpu", progress=False, faults=faults).fit()
"""


def run_config(data, out):
    return tiny_run(data, out, seed=2, model=DROPOUT, train=TRAIN)


def kills(monkeypatch) -> list:
    """Replace the SIGKILL by a record of it (this process must live)."""
    calls = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: calls.append((pid, sig)))
    return calls


def test_kills_once_at_the_step(tmp_path, monkeypatch):
    calls = kills(monkeypatch)
    faults = FaultInjection(tmp_path / "run", kill_at_step=3)
    faults.step_done(2)
    faults.checkpoint_saved(3)
    assert calls == [] and not (tmp_path / "run" / FAULT_MARKER).exists()
    faults.step_done(3)
    assert calls == [(os.getpid(), signal.SIGKILL)]
    marker = (tmp_path / "run" / FAULT_MARKER).read_text()
    assert marker == f"killed pid {os.getpid()} after step 3\n"
    FaultInjection(tmp_path / "run", kill_at_step=3).step_done(3)  # the restarted process
    assert len(calls) == 1


def test_kills_once_after_the_checkpoint(tmp_path, monkeypatch):
    calls = kills(monkeypatch)
    faults = FaultInjection(tmp_path, kill_after_checkpoint=6)
    faults.step_done(6)
    faults.checkpoint_saved(4)
    assert calls == []
    faults.checkpoint_saved(6)
    faults.checkpoint_saved(6)
    assert calls == [(os.getpid(), signal.SIGKILL)]
    assert "after the checkpoint of step 6" in (tmp_path / FAULT_MARKER).read_text()
    FaultInjection(tmp_path).step_done(0)  # no fault asked for: never kills
    assert len(calls) == 1


@pytest.fixture(scope="module")
def uninterrupted(gpt_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "straight"
    Trainer(run_config(gpt_data, out), "cpu", progress=False).fit()
    return timeless(out)


def killed_child(cfg, **fault) -> subprocess.CompletedProcess:
    args = [sys.executable, "-c", CHILD, cfg.model_dump_json(), json.dumps(fault)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def resume(cfg, monkeypatch, **fault) -> int:
    """The restarted run, in this process, with the same fault asked for (the marker keeps it
    alive); returns the step it resumed from."""
    calls = kills(monkeypatch)
    trainer = Trainer(cfg, "cpu", progress=False, faults=FaultInjection(cfg.output_dir, **fault))
    start = trainer.state.step
    trainer.fit()
    assert calls == [], "killed twice"
    return start


@pytest.mark.slow
def test_killed_at_step_resumes_like_the_uninterrupted_run(
    uninterrupted, gpt_data, tmp_path, monkeypatch
):
    cfg = run_config(gpt_data, tmp_path / "run")
    child = killed_child(cfg, kill_at_step=5)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert "after step 5" in (tmp_path / "run" / FAULT_MARKER).read_text()
    # killed right after optimizer step 5, before its row was written; the last checkpoint
    # is the periodic one of step 4
    rows = metrics_rows(tmp_path / "run")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert rows[-1]["step"] == 4 and "eval_loss" in rows[-1]
    assert (tmp_path / "run" / "checkpoints" / "step-0000004.pt").exists()

    assert resume(cfg, monkeypatch, kill_at_step=5) == 4
    assert timeless(tmp_path / "run") == uninterrupted
    resumes = (tmp_path / "run" / "resumes.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in resumes] == [4]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "last_checkpoint"),
    [(8, "step-0000008.pt"), (3, "step-0000003.pre-growth.pt")],  # a periodic one; a growth's
)
def test_killed_after_a_checkpoint_resumes_from_it(
    uninterrupted, gpt_data, tmp_path, monkeypatch, step, last_checkpoint
):
    cfg = run_config(gpt_data, tmp_path / "run")
    child = killed_child(cfg, kill_after_checkpoint=step)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    marker = (tmp_path / "run" / FAULT_MARKER).read_text()
    assert f"after the checkpoint of step {step}" in marker
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert saved[-1] == last_checkpoint  # the kill came before anything later was saved
    assert [r["step"] for r in metrics_rows(tmp_path / "run") if "loss" in r][-1] == step

    assert resume(cfg, monkeypatch, kill_after_checkpoint=step) == step
    assert timeless(tmp_path / "run") == uninterrupted
