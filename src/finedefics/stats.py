"""Statistics for FOCI-style 4-way multiple-choice accuracies.

A run's result on one dataset is a 1-d array of per-image scores in [0, 1] (each image's accuracy averaged over
K seeded option permutations; 0/1 when K = 1). Several training seeds of one configuration form a 2-d array
(seeds x images) whose rows are aligned on the same images. A configuration evaluated on several datasets is a
list of such arrays, one per dataset, and "the average" is always the unweighted mean of per-dataset accuracies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

_CHUNK = 1000  # bootstrap replicates drawn at once: bounds memory at CHUNK x images floats


def wilson(score_sum: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson interval of an accuracy from `score_sum` correct out of `n` images.

    `score_sum` may be fractional (permutation-averaged scores); the interval is then conservative, since averaging
    over permutations can only lower the per-image variance below the Bernoulli one the interval assumes.
    """
    low, high = proportion_confint(score_sum, n, alpha=1 - level, method="wilson")
    return float(low), float(high)


def average_ci(
    scores: list[np.ndarray], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of one run's average accuracy over datasets, by a bootstrap over images stratified by dataset.

    scipy resamples each sample independently, so one sample per dataset is the stratification. Datasets with a
    single image or identical scores cannot vary under resampling and enter as constants; if all do, the interval
    is the degenerate [x, x].
    """
    arrays = [np.asarray(s, dtype=float) for s in scores]
    varying = tuple(a for a in arrays if np.ptp(a) > 0)
    constant = sum(a.mean() for a in arrays if np.ptp(a) == 0)
    if not varying:
        x = float(constant / len(arrays))
        return x, x

    def average(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return (constant + sum(s.mean(axis=axis) for s in samples)) / len(arrays)

    result = stats.bootstrap(
        varying,
        average,
        n_resamples=resamples,
        batch=_CHUNK,
        vectorized=True,
        axis=-1,
        confidence_level=level,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class SeedSummary:
    """Spread of one metric over training seeds; `low`/`high` is the t-interval of the mean (nan for one seed)."""

    mean: float
    std: float
    low: float
    high: float
    n: int


def across_seeds(values: Sequence[float], level: float = 0.95) -> SeedSummary:
    """Mean, sample std (ddof=1) and t-interval of the mean over seeds.

    One seed gives no interval (std, low and high are nan); callers then fall back to the image bootstrap.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("across_seeds needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return SeedSummary(mean, float("nan"), float("nan"), float("nan"), 1)
    low, high = mean + stats.sem(x) * np.array(stats.t.interval(level, x.size - 1))
    return SeedSummary(mean, float(x.std(ddof=1)), float(low), float(high), int(x.size))
