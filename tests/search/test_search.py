"""A trial's score (no Ray): its speedup against the scratch frontier, with bounds beyond it, and
the paper's metric against the scratch run of its own budget."""

import pytest
from conftest import write_metrics

from apollo_ray.search.tuner import score
from apollo_ray.yardstick.scratch import Scratch


def scratch(tmp_path) -> Scratch:
    """Scratch runs at 1/2, 1 and 2 times the budget, ending at 6, 4 and 3."""
    return Scratch(
        {
            0.5: str(write_metrics(tmp_path / "h.jsonl", [(0, 10), (500, 6)])),
            1.0: str(write_metrics(tmp_path / "b.jsonl", [(0, 10), (500, 6), (1000, 4)])),
            2.0: str(write_metrics(tmp_path / "d.jsonl", [(0, 10), (1000, 5), (2000, 3)])),
        }
    )


def test_score_reads_the_trial_against_the_frontier(tmp_path):
    runs = scratch(tmp_path)
    fast = write_metrics(tmp_path / "f.jsonl", [(0, 10), (400, 4), (800, 3.5)])
    good = score(fast, runs)
    # 3.5 lies halfway (in loss) between the 1x (4 at 1000) and 2x (3 at 2000) runs: log-linear
    assert good["bound"] is None
    assert good["speedup"] == pytest.approx((1000 * 2**0.5) / 800)
    assert good["saving"] == pytest.approx(1 - 1 / good["speedup"])
    assert good["wall_speedup"] == pytest.approx(good["speedup"])  # wall = flops / 10 here
    # the paper's metric: where the curve first reaches the 1x run's final loss (4, at 400)
    assert good["paper_reached"] and good["paper_flops_saving"] == pytest.approx(0.6)
    assert good["eval_loss"] == 3.5 and good["flops"] == 800


def test_beyond_the_frontier_the_speedup_is_a_bound(tmp_path):
    runs = scratch(tmp_path)
    better = score(write_metrics(tmp_path / "x.jsonl", [(0, 10), (1000, 2.5)]), runs)
    assert better["bound"] == "lower" and better["speedup"] == pytest.approx(2.0)
    worse = score(write_metrics(tmp_path / "y.jsonl", [(0, 10), (1000, 7)]), runs)
    assert worse["bound"] == "upper" and worse["speedup"] == pytest.approx(0.5)
    assert worse["saving"] == pytest.approx(-1.0) and not worse["paper_reached"]
