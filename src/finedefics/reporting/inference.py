"""Seed-level inference: is a row's difference from its reference larger than training noise?

The unit of training variance is the training seed (`train.seed`). One seed's accuracy averages the test
images and their option orders, so the images' noise lives inside each seed's value and the test is over
seeds, with the t distribution's S - 1 degrees of freedom (a bootstrap over a handful of seeds is not
calibrated: its percentile interval shrinks to the range of the seeds). Three designs:

- paired t on the seeds both rows have, when they share their seed streams (`train.seed` gives both the
  same initialisation and data order);
- Welch's t when they do not (another base family, another paradigm, another data size);
- one-sample t of the per-seed differences when the reference has no seed (a zero-shot base, a CLIP).

Seeds are matched by their value, never by position. p values are exact t tail probabilities.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.power import TTestIndPower, TTestPower

ALPHA = 0.05
POWER = 0.8
PAIRED, WELCH, ONE_SAMPLE = "paired t", "Welch t", "one-sample t"
TOLERANCE = 1e-9  # accuracies (or differences) that agree this closely over seeds are identical: no test


@dataclass(frozen=True)
class SeedTest:
    """A row minus its reference, tested over training seeds; `p` is nan when no test was possible
    (`untested` says why)."""

    design: str  # PAIRED, WELCH or ONE_SAMPLE
    difference: float  # mean over the row's seeds minus the reference's (on the matched seeds when paired)
    low: float  # 95% t-interval of the difference (nan when untested)
    high: float
    p: float  # two-sided
    seeds: tuple[int, ...]  # the row's seeds the test used
    reference_seeds: tuple[int, ...]  # the reference's (empty for a seedless reference)
    untested: str = ""  # why there is no test: "one seed", "no common seed", "identical seeds"

    @property
    def tested(self) -> bool:
        return not self.untested


def seed_test(row: Mapping[int, float] | float, reference: Mapping[int, float] | float, paired: bool) -> SeedTest:
    """Test `row` against `reference`, each seed -> accuracy or one value for a seedless model: a one-sample
    t of the per-seed differences when one side is seedless, else a paired t on the common seeds when
    `paired`, else Welch's t."""
    if not isinstance(reference, Mapping):
        if not isinstance(row, Mapping):
            raise ValueError("seed_test needs seeds on at least one side")
        seeds = tuple(sorted(row))
        return _one_sample([row[s] - reference for s in seeds], ONE_SAMPLE, seeds, ())
    if not isinstance(row, Mapping):
        seeds = tuple(sorted(reference))
        return _one_sample([row - reference[s] for s in seeds], ONE_SAMPLE, (), seeds)
    if paired:
        common = tuple(sorted(set(row) & set(reference)))
        if not common:
            return _untested(PAIRED, float("nan"), (), (), "no common seed")
        return _one_sample([row[s] - reference[s] for s in common], PAIRED, common, common)
    return _welch(row, reference)


def _untested(design: str, difference: float, seeds: tuple, reference_seeds: tuple, why: str) -> SeedTest:
    nan = float("nan")
    return SeedTest(design, difference, nan, nan, nan, seeds, reference_seeds, why)


def _one_sample(diffs: Sequence[float], design: str, seeds: tuple, reference_seeds: tuple) -> SeedTest:
    x = np.asarray(diffs, dtype=float)
    mean = float(x.mean())
    if x.size < 2:
        return _untested(design, mean, seeds, reference_seeds, "one seed")
    if np.ptp(x) <= TOLERANCE:
        return _untested(design, mean, seeds, reference_seeds, "identical seeds")
    result = stats.ttest_1samp(x, 0.0)
    low, high = result.confidence_interval(0.95)
    return SeedTest(design, mean, float(low), float(high), float(result.pvalue), seeds, reference_seeds)


def _welch(row: Mapping[int, float], reference: Mapping[int, float]) -> SeedTest:
    seeds, reference_seeds = tuple(sorted(row)), tuple(sorted(reference))
    a, b = np.array([row[s] for s in seeds]), np.array([reference[s] for s in reference_seeds])
    difference = float(a.mean() - b.mean())
    if min(a.size, b.size) < 2:
        return _untested(WELCH, difference, seeds, reference_seeds, "one seed")
    if max(np.ptp(a), np.ptp(b)) <= TOLERANCE:
        return _untested(WELCH, difference, seeds, reference_seeds, "identical seeds")
    result = stats.ttest_ind(a, b, equal_var=False)
    low, high = result.confidence_interval(0.95)
    return SeedTest(WELCH, difference, float(low), float(high), float(result.pvalue), seeds, reference_seeds)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p values (family-wise error control over one table's tested rows): the k-th smallest
    times (m - k + 1), made monotone, capped at 1. statsmodels' `multipletests` gives the same (tested) but
    runs the garbage collector on every call, which the calibration test's thousand tables cannot afford."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(p)
    out[order] = adjusted
    return out.tolist()


def resolved(test: SeedTest, adjusted_p: float) -> bool:
    """A difference is resolved when it was tested over seeds and its Holm-adjusted p is below `ALPHA`."""
    return test.tested and adjusted_p < ALPHA


def smallest_resolvable(seed_sd: float, seeds: int, design: str) -> float:
    """The smallest true difference a test over `seeds` seeds per row resolves with `POWER` at `ALPHA`
    (two-sided, before Holm), for rows whose accuracy has standard deviation `seed_sd` over seeds.

    Paired seeds of two independent training runs differ with sd sqrt(2) * seed_sd; a seedless reference
    adds no seed variance."""
    if seeds < 2 or not math.isfinite(seed_sd):
        return float("nan")
    if design == WELCH:
        return _effect(seeds, two_samples=True) * seed_sd
    return _effect(seeds, two_samples=False) * seed_sd * (math.sqrt(2) if design == PAIRED else 1.0)


@functools.cache
def _effect(seeds: int, two_samples: bool) -> float:
    """The standardised effect a t test over `seeds` seeds (per sample) detects with `POWER` at `ALPHA`."""
    if two_samples:
        return float(TTestIndPower().solve_power(nobs1=seeds, ratio=1.0, alpha=ALPHA, power=POWER))
    return float(TTestPower().solve_power(nobs=seeds, alpha=ALPHA, power=POWER))


def mcnemar_p(row: np.ndarray, reference: np.ndarray) -> float:
    """Exact McNemar p on one dataset's test images (a secondary check of test-image noise only): an image
    counts as right for a side when its score, averaged over that side's seeds and option orders, is >= 0.5.
    `row` and `reference` are (seeds x images) arrays on the same images."""
    a, b = np.atleast_2d(row).mean(axis=0) >= 0.5, np.atleast_2d(reference).mean(axis=0) >= 0.5
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    return float(mcnemar(table, exact=True).pvalue)
