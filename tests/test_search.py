"""A trial's score against the scratch baseline (no Ray): the FLOPs saving where the trial reaches
the baseline's final loss, the compute-equivalent saving where it does not."""

import pytest
from conftest import write_metrics

from apollo_ray.search import score


def test_score_uses_saving_or_compute_equivalent_saving(tmp_path):
    base = write_metrics(tmp_path / "b.jsonl", [(0, 10), (500, 6), (1000, 4)])
    fast = write_metrics(tmp_path / "f.jsonl", [(0, 10), (400, 4), (800, 3)])
    slow = write_metrics(tmp_path / "s.jsonl", [(0, 10), (1000, 6)])
    good = score(fast, base)
    assert good["reached"] and good["saving"] == pytest.approx(0.6)  # 1 - 400 / 1000
    bad = score(slow, base)
    assert not bad["reached"] and bad["speedup"] == pytest.approx(0.5)  # baseline: 500 for 6
    assert bad["saving"] == pytest.approx(1 - 1 / 0.5)  # negative: needed twice the compute
