"""`train.compile`: compiled layer calls give the eager losses and a fixed handful of graphs for a
whole Apollo schedule (sampled depths, plans, growths, evaluation)."""

from __future__ import annotations

import json

import pytest
import torch
import torch._inductor.config
from conftest import tiny_run
from torch._dynamo.utils import counters

from apollo_ray.trainer import Trainer, compile_wanted

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
def test_compiled_schedule_matches_eager_with_a_fixed_number_of_graphs(tmp_path, bert_data):
    # BERT: dropout, post-LN layers, the MLM head (GPT's blocks take the same route)
    data, kind = bert_data, "bert"
    # four stages (three growths), sampled depths up to 2 x 4 layers, dropout on
    schedule = {"depths": [1, 2, 3, 4], "stage_ends": [0.2, 0.4, 0.6], "tau": 2.0}
    model = {"dropout": 0.1}
    eager = tmp_path / "eager"
    Trainer(tiny_run(data, eager, kind, schedule=schedule, model=model), progress=False).fit()

    torch._dynamo.reset()
    counters.clear()
    compiled = tmp_path / "compiled"
    cfg = tiny_run(data, compiled, kind, schedule=schedule, model=model, train={"compile": True})
    with torch._inductor.config.patch(fallback_random=True):  # eager's dropout masks
        Trainer(cfg, progress=False).fit()
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= GRAPH_BOUND, dict(counters["stats"])

    want, got = _losses(eager), _losses(compiled)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-4, abs=1e-5)
