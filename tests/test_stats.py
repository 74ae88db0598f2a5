import math
from statistics import NormalDist

import numpy as np
import pytest
from conftest import wilson_by_hand
from scipy import stats

from finedefics.stats import across_seeds, average_ci, wilson

Z95 = NormalDist().inv_cdf(0.975)


def right_on(n: int, right: int) -> np.ndarray:
    """0/1 scores: the first `right` of `n` images correct."""
    return (np.arange(n) < right).astype(float)


@pytest.mark.parametrize(("k", "n"), [(7, 10), (0, 20), (6.5, 10)])
def test_wilson_matches_closed_form(k, n):
    assert wilson(k, n) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)


def test_wilson_level():
    assert wilson(7, 10, level=0.9) == pytest.approx(wilson_by_hand(7, 10, NormalDist().inv_cdf(0.95)), abs=1e-12)


def test_average_ci_contains_point_and_narrows_like_root_n():
    small, large = right_on(400, 120), right_on(1600, 480)
    low, high = average_ci([small], resamples=2000)
    assert low < 0.3 < high
    low4, high4 = average_ci([large], resamples=2000)
    assert low4 < 0.3 < high4
    assert (high - low) / (high4 - low4) == pytest.approx(2, rel=0.15)


def test_average_ci_stratified_width_matches_normal_approximation():
    rng = np.random.default_rng(1)
    datasets = [(rng.random(n) < p).astype(float) for n, p in [(3000, 0.3), (1500, 0.6), (800, 0.85)]]
    variance = sum(d.var() / d.size for d in datasets) / len(datasets) ** 2
    low, high = average_ci(datasets, resamples=2000)
    average = np.mean([d.mean() for d in datasets])
    assert low < average < high
    assert high - low == pytest.approx(2 * Z95 * math.sqrt(variance), rel=0.15)


def test_average_ci_is_seeded():
    scores = [right_on(300, 100), right_on(200, 150)]
    assert average_ci(scores, resamples=500, seed=3) == average_ci(scores, resamples=500, seed=3)
    assert average_ci(scores, resamples=500, seed=3) != average_ci(scores, resamples=500, seed=4)
    # the committed metrics' intervals: 10,000 resamples from seed 0 unless a caller says otherwise
    assert average_ci(scores) == average_ci(scores, resamples=10_000, seed=0) != average_ci(scores, resamples=9_999)


def test_average_ci_is_scipy_s_percentile_bootstrap_at_the_level_asked():
    """One varying dataset: the stratified bootstrap is scipy's percentile bootstrap of its mean, at
    `level` (a skewed sample, where the BCa interval scipy defaults to differs)."""
    skewed = np.array([1.0] * 5 + [0.0] * 45)
    for level in (0.95, 0.5):
        expected = stats.bootstrap(
            (skewed,),
            np.mean,
            n_resamples=2000,
            confidence_level=level,
            method="percentile",
            random_state=np.random.default_rng(7),
        ).confidence_interval
        assert average_ci([skewed], level=level, resamples=2000, seed=7) == pytest.approx((expected.low, expected.high))
    (low50, high50), (low95, high95) = average_ci([skewed], level=0.5), average_ci([skewed])
    assert high50 - low50 < high95 - low95


@pytest.mark.parametrize(
    ("scores", "expected"),
    [([np.array([1.0])], 1.0), ([np.full(50, 0.25)], 0.25), ([np.array([0.0]), np.ones(10)], 0.5)],
)
def test_average_ci_degenerate_interval(scores, expected):
    assert average_ci(scores, resamples=200) == pytest.approx((expected, expected))


def test_average_ci_constant_dataset_shifts_the_average():
    varying = right_on(500, 250)
    low, high = average_ci([varying], resamples=1000)
    low2, high2 = average_ci([varying, np.array([1.0])], resamples=1000)
    assert (low2, high2) == pytest.approx(((low + 1) / 2, (high + 1) / 2))


def test_across_seeds_matches_hand_formulas():
    summary = across_seeds([0.70, 0.74, 0.78])
    std = math.sqrt((0.04**2 + 0.0 + 0.04**2) / 2)
    half = 4.303 * std / math.sqrt(3)
    assert summary.n == 3
    assert summary.mean == pytest.approx(0.74)
    assert summary.std == pytest.approx(std)
    assert (summary.low, summary.high) == pytest.approx((0.74 - half, 0.74 + half), rel=1e-4)


def test_across_seeds_edge_cases():
    one = across_seeds([0.6])
    assert one.mean == 0.6 and one.n == 1
    assert math.isnan(one.std) and math.isnan(one.low) and math.isnan(one.high)
    same = across_seeds([0.5, 0.5])
    assert (same.std, same.low, same.high) == (0.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="at least one value"):
        across_seeds([])
