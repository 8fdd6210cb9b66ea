"""The study's statistics: summaries over seeds and the rank test.

The test, stated before any run (docs: policy_study.md, "The rank test"):
in each block (a setting and a budget) a method's policy is ranked by its
mean top-1 among the ``n`` random policies' means (1 = best; a tie counts
against the method). Were the method's policy one more random draw, every
rank 1..n+1 would be equally likely, so rank ``r`` or better has chance
``r / (n + 1)``. Across blocks (taken as independent) the ranks' sum is the
statistic: the chance of a sum as low or lower, and the binomial chance of
ranking first in as many blocks or more.
"""
import math
from typing import List, Sequence

import numpy as np

__all__ = [
    'stats', 'rank_among', 'rank_chance', 'rank_sum_chance', 'binomial_tail'
]


def stats(values: List[float]) -> dict:
    """Mean, sample std (0 for one value), min, max and count."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return dict(n=0)
    return dict(
        n=int(arr.size),
        mean=float(arr.mean()),
        std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        min=float(arr.min()),
        max=float(arr.max()))


def rank_among(value: float, others: Sequence[float]) -> int:
    """Rank of ``value`` among ``others`` plus itself, 1 = the highest;
    an equal other ranks above it."""
    return 1 + sum(o >= value for o in others)


def rank_chance(rank: int, n: int) -> float:
    """Chance of rank ``rank`` or better for one more of ``n``
    exchangeable draws: ``rank / (n + 1)``."""
    return rank / (n + 1)


def rank_sum_chance(ranks: Sequence[int], sizes: Sequence[int]) -> float:
    """``P(R_1 + ... + R_B <= sum(ranks))`` for independent ranks ``R_i``
    uniform on ``1 .. sizes[i] + 1`` (exact, by convolution)."""
    dist = np.ones(1)  # dist[s]: chance of a rank sum of s (offset below)
    for n in sizes:
        dist = np.convolve(dist, np.full(n + 1, 1.0 / (n + 1)))
    # the smallest possible sum is len(sizes) (every rank 1)
    return float(dist[:sum(ranks) - len(sizes) + 1].sum())


def binomial_tail(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``."""
    return sum(
        math.comb(n, i) * p**i * (1 - p)**(n - i) for i in range(k, n + 1))
