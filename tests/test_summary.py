"""The study's summary: the Pareto front of (eval loss, FLOPs) for a multi-objective search."""

from apollo_ray.summary import pareto_front


def test_pareto_front():
    rows = [
        {"eval_loss": 3.0, "flops": 10},
        {"eval_loss": 2.0, "flops": 20},
        {"eval_loss": 3.5, "flops": 15},
        {"eval_loss": 1.0, "flops": 40},
    ]
    assert [r["flops"] for r in pareto_front(rows)] == [10, 20, 40]
