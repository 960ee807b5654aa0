"""Data parallelism without Ray: two gloo ranks in two processes against one process.

Ranks must agree on every micro-batch's plan without communicating, and the same global batch
split over 2 workers must train like 1 worker accumulating 2 micro-batches.
"""

import gc
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY, metrics_rows, tiny_run

from apollo_ray.config import RunConfig
from apollo_ray.training.trainer import Trainer

pytestmark = pytest.mark.slow  # processes of their own


def run_config(data, out, kind, schedule=None, **train) -> RunConfig:
    """The tiny run at 8 steps without dropout, from scratch unless given a `schedule`."""
    return tiny_run(
        data,
        out,
        kind,
        name="dp",
        seed=5,
        train={"steps": 8, "eval_batches": 4, "checkpoint_every": 4, **train},
        schedule=schedule,
    )


def _rank(rank: int, world: int, port: int, cfg_json: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    _fit_recording_plans(rank, world, cfg_json, out)
    # The DDP reducer holds the gloo group; it is gone (with the trainer) before the teardown,
    # which both ranks reach together. Exiting without interpreter finalisation then avoids
    # gloo's known SIGABRT when its threads outlive the interpreter.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _fit_recording_plans(rank: int, world: int, cfg_json: str, out: str) -> None:
    trainer = Trainer(
        RunConfig.model_validate_json(cfg_json), "cpu", progress=False, rank=rank, world_size=world
    )
    plans, step = [], trainer.schedule.step

    def recording(s: int, micro: int):
        where = step(s, micro)
        plans.append((s, micro, where.plan))
        return where

    trainer.schedule.step = recording
    trainer.fit()
    with open(f"{out}/plans-{rank}.json", "w") as f:
        json.dump(plans, f)


def two_ranks(cfg: RunConfig, out) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _rank, args=(2, port, cfg.model_dump_json(), str(out)), nprocs=2, start_method="spawn"
    )


def test_ranks_agree_on_every_plan(bert_data, tmp_path):
    cfg = run_config(bert_data, tmp_path, "bert", TINY["schedule"], grad_accum=2)
    two_ranks(cfg, tmp_path)
    plans = [json.loads((tmp_path / f"plans-{r}.json").read_text()) for r in (0, 1)]
    assert plans[0] == plans[1] and len(plans[0]) == 16
    assert len({tuple(p) for _, _, p in plans[0]}) > 2  # sampled depths and growth happened


def test_two_workers_train_like_one_with_accumulation(gpt_data, tmp_path):
    # global batch 8 = 1 worker x 4 x accum 2 = 2 workers x 4 x accum 1
    one = Trainer(run_config(gpt_data, tmp_path / "one", "gpt", grad_accum=2), progress=False)
    one.fit()
    two_ranks(run_config(gpt_data, tmp_path / "two", "gpt"), tmp_path)
    a, b = metrics_rows(tmp_path / "one"), metrics_rows(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "eval_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
        assert (x["tokens"], x["flops"]) == (y["tokens"], y["flops"])
