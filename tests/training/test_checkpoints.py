"""Checkpoints without training: the name grammar, the local store's retention and atomic
writes, what `load` accepts, and the refusal to resume another run's checkpoints."""

import random
import re

import pytest
import torch
from conftest import tiny_run

from apollo_ray.config import ConfigError
from apollo_ray.training.checkpoints import (
    CHECKPOINT_FORMAT,
    LocalStore,
    check_same_run,
    checkpoint_name,
    is_checkpoint,
    is_growth,
    is_periodic,
    latest_local,
    load,
    name_order,
)

PERIODIC = "step-0000150"
PRE, POST = "step-0000150.pre-growth", "step-0000150.post-growth"
NOT_NAMES = ["step-150", "step-00001500", "step-0000150.growth", "checkpoint.pt", "step-1.tmp"]


def test_checkpoint_names():
    assert checkpoint_name(150) == PERIODIC
    assert checkpoint_name(150, "pre-growth") == PRE
    assert checkpoint_name(150, "post-growth") == POST
    assert checkpoint_name(0) == "step-0000000"
    with pytest.raises(ValueError, match=r"checkpoint tag must be one of .*'growth'"):
        checkpoint_name(150, "growth")


@pytest.mark.parametrize("suffix", ["", ".pt"])
def test_periodic_and_growth_names(suffix):
    assert is_periodic(PERIODIC + suffix) and not is_growth(PERIODIC + suffix)
    for name in (PRE, POST):
        assert is_growth(name + suffix) and not is_periodic(name + suffix)
        assert is_checkpoint(name + suffix)
    for name in NOT_NAMES:
        assert not (is_periodic(name) or is_growth(name) or is_checkpoint(name)), name


@pytest.mark.parametrize("suffix", ["", ".pt"])
def test_name_order_is_by_step_then_periodic_branch_pre_post(suffix):
    names = [
        checkpoint_name(step, tag) + suffix
        for step in (3, 6, 12, 100)
        for tag in ("", "branch", "pre-growth", "post-growth")
    ]
    shuffled = names.copy()
    random.Random(0).shuffle(shuffled)
    assert sorted(shuffled, key=name_order) == names
    assert name_order(POST + suffix) == (150, 3)
    assert is_checkpoint("step-0000150.branch") and not is_growth("step-0000150.branch")
    with pytest.raises(ValueError, match=r"not a checkpoint name: 'checkpoint\.pt'"):
        name_order("checkpoint.pt")


def fake_checkpoint(step: int) -> dict:
    return {"format": CHECKPOINT_FORMAT, "state": {"step": step}, "weights": torch.ones(2) * step}


def test_local_store_keeps_the_newest_periodic_and_every_growth_checkpoint(tmp_path):
    store = LocalStore(tmp_path, keep=2)
    assert store.latest() is None
    for step in range(1, 7):
        if step in (2, 4):
            for tag in ("pre-growth", "post-growth"):
                store.report({"step": step}, fake_checkpoint(step), checkpoint_name(step, tag))
        store.report({"step": step}, fake_checkpoint(step), checkpoint_name(step))
    store.report({"step": 7, "eval_loss": 1.0})  # metrics only: nothing written
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == [
        "step-0000002.post-growth.pt",
        "step-0000002.pre-growth.pt",
        "step-0000004.post-growth.pt",
        "step-0000004.pre-growth.pt",
        "step-0000005.pt",
        "step-0000006.pt",
    ]
    assert store.location("step-0000006") == str(tmp_path / "checkpoints" / "step-0000006.pt")
    assert latest_local(tmp_path).name == "step-0000006.pt"
    assert store.latest()["state"]["step"] == 6
    # at one step, the post-growth checkpoint is the newest
    store.report({"step": 6}, fake_checkpoint(66), checkpoint_name(6, "post-growth"))
    assert latest_local(tmp_path).name == "step-0000006.post-growth.pt"
    assert store.latest()["state"]["step"] == 66


def test_local_store_writes_atomically(tmp_path, monkeypatch):
    store = LocalStore(tmp_path, keep=2)
    store.report({}, fake_checkpoint(4), "step-0000004")
    save = torch.save

    def dies_half_way(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        store.report({}, fake_checkpoint(8), "step-0000008")
    with pytest.raises(OSError, match="disk full"):  # an existing name is not clobbered either
        store.report({}, fake_checkpoint(44), "step-0000004")
    monkeypatch.setattr(torch, "save", save)
    assert not (tmp_path / "checkpoints" / "step-0000008.pt").exists()
    assert store.latest()["state"]["step"] == 4  # the last whole checkpoint, untouched
    assert [p.name for p in (tmp_path / "checkpoints").glob("*.pt")] == ["step-0000004.pt"]


def test_load_rejects_what_is_not_an_apollo_checkpoint(tmp_path):
    for i, obj in enumerate([{"model": {}}, {"format": CHECKPOINT_FORMAT + 1}, torch.zeros(3)]):
        path = tmp_path / f"other-{i}.pt"
        torch.save(obj, path)
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}: not an apollo_ray"):
            load(path)
    with (
        (tmp_path / "other-0.pt").open("rb") as f,  # an open file, named by the caller
        pytest.raises(ValueError, match="s3://b/x: not an apollo_ray checkpoint"),
    ):
        load(f, name="s3://b/x")
    torch.save(fake_checkpoint(3), tmp_path / "ok.pt")
    assert load(tmp_path / "ok.pt")["state"] == {"step": 3}


def test_check_same_run_names_the_changed_sections(tmp_path):
    cfg = tiny_run("data", tmp_path / "a")
    saved = cfg.model_dump(mode="json")
    check_same_run(saved, cfg, tmp_path)
    moved = tiny_run("data", tmp_path / "b", name="renamed")  # name and out_dir aside
    check_same_run(saved, moved, tmp_path)
    changed = tiny_run("data", tmp_path / "a", seed=1, train={"lr": 1e-2}, schedule=None)
    with pytest.raises(ConfigError, match=r"different schedule, seed, train; resuming would mix"):
        check_same_run(saved, changed, tmp_path)
    # a trunk resumed with other branch steps, a branch resumed from its own checkpoint
    branched = tiny_run("data", tmp_path / "a", train={"branch_steps": [4], "fork_from": "x.pt"})
    check_same_run(saved, branched, tmp_path)
