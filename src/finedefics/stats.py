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
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

_CHUNK = 1000  # bootstrap replicates drawn at once by `paired`: bounds memory at CHUNK x images floats


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


@dataclass(frozen=True)
class Comparison:
    """A row minus the default on the average accuracy, paired on test images and training seeds."""

    difference: float
    low: float
    high: float
    p: float
    mcnemar: tuple[float, ...]  # exact McNemar p per dataset
    seeds: int  # paired training seeds used


def paired(
    row: list[np.ndarray], default: list[np.ndarray], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Comparison:
    """Difference row - default of the average accuracy, with a two-level bootstrap CI and two-sided p.

    Seed s of the row is paired with seed s of the default, over the first min(S_row, S_default) seeds; a 1-d array
    is one seed. Each replicate resamples the paired seeds with replacement, and within every dataset the images
    with replacement, and takes the mean over resampled seeds of the average over datasets of the mean paired
    difference. With one seed the seed level is a no-op, so only test-image noise is in the interval.
    """
    if len(row) != len(default):
        raise ValueError(f"row has {len(row)} datasets, default has {len(default)}")
    rows = [np.atleast_2d(np.asarray(a, dtype=float)) for a in row]
    defaults = [np.atleast_2d(np.asarray(a, dtype=float)) for a in default]
    for r, d in zip(rows, defaults):
        if r.shape[1] != d.shape[1]:
            raise ValueError(f"row has {r.shape[1]} images on a dataset where default has {d.shape[1]}")
    n_seeds = min(a.shape[0] for a in rows + defaults)
    diffs = [r[:n_seeds] - d[:n_seeds] for r, d in zip(rows, defaults)]
    difference = float(np.mean([d.mean() for d in diffs]))

    # Hand-written: scipy.stats.bootstrap resamples one level only, and here seeds and images are both resampled.
    # A seed draw becomes per-replicate weights on the paired seeds, shared by all datasets (one training run is
    # evaluated on every dataset); images are then drawn within each dataset.
    rng = np.random.default_rng(seed)
    replicates = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        drawn = rng.integers(n_seeds, size=(size, n_seeds))
        weights = (drawn[..., None] == np.arange(n_seeds)).mean(axis=1)  # replicates x seeds, rows sum to 1
        means = []
        for d in diffs:
            per_image = weights @ d  # replicates x images: seed-resampled paired difference
            images = rng.integers(d.shape[1], size=per_image.shape)
            means.append(np.take_along_axis(per_image, images, axis=1).mean(axis=1))
        replicates[start : start + size] = np.mean(means, axis=0)

    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    tail = min(np.sum(replicates <= 0), np.sum(replicates >= 0))
    p = min(1.0, 2 * (tail + 1) / (resamples + 1))
    tests = tuple(_mcnemar(r[:n_seeds], d[:n_seeds]) for r, d in zip(rows, defaults))
    return Comparison(difference, float(low), float(high), float(p), tests, n_seeds)


def _mcnemar(row: np.ndarray, default: np.ndarray) -> float:
    """Exact McNemar p on one outcome per image and model: right when the seed-averaged score is >= 0.5."""
    a, b = row.mean(axis=0) >= 0.5, default.mean(axis=0) >= 0.5
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    return float(mcnemar(table, exact=True).pvalue)


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> list[float]:
    """Holm-adjusted p-values (family-wise error control over the compared rows)."""
    return multipletests(pvalues, alpha=alpha, method="holm")[1].tolist()


def resolved(c: Comparison, adjusted_p: float, alpha: float = 0.05) -> bool:
    """Whether a difference is resolved: adjusted p < alpha over at least 2 paired seeds.

    One seed cannot separate a configuration from training noise, however small its image-level p.
    """
    return adjusted_p < alpha and c.seeds >= 2
