"""lessons_lib.stats against scipy's exact binomial test and hand counts."""
import math

import pytest
import torch
from scipy.stats import binomtest

from lessons_lib import stats


@pytest.mark.parametrize("k, n", [(0, 1), (0, 5), (3, 10), (10, 40), (30, 40), (17, 17), (250, 520)])
def test_exact_two_sided_p_equals_scipy(k, n):
    assert stats.binomial_two_sided_p(k, n) == pytest.approx(binomtest(k, n, 0.5).pvalue, rel=1e-9)


def test_mcnemar_counts_only_the_discordant_examples():
    a = torch.tensor([1, 1, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    r = stats.mcnemar(a, b)
    assert (r.n, r.only_a, r.only_b) == (8, 2, 1)
    assert r.difference == pytest.approx(1 / 8)
    assert r.p_value == pytest.approx(binomtest(1, 3, 0.5).pvalue)
    # adding examples both get right (or both wrong) changes nothing but n
    r2 = stats.mcnemar(torch.cat([a, torch.ones(100, dtype=torch.bool)]), torch.cat([b, torch.ones(100, dtype=torch.bool)]))
    assert (r2.only_a, r2.only_b, r2.p_value) == (r.only_a, r.only_b, r.p_value)


def test_mcnemar_is_symmetric_and_detects_a_consistent_small_gain():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1000, generator=g) < 0.97
    better = base.clone()
    better[torch.nonzero(~base).flatten()[:25]] = True  # B fixes 25 of A's mistakes and breaks none
    r = stats.mcnemar(better, base)
    assert r.only_a == 25 and r.only_b == 0 and r.significant(0.001)
    assert stats.mcnemar(base, better).p_value == r.p_value
    assert not stats.mcnemar(base, base).significant()


def test_mcnemar_refuses_unpaired_input():
    with pytest.raises(ValueError, match="one length"):
        stats.mcnemar(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_paired_over_seeds_by_hand_and_against_scipy(alternative):
    from scipy.stats import ttest_rel

    a, b = [0.97, 0.98, 0.975, 0.985, 0.972], [0.965, 0.97, 0.974, 0.975, 0.968]
    r = stats.paired_over_seeds(a, b, alternative)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 5
    sd = (sum((x - mean) ** 2 for x in d) / 4) ** 0.5
    assert r.differences == pytest.approx(d) and r.mean == pytest.approx(mean) and r.se == pytest.approx(sd / 5**0.5)
    theirs = ttest_rel(a, b, alternative=alternative)
    assert r.t == pytest.approx(theirs.statistic) and r.p_value == pytest.approx(theirs.pvalue)


def test_paired_over_seeds_without_spread_and_bad_input():
    r = stats.paired_over_seeds([1.0, 2.0], [0.5, 1.5])  # the same difference on every seed
    assert r.se == 0 and math.isnan(r.p_value) and not r.significant()
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stats.paired_over_seeds([1.0], [0.5])
    with pytest.raises(ValueError, match="alternative"):
        stats.paired_over_seeds([1.0, 2.0], [0.5, 1.0], "bigger")


def test_verdicts_say_only_what_the_tests_support():
    from lessons_lib.stats import McNemar, PairedSeeds, consistent_verdict

    better, worse, tie = McNemar(1000, 40, 10, 1e-5), McNemar(1000, 10, 40, 1e-5), McNemar(1000, 12, 10, 0.8)
    assert consistent_verdict([better, better]).startswith("A better on every seed")
    assert consistent_verdict([worse, worse]).startswith("B better on every seed")
    assert consistent_verdict([better, tie]) == "no consistent difference (within noise)"
    assert consistent_verdict([better, worse]) == "no consistent difference (within noise)"
    with pytest.raises(ValueError, match="per_seed"):
        consistent_verdict([])
    assert PairedSeeds((0.01, 0.01), 0.01, 0.0, math.nan, "greater").verdict().startswith("no spread")
    assert PairedSeeds((0.01, 0.02, 0.015), 0.015, 0.003, 0.01, "greater").verdict() == "beyond seed noise (p < 0.05)"
    assert PairedSeeds((0.01, -0.02, 0.015), 0.002, 0.01, 0.4, "greater").verdict() == "not established with 3 seeds (p >= 0.05)"


def test_spearman_by_hand_with_ties_and_top_overlap():
    a = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 2.0])  # average ranks 5, 1, 3, 3, 6, 3
    b = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 5.0])  # ranks 1..6 as they are
    ra, rb = torch.tensor([5.0, 1, 3, 3, 6, 3]), b
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert stats.spearman(a, b) == pytest.approx(float(ra @ rb / (ra.norm() * rb.norm())))
    assert stats.spearman(b, b * 10 + 1) == pytest.approx(1.0)
    assert stats.spearman(b, -b) == pytest.approx(-1.0)
    assert math.isnan(stats.spearman(torch.ones(3), b[:3]))
    assert stats.top_overlap(a, b, 0.5) == pytest.approx(1 / 3)  # top 3: a {4, 0, 2} (the first 2.0), b {4, 5, 3}
    assert stats.top_overlap(b, b * 2, 0.1) == 1.0
    with pytest.raises(ValueError, match="same number"):
        stats.spearman(a, b[:3])
    with pytest.raises(ValueError, match="fraction"):
        stats.top_overlap(a, b, 0.0)
