"""Seed-level inference: t tests over training seeds against hand computation, pairing by seed value."""

import math

import numpy as np
import pytest
from scipy import stats

from finedefics.reporting.inference import (
    ONE_SAMPLE,
    PAIRED,
    WELCH,
    holm,
    mcnemar_p,
    resolved,
    seed_test,
    smallest_resolvable,
)

T2 = 4.302652729911275  # t(0.975, df 2)


def test_paired_t_matches_hand_computation():
    row, reference = {0: 0.50, 1: 0.46, 2: 0.41}, {0: 0.48, 1: 0.41, 2: 0.36}
    t = seed_test(row, reference, paired=True)
    diffs = [0.02, 0.05, 0.05]
    mean, sd = np.mean(diffs), np.std(diffs, ddof=1)
    statistic = mean / (sd / math.sqrt(3))
    assert t.design == PAIRED and t.seeds == t.reference_seeds == (0, 1, 2)
    assert t.difference == pytest.approx(0.04)
    assert (t.low, t.high) == pytest.approx((mean - T2 * sd / math.sqrt(3), mean + T2 * sd / math.sqrt(3)))
    assert t.p == pytest.approx(2 * stats.t.sf(statistic, 2))
    assert statistic == pytest.approx(4.0) and t.p == pytest.approx(0.0572, abs=5e-4)  # t = 4.0 on df 2


def test_seeds_are_paired_by_value_not_position():
    """{0, 2, 5} against {0, 1, 2}: seeds 0 and 2 are paired, 5 and 1 are not used."""
    row = {0: 0.60, 2: 0.52, 5: 0.10}
    reference = {0: 0.50, 1: 0.90, 2: 0.40}
    t = seed_test(row, reference, paired=True)
    assert t.seeds == (0, 2) and t.reference_seeds == (0, 2)
    assert t.difference == pytest.approx(0.11)  # (0.10 + 0.12) / 2, not position-wise 0.60-0.50, 0.52-0.90, ...
    assert t.p == pytest.approx(stats.ttest_rel([0.60, 0.52], [0.50, 0.40]).pvalue)
    none = seed_test({3: 0.5, 4: 0.6}, reference, paired=True)
    assert not none.tested and none.untested == "no common seed"


def test_welch_matches_scipy_and_the_satterthwaite_interval():
    row, reference = {0: 0.30, 1: 0.33, 2: 0.29}, {0: 0.48, 1: 0.41, 2: 0.36, 3: 0.44}
    t = seed_test(row, reference, paired=False)
    a, b = np.array(list(row.values())), np.array(list(reference.values()))
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert t.design == WELCH and t.seeds == (0, 1, 2) and t.reference_seeds == (0, 1, 2, 3)
    assert t.difference == pytest.approx(a.mean() - b.mean())
    assert (t.low, t.high) == pytest.approx((a.mean() - b.mean() - half, a.mean() - b.mean() + half))
    assert t.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)


def test_one_sample_against_a_seedless_reference_either_side():
    final = {0: 0.482, 1: 0.412, 2: 0.358}  # the default's three seeds and its base, as the issue quotes them
    gain = seed_test(final, 0.268, paired=True)
    diffs = [0.214, 0.144, 0.090]
    assert gain.design == ONE_SAMPLE and gain.reference_seeds == ()
    assert gain.p == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    assert gain.p == pytest.approx(0.0530, abs=1e-3)  # the seed-level p for "the default beats its base"
    base = seed_test(0.268, final, paired=True)  # the base row against the seeded default
    assert base.seeds == () and base.reference_seeds == (0, 1, 2)
    assert base.difference == pytest.approx(-gain.difference) and base.p == pytest.approx(gain.p)
    with pytest.raises(ValueError):
        seed_test(0.3, 0.2, paired=True)


@pytest.mark.parametrize(
    ("row", "reference", "paired", "why"),
    [
        ({0: 0.5}, {0: 0.4, 1: 0.45}, True, "one seed"),
        ({0: 0.5}, {0: 0.4, 1: 0.45}, False, "one seed"),
        ({0: 0.5}, 0.3, True, "one seed"),
        ({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5}, True, "identical seeds"),  # the same +0.1 twice: sd 0
        ({0: 0.5, 1: 0.5}, {0: 0.4, 1: 0.4}, False, "identical seeds"),
        ({0: 0.35, 1: 0.45}, {0: 0.25, 1: 0.35}, True, "identical seeds"),  # +0.1 twice, but for float rounding
    ],
)
def test_no_test_without_spread_or_seeds(row, reference, paired, why):
    """Never a zero-width interval or a p of 0 from a degenerate case: no test, and why."""
    t = seed_test(row, reference, paired)
    assert not t.tested and t.untested == why and math.isnan(t.p) and math.isnan(t.low)
    assert not resolved(t, 0.0)


def test_resolved_needs_a_test_and_a_small_adjusted_p():
    t = seed_test({0: 0.5, 1: 0.6, 2: 0.55}, {0: 0.3, 1: 0.35, 2: 0.33}, paired=True)
    assert resolved(t, 0.01) and not resolved(t, 0.05)


def test_holm_matches_hand_adjustment_and_statsmodels():
    from statsmodels.stats.multitest import multipletests

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == []
    p = np.random.default_rng(0).uniform(0, 0.2, size=(50, 6))
    for row in p:
        assert holm(row) == pytest.approx(multipletests(row, method="holm")[1].tolist())


def test_smallest_resolvable_difference_has_the_stated_power():
    """At the returned difference, the test's power computed independently (noncentral t) is 80%."""
    sd = 0.062
    for seeds in (3, 5):
        for design in (PAIRED, WELCH, ONE_SAMPLE):
            d = smallest_resolvable(sd, seeds, design)
            if design == WELCH:
                ncp, df = d / (sd * math.sqrt(2 / seeds)), 2 * seeds - 2
            else:
                sd_diff = sd * (math.sqrt(2) if design == PAIRED else 1)
                ncp, df = d / (sd_diff / math.sqrt(seeds)), seeds - 1
            crit = stats.t.ppf(0.975, df)
            power = stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp)
            assert power == pytest.approx(0.8, abs=1e-3), (seeds, design)
    assert smallest_resolvable(sd, 5, PAIRED) < smallest_resolvable(sd, 3, PAIRED)
    assert math.isnan(smallest_resolvable(sd, 1, PAIRED))


def test_mcnemar_matches_exact_binomial():
    # 10 images both right, 2 only the row gets right, 9 only the reference, 5 neither.
    row = np.repeat([1.0, 1.0, 0.0, 0.0], [10, 2, 9, 5])
    reference = np.repeat([1.0, 0.0, 1.0, 0.0], [10, 2, 9, 5])
    by_hand = 2 * sum(math.comb(11, k) for k in range(3)) / 2**11
    assert by_hand == pytest.approx(0.0654296875)
    assert mcnemar_p(row, reference) == pytest.approx(by_hand)


def test_mcnemar_outcome_is_the_seed_averaged_score_at_least_half():
    # The 2/9 split again from two seeds of permutation-averaged scores: a mean of 0.5 is right, 0.375 wrong.
    right, wrong = [0.75, 0.25], [0.5, 0.25]
    row = np.array([right] * 12 + [wrong] * 14).T
    reference = np.array([right] * 10 + [wrong] * 2 + [right] * 9 + [wrong] * 5).T
    by_hand = 2 * sum(math.comb(11, k) for k in range(3)) / 2**11
    assert mcnemar_p(row, reference) == pytest.approx(by_hand)
