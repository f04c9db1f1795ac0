"""Is a difference real? Paired tests for comparing two models on the same examples.

Two classifiers evaluated on the same test images are *paired*: most images are right (or wrong)
for both, and only the images where they disagree carry information about which one is better.
McNemar's test (McNemar 1947, "Note on the sampling error of the difference between correlated
proportions or percentages", Psychometrika 12(2)) looks only at those discordant images: if the
two models were equally good, each disagreement would go either way with probability 1/2. The exact
version used here is a two-sided binomial test on the discordant counts (Dietterich 1998,
"Approximate Statistical Tests for Comparing Supervised Classification Learning Algorithms",
Neural Computation 10(7), recommends McNemar for a single test set).

This is far more sensitive than comparing two accuracies with their separate binomial error bars,
and it answers a narrower question: is the difference real *for these trained models on this test
set*. Whether it holds for another training seed is a second question: repeat with seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class McNemar:
    """Result of :func:`mcnemar`.

    Attributes:
        n: paired examples.
        only_a: examples that model A gets right and model B gets wrong.
        only_b: examples that B gets right and A gets wrong.
        p_value: exact two-sided p-value of "A and B are equally accurate".
    """

    n: int
    only_a: int
    only_b: int
    p_value: float

    @property
    def difference(self) -> float:
        """Accuracy of A minus accuracy of B, (only_a - only_b) / n."""
        return (self.only_a - self.only_b) / self.n

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of seeing a split at least as uneven as k : n - k under p = 1/2.

    >>> binomial_two_sided_p(0, 5)  # 2 * (1/2)^5
    0.0625
    """
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar(correct_a: torch.Tensor, correct_b: torch.Tensor) -> McNemar:
    """Exact McNemar test of two models on the same examples.

    Args:
        correct_a, correct_b: bool (N,), whether model A / model B got each example right
            (e.g. ``evaluate.predictions(...) == labels``).
    Returns:
        :class:`McNemar` with the discordant counts and the exact two-sided p-value.

    Example: A right on 30 images where B is wrong, B right on 10 where A is wrong: p ~ 0.0022,
    although the accuracies differ by only 2 points on 1,000 images.
    """
    a, b = torch.as_tensor(correct_a).bool().flatten(), torch.as_tensor(correct_b).bool().flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"correct_a and correct_b must be non-empty and of one length, got {tuple(a.shape)} and {tuple(b.shape)}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return McNemar(int(a.numel()), only_a, only_b, binomial_two_sided_p(only_a, only_a + only_b))


@dataclass(frozen=True)
class PairedSeeds:
    """Result of :func:`paired_over_seeds`.

    Attributes:
        differences: a - b for each seed, in order.
        mean: their mean.
        se: the standard error of the mean, sd / sqrt(seeds) (0 when every seed gives the same).
        p_value: the paired t-test's p-value (nan when ``se`` is 0: nothing to test against).
        alternative: "two-sided", "greater" (a > b) or "less".
    """

    differences: tuple[float, ...]
    mean: float
    se: float
    p_value: float
    alternative: str

    @property
    def t(self) -> float:
        return self.mean / self.se if self.se else math.nan

    def significant(self, alpha: float = 0.05) -> bool:
        return not math.isnan(self.p_value) and self.p_value < alpha

    def verdict(self, alpha: float = 0.05) -> str:
        """What the test lets a lesson say, in words."""
        if math.isnan(self.p_value):
            return "no spread across seeds to test against: add seeds"
        if self.significant(alpha):
            return f"beyond seed noise (p < {alpha:g})"
        return f"not established with {len(self.differences)} seeds (p >= {alpha:g})"


ALTERNATIVES = ("two-sided", "greater", "less")


def paired_over_seeds(a, b, alternative: str = "two-sided") -> PairedSeeds:
    """Paired comparison of two recipes run with the same seeds (Student's paired t-test).

    Args:
        a, b: one number per seed for each recipe (e.g. test accuracy), seed k of ``a`` paired
            with seed k of ``b`` (same data order, same initialisation).
        alternative: "two-sided", "greater" (is a larger?) or "less".
    Returns:
        :class:`PairedSeeds`: the per-seed differences, their mean, its standard error and p.

    With few seeds the test has few degrees of freedom (seeds - 1): a real but small gain can
    stay "not established". Add seeds rather than lowering the bar.
    """
    import numpy as np
    from scipy import stats as scipy_stats

    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need one value per seed for both, at least 2 seeds, got shapes {a.shape} and {b.shape}")
    d = a - b  # (seeds,)
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    p = math.nan if se == 0 else float(scipy_stats.ttest_rel(a, b, alternative=alternative).pvalue)
    return PairedSeeds(tuple(float(x) for x in d), float(d.mean()), se, p, alternative)


def consistent_verdict(per_seed: Sequence[McNemar], alpha: float = 0.05) -> str:
    """One McNemar test of A vs B per training seed: a recipe counts as better only if every seed
    says so, each with p < ``alpha``, in the same direction (one lucky seed proves nothing)."""
    if not per_seed:
        raise ValueError("per_seed must hold one McNemar result per seed, got none")
    if all(r.significant(alpha) and r.difference > 0 for r in per_seed):
        return f"A better on every seed (p < {alpha:g} each)"
    if all(r.significant(alpha) and r.difference < 0 for r in per_seed):
        return f"B better on every seed (p < {alpha:g} each)"
    return "no consistent difference (within noise)"


def _flat_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a).detach().reshape(-1).double().cpu(), torch.as_tensor(b).detach().reshape(-1).double().cpu()
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"a and b must hold the same number (>= 2) of scores, got {a.numel()} and {b.numel()}")
    return a, b


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score tensors (flattened, paired element by element):
    Pearson's correlation of their ranks, tied scores sharing their mean rank. 1: the same order;
    0: unrelated orders; nan if either is constant."""
    from scipy import stats as scipy_stats

    a, b = _flat_pair(a, b)
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return math.nan
    return float(scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic)


def top_overlap(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.1) -> float:
    """Share of the ``round(fraction * n)`` highest-scored elements of ``a`` that are also among the
    highest of ``b`` (among equal scores the lower index counts as higher). A random pair of orders overlaps by about ``fraction``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    a, b = _flat_pair(a, b)
    k = max(1, round(fraction * a.numel()))
    top_a = set(torch.sort(a, descending=True, stable=True).indices[:k].tolist())  # ties: lower index first
    top_b = set(torch.sort(b, descending=True, stable=True).indices[:k].tolist())
    return len(top_a & top_b) / k
