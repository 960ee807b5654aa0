"""`train.compile`: compiled layer calls give the eager losses and a fixed handful of graphs for a
whole Apollo schedule (sampled depths, plans, growths, evaluation).

The graphs run on AOTAutograd (`backend="aot_eager"`), not inductor: what this tests, the graphs
Dynamo captures and their guards (a plan, a depth or a growth must not recompile) and the
forward and backward AOTAutograd traces of them, is ours and the same whichever backend runs the
graphs; inductor's kernels are PyTorch's, and its first use on a cold cache costs 25-40 s of the
suite on our 2-core CI machines (the cache never survives there). Inductor itself runs in
`benchmarks/throughput.py` (compiled against eager: steps, and a whole Apollo run)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import tiny_run
from torch._dynamo.utils import counters

from apollo_ray.training.optim import compile_wanted
from apollo_ray.training.trainer import Trainer

# train and eval (no grad), each for the layer call and the head; one more of each where a
# second input shape (the final evaluation's last, shorter batch) turns a dimension dynamic
GRAPH_BOUND = 8


def test_auto_compiles_on_a_gpu_only():
    assert compile_wanted("auto", torch.device("cuda"))
    assert not compile_wanted("auto", torch.device("cpu"))
    assert compile_wanted(True, torch.device("cpu"))
    assert not compile_wanted(False, torch.device("cuda"))


def _losses(out) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in rows]


@pytest.mark.slow
def test_compiled_schedule_matches_eager_with_a_fixed_number_of_graphs(
    tmp_path, bert_data, monkeypatch
):
    # BERT: dropout, post-LN layers, the MLM head (GPT's blocks take the same route)
    data, kind = bert_data, "bert"
    # four stages (three growths), sampled depths up to 2 x 4 layers, dropout on
    schedule = {"depths": [1, 2, 3, 4], "stage_ends": [0.2, 0.4, 0.6], "tau": 2.0}
    model = {"dropout": 0.1}
    eager = tmp_path / "eager"
    Trainer(tiny_run(data, eager, kind, schedule=schedule, model=model), progress=False).fit()

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = tmp_path / "compiled"
    cfg = tiny_run(data, compiled, kind, schedule=schedule, model=model, train={"compile": True})
    Trainer(cfg, progress=False).fit()  # AOTAutograd draws dropout's masks as eager does
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= GRAPH_BOUND, dict(counters["stats"])

    want, got = _losses(eager), _losses(compiled)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-4, abs=1e-5)
