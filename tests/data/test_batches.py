"""Batches: packed windows, determinism across worker layouts, MLM masking, GPT label shift;
the data pre-flight of a run (`check_data`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_dict

from apollo_ray.config import DataConfig
from apollo_ray.data import DataError, check_data, load_manifest, open_split
from apollo_ray.data.batches import IGNORE_INDEX, Batches
from apollo_ray.train import main as train_main


def make(data: Path, kind: str, split: str = "train", seq_len: int = 32, **kw: float) -> Batches:
    return Batches(DataConfig(path=str(data), seq_len=seq_len, **kw), kind, split, seed=0)


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_batches_are_deterministic(kind: str, request: pytest.FixtureRequest) -> None:
    data = request.getfixturevalue(f"{kind}_data")
    batches = make(data, kind)
    assert batches.vocab_size == 2000 and batches.manifest.kind == kind
    assert Path(batches.tokenizer_path) == data / "tokenizer.json"
    a = batches.batch(3, 1, micro_batch=4, grad_accum=2)
    b = make(data, kind).batch(3, 1, micro_batch=4, grad_accum=2)
    assert a["input_ids"].shape == a["labels"].shape == (4, 32)
    assert a["input_ids"].dtype == a["labels"].dtype == torch.int64
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels"))
    c = batches.batch(4, 1, micro_batch=4, grad_accum=2)
    assert not torch.equal(a["input_ids"], c["input_ids"])


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_global_batch_does_not_depend_on_worker_layout(
    kind: str, request: pytest.FixtureRequest
) -> None:
    batches = make(request.getfixturevalue(f"{kind}_data"), kind)

    def global_batch(step: int, world_size: int, grad_accum: int) -> dict[str, torch.Tensor]:
        parts = [
            batches.batch(
                step, m, micro_batch=3, grad_accum=grad_accum, rank=r, world_size=world_size
            )
            for m in range(grad_accum)
            for r in range(world_size)
        ]
        return {k: torch.cat([p[k] for p in parts]) for k in ("input_ids", "labels")}

    for step in (0, 5):
        one_worker, two_workers = global_batch(step, 1, 2), global_batch(step, 2, 1)
        assert all(torch.equal(one_worker[k], two_workers[k]) for k in one_worker)


def test_train_epoch_visits_every_sequence_once(gpt_data: Path) -> None:
    batches = make(gpt_data, "gpt", seq_len=256)
    n = batches.n_sequences
    firsts = [batches.batch(g, 0, micro_batch=1)["input_ids"][0, :8] for g in range(n)]
    assert len({tuple(x.tolist()) for x in firsts}) == n  # a permutation, not a sample
    val = make(gpt_data, "gpt", "val", seq_len=256)
    (stream,) = open_split(gpt_data, "val")  # val is in order: sequence 0 starts the stream
    assert val.batch(0, 0, micro_batch=1)["input_ids"][0].tolist() == stream[:256].tolist()


def test_gpt_labels_are_the_next_tokens(gpt_data: Path) -> None:
    batch = make(gpt_data, "gpt", "val").batch(0, 0, micro_batch=2)
    ids, labels = batch["input_ids"], batch["labels"]
    (stream,) = open_split(gpt_data, "val")
    assert ids[0].tolist() == stream[:32].tolist() and labels[0].tolist() == stream[1:33].tolist()
    assert ids[1].tolist() == stream[32:64].tolist()  # stride seq_len: no token is skipped
    assert torch.equal(ids[:, 1:], labels[:, :-1])


def test_bert_masking_statistics(bert_data: Path) -> None:
    batches = make(bert_data, "bert", seq_len=64)
    special = load_manifest(bert_data).special_ids
    batch = batches.batch(0, 0, micro_batch=256)
    ids, labels = batch["input_ids"], batch["labels"]
    assert (ids[:, 0] == special["cls"]).all()
    selected = labels != IGNORE_INDEX
    assert selected.any(dim=1).all()  # every sample has a target
    # Originals: labels where selected; elsewhere the inputs are untouched.
    original = torch.where(selected, labels, ids)
    is_special = torch.isin(original, torch.tensor(list(special.values())))
    assert not (selected & is_special).any()
    rate = selected.sum() / (~is_special).sum()
    assert 0.13 < rate < 0.17
    as_mask = (ids == special["mask"]) & selected
    kept = (ids == labels) & selected
    random = selected & ~as_mask & ~kept
    shares = [x.sum().item() / selected.sum().item() for x in (as_mask, random, kept)]
    assert shares[0] == pytest.approx(0.8, abs=0.03)
    assert shares[1] == pytest.approx(0.1, abs=0.03)  # a random token may equal the original
    assert shares[2] == pytest.approx(0.1, abs=0.03)
    assert not torch.isin(ids[random], torch.tensor(list(special.values()))).any()
    half = make(bert_data, "bert", seq_len=64, mlm_probability=0.5).batch(0, 0, micro_batch=64)
    assert 0.45 < half["labels"].ne(IGNORE_INDEX).float().mean() < 0.52


def test_bert_masks_do_not_depend_on_worker_layout(bert_data: Path) -> None:
    batches = make(bert_data, "bert")
    whole = batches.batch(1, 0, micro_batch=4)
    half = batches.batch(1, 1, micro_batch=2, grad_accum=2)
    other_rank = batches.batch(1, 0, micro_batch=2, rank=1, world_size=2)
    assert torch.equal(whole["labels"][2:], half["labels"])
    assert torch.equal(whole["labels"][2:], other_rank["labels"])


def test_seq_len_too_long_says_what_fits(gpt_data: Path) -> None:
    val_tokens = load_manifest(gpt_data).splits["val"].tokens
    with pytest.raises(
        DataError, match=rf"has {val_tokens} tokens.*largest seq_len that works is {val_tokens - 1}"
    ):
        make(gpt_data, "gpt", "val", seq_len=val_tokens)
    make(gpt_data, "gpt", "val", seq_len=val_tokens - 1)


def test_check_data_counts_sequences_from_the_manifest(gpt_data: Path, tmp_path: Path) -> None:
    shutil.copytree(gpt_data, tmp_path, dirs_exist_ok=True)
    manifest = json.loads((gpt_data / "manifest.json").read_text())
    val = manifest["splits"]["val"]["tokens"]
    assert check_data(DataConfig(path=str(tmp_path), seq_len=val - 1), "gpt").splits["val"].tokens
    with pytest.raises(
        DataError,
        match=rf"the val split has {val} tokens \(longest shard {val}\) but evaluation needs at "
        rf"least {val + 1} in one shard for one sequence of data.seq_len {val}; the largest "
        rf"seq_len that works is {val - 1}, or prepare more data \(or a larger --val-fraction\)$",
    ):
        check_data(DataConfig(path=str(tmp_path), seq_len=val), "gpt")
    manifest["splits"]["val"] = {"documents": 0, "tokens": 0, "shards": []}  # an older preparation
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DataError,
        match=r"has 0 tokens \(longest shard 0\) but evaluation needs at least 33 in one shard "
        r"for one sequence of data.seq_len 32; prepare more data \(or a larger --val-fraction\)$",
    ):
        check_data(DataConfig(path=str(tmp_path), seq_len=32), "gpt")


def test_train_refuses_too_small_a_val_split_before_training(
    gpt_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    val = load_manifest(gpt_data).splits["val"].tokens
    run = tiny_run_dict(
        {"path": str(gpt_data), "seq_len": val}, tmp_path / "run", model={"max_seq_len": val}
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert train_main([str(tmp_path / "run.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: data.path: {gpt_data}: the val split has {val} tokens")
        and err.count("\n") == 1
    )
    assert f"evaluation needs at least {val + 1}" in err and "--val-fraction" in err
    assert not (tmp_path / "run").exists()  # nothing was built or trained


def test_kind_mismatch(bert_data: Path) -> None:
    with pytest.raises(
        DataError, match="prepared for bert, not gpt; prepare it again with --kind gpt"
    ):
        make(bert_data, "gpt")


def test_bad_batch_arguments(gpt_data: Path) -> None:
    batches = make(gpt_data, "gpt")
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        batches.batch(0, 0, micro_batch=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="0 <= micro < grad_accum"):
        batches.batch(0, 1, micro_batch=2)


def test_uri_and_local_give_the_same_batches(bert_data: Path) -> None:
    local = make(bert_data, "bert").batch(2, 0, micro_batch=4)
    remote = make(bert_data.resolve().as_uri(), "bert").batch(2, 0, micro_batch=4)
    assert all(torch.equal(local[k], remote[k]) for k in local)
