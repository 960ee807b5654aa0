"""Intervals over seeds: t-intervals on log speedups, paired by seed."""

import math

import pytest

from apollo_ray.yardstick.stats import log_interval, paired_log_interval


def test_log_interval_is_a_t_interval_on_the_logs():
    ratios = [1.25, 1.3, 1.2]
    ci = log_interval(ratios)
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 dof)
    assert ci.mean == pytest.approx(math.exp(mean))
    assert (ci.low, ci.high) == pytest.approx((math.exp(mean - half), math.exp(mean + half)))
    assert ci.significant and "differs from 1" in ci.describe()


def test_an_interval_that_holds_one_is_no_significant_difference():
    ci = log_interval([0.9, 1.2, 1.05])
    assert ci.low < 1 < ci.high and ci.significant is False
    assert "no significant difference" in ci.describe()
    single = log_interval([1.4])
    assert single.low is None and single.significant is None and "1 seed" in single.describe()


def test_paired_by_seed():
    a, b = [1.2, 1.5, 1.1], [1.0, 1.25, 0.92]  # a is ~1.2x b on every seed
    ci = paired_log_interval(a, b)
    assert ci.mean == pytest.approx(1.2, rel=0.01) and ci.significant
    unpaired_spread = log_interval(a).high / log_interval(a).low
    assert ci.high / ci.low < unpaired_spread  # pairing removes the seed-to-seed variation
    with pytest.raises(ValueError, match="paired"):
        paired_log_interval([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        log_interval([1.0, 0.0])
