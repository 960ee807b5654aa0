"""Object storage over the real S3 protocol: a local S3 server (moto's, on 127.0.0.1) that
pyarrow talks to as it would to AWS. Prepared shards are read from it, and a Ray Train run's
checkpoint storage there is found, resumed from and pruned. The `s3` fixture is in conftest.py;
tests/launch/test_multinode.py runs a whole search with its checkpoints and data there."""

import json

import numpy as np
import pyarrow.fs
import torch
from conftest import upload

from apollo_ray.config import DataConfig
from apollo_ray.data.batches import Batches
from apollo_ray.launch.distributed import RayStore
from apollo_ray.storage import join_uri
from apollo_ray.training.checkpoints import CHECKPOINT_FILE, CHECKPOINT_FORMAT


def test_shards_read_from_s3_give_the_same_batches(s3, gpt_data):
    fs, _ = pyarrow.fs.FileSystem.from_uri(s3)
    uri = upload(gpt_data, s3, "gpt")
    local = Batches(DataConfig(path=str(gpt_data), seq_len=32), "gpt", "train", seed=1)
    remote = Batches(DataConfig(path=uri, seq_len=32), "gpt", "train", seed=1)
    for step in (0, 7):
        a = local.batch(step, 0, micro_batch=4, rank=1, world_size=2)
        b = remote.batch(step, 0, micro_batch=4, rank=1, world_size=2)
        assert torch.equal(a["input_ids"], b["input_ids"])
    with fs.open_input_stream(remote.tokenizer_path.split("?")[0].removeprefix("s3://")) as f:
        assert f.read() == (gpt_data / local.manifest.tokenizer).read_bytes()


def test_checkpoint_storage_on_s3(s3):
    storage = join_uri(s3, "runs", "trial")
    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    store = RayStore(storage, keep=1, rank=0)
    assert store.latest() is None  # nothing stored yet
    for name, step in [("step-0000004", 4), ("step-0000006.pre-growth", 6), ("step-0000008", 8)]:
        ckpt = {"format": CHECKPOINT_FORMAT, "state": {"step": step}, "w": torch.ones(2) * step}
        with fs.open_output_stream(f"{root}/{name}/{CHECKPOINT_FILE}") as f:
            torch.save(ckpt, f)
    with fs.open_output_stream(f"{root}/step-0000010/{CHECKPOINT_FILE}") as f:
        f.write(b"cut short by a lost node")
    latest = store.latest()  # the newest that loads (step 10's file is broken)
    assert latest["state"]["step"] == 8 and np.allclose(latest["w"].numpy(), 8)
    assert store.location("step-0000008").startswith(f"{s3.split('?')[0]}/runs/trial/step-0000008/")
    store._prune()  # keep 1 periodic checkpoint, every stage-boundary one
    left = {i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(root))}
    assert left == {"step-0000010", "step-0000006.pre-growth"}


def test_a_checkpoint_naming_a_tokenizer_in_s3_exports_with_it(s3, gpt_data, tmp_path):
    # a cluster's checkpoints name the tokenizer where the data was: in the bucket
    from apollo_ray.config import ModelConfig
    from apollo_ray.method.model import TransformerLM
    from apollo_ray.training.export import export_checkpoint

    uri = upload(gpt_data, s3, "export")
    tokenizer = Batches(DataConfig(path=uri, seq_len=32), "gpt", "train", seed=1).tokenizer_path
    cfg = ModelConfig(kind="gpt", vocab_size=2000, n_layer=2, d_model=32, n_head=2, max_seq_len=32)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": TransformerLM(cfg, 2).state_dict(),
            "model_config": cfg.model_dump(),
            "tokenizer_json": tokenizer,
        },
        ckpt,
    )
    out = export_checkpoint(ckpt, tmp_path / "hf")
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
