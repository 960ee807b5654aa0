"""Depth samplers against the released LVPS probabilities (docs/method.md, section 3) and
their contract."""

import numpy as np
import pytest

from apollo_ray.method.depth import (
    FullDepth,
    PhysicalDepth,
    ReleasedLVPS,
    TemperedLVPS,
    UniformDepth,
    closest_tau,
    make_sampler,
)

# docs/method.md, section 3: exact probabilities for L = 12 (to within 0.002) and their means.
RELEASED = {
    1: ([0.736, 0.105, 0.053, 0.032, 0.021, 0.015, 0.011, 0.009, 0.007, 0.006, 0.005, 0.002], 1.77),
    3: ([0.637, 0.104, 0.070, 0.050, 0.037, 0.029, 0.023, 0.019, 0.016, 0.016], 4.23),
    6: ([0.648, 0.086, 0.067, 0.053, 0.044, 0.036, 0.067], 7.14),
    12: ([1.0], 12.0),
}
SAMPLERS = [
    ReleasedLVPS(),
    TemperedLVPS(0.52),
    TemperedLVPS(3.0),
    UniformDepth(),
    FullDepth(),
    PhysicalDepth(),
]


@pytest.mark.parametrize("n", sorted(RELEASED))
def test_released_lvps_matches_the_table(n):
    table, mean = RELEASED[n]
    np.testing.assert_allclose(ReleasedLVPS().probs(n, 12), table, atol=0.002)
    assert ReleasedLVPS().mean(n, 12) == pytest.approx(mean, abs=0.01)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_released_formula_samples_the_table(n):
    # `sample` runs the release's own formula (x -> y -> int(y N)), not the closed form.
    draws = [ReleasedLVPS().sample(n, 12, seed=0, step=s, micro=0) for s in range(40_000)]
    freq = np.bincount(draws, minlength=13)[n:] / len(draws)
    np.testing.assert_allclose(freq, RELEASED[n][0], atol=0.008)  # ~3.5 sigma at p = 0.7


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: f"{s.name}")
def test_sampler_contract(sampler):
    for n in (1, 3, 6, 12):
        p = sampler.probs(n, 12)
        assert p.shape == (12 - n + 1,) and p.sum() == pytest.approx(1) and (p >= 0).all()
        draws = [sampler.sample(n, 12, seed=1, step=s, micro=m) for s in range(50) for m in (0, 1)]
        assert all(n <= d <= 12 for d in draws)
        assert all(p[d - n] > 0 for d in draws)
    # a pure function of (seed, step, micro): every rank draws the same, a resume continues
    first = [sampler.sample(3, 12, 7, s, m) for s in range(30) for m in range(2)]
    assert first == [sampler.sample(3, 12, 7, s, m) for s in range(30) for m in range(2)]


def test_empirical_distribution_follows_probs_for_tempered():
    sampler = TemperedLVPS(1.0)
    draws = [sampler.sample(3, 12, seed=2, step=s, micro=0) for s in range(20_000)]
    freq = np.bincount(draws, minlength=13)[3:] / len(draws)
    np.testing.assert_allclose(freq, sampler.probs(3, 12), atol=0.012)


def test_temperature_limits_and_monotonicity():
    for tau in (0.05, 0.3, 1.0, 5.0):
        p = TemperedLVPS(tau).probs(3, 12)
        assert (np.diff(p) <= 1e-15).all()  # non-increasing in depth
    assert TemperedLVPS(0.01).probs(3, 12)[0] > 0.999  # tau -> 0: all mass on N
    np.testing.assert_allclose(
        TemperedLVPS(1e6).probs(3, 12), UniformDepth().probs(3, 12), atol=1e-5
    )  # tau -> inf: uniform


def test_closest_tau_to_released():
    tau, kl = closest_tau()
    assert tau == pytest.approx(0.52, abs=0.01) and kl < 0.05


def test_make_sampler_errors():
    with pytest.raises(ValueError, match="temperature"):
        make_sampler("lvps")
    with pytest.raises(ValueError, match="allowed"):
        make_sampler("sigmoidal")
    with pytest.raises(ValueError, match="> 0"):
        TemperedLVPS(0.0)
