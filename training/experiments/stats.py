"""Paired significance tests and the silhouette coefficient, in plain numpy (no scipy needed).

* :func:`paired_ttest`: Student's paired t-test, two-sided; the p-value is
  :math:`I_{\\nu/(\\nu+t^2)}(\\nu/2, 1/2)` (regularised incomplete beta, continued fraction), what
  ``scipy.stats.ttest_rel`` returns.
* :func:`wilcoxon_signed_rank`: the Wilcoxon signed-rank test, two-sided, zero differences dropped
  (``zero_method='wilcox'``), as ``scipy.stats.wilcoxon``'s default ``method='auto'``: the exact null
  distribution for up to 50 pairs without ties or zeros; with ties or zeros, all sign flips of the
  observed ranks for up to 13 pairs, else the normal approximation (tie correction, no continuity
  correction).

Degenerate inputs: no difference at all gives p = 1.0 (scipy gives nan); fewer than two pairs give nan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TESTS = ("ttest", "wilcoxon")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function :math:`I_x(a, b)`."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be 1-D arrays of the same length, got {a.shape} and {b.shape}")
    return a - b


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``a`` against ``b``."""
    d = _differences(a, b)
    n = len(d)
    if n < 2:
        return math.nan
    sd = d.std(ddof=1)
    mean = d.mean()
    if sd == 0.0 or not np.isfinite(sd):
        return 1.0 if mean == 0.0 else 0.0
    t = mean / (sd / math.sqrt(n))
    df = n - 1
    return min(1.0, max(0.0, betainc(df / 2.0, 0.5, df / (df + t * t))))


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    average = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def _exact_signed_rank_counts(n: int) -> np.ndarray:
    """Number of sign assignments giving each W+ in 0..n(n+1)/2."""
    counts = np.zeros(n * (n + 1) // 2 + 1, dtype=np.float64)
    counts[0] = 1.0
    for i in range(1, n + 1):
        counts[i:] = counts[i:] + counts[:-i].copy()
    return counts


def _signed_rank_sums(ranks: np.ndarray) -> np.ndarray:
    """W+ under every one of the 2^n sign assignments of ``ranks`` (n <= 13)."""
    signs = (np.arange(2 ** len(ranks))[:, None] >> np.arange(len(ranks))[None, :]) & 1
    return signs @ ranks


def wilcoxon_signed_rank(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of ``a`` against ``b`` (see the module docstring)."""
    d_all = _differences(a, b)
    d = d_all[d_all != 0.0]
    n = len(d)
    if n == 0:
        return 1.0
    ranks = rankdata(np.abs(d))
    r_plus = float(ranks[d > 0].sum())
    _, tie_counts = np.unique(np.abs(d), return_counts=True)
    exact = len(d_all) <= 50 and n == len(d_all) and np.all(tie_counts == 1)
    if exact:  # the exact null distribution of W+
        counts = _exact_signed_rank_counts(n)
        w = round(r_plus)
        p_low, p_high = counts[: w + 1].sum() / counts.sum(), counts[w:].sum() / counts.sum()
        return min(1.0, 2.0 * min(p_low, p_high))
    if len(d_all) <= 13:  # ties or zeros: all sign flips of the observed ranks (scipy's permutation test)
        null = _signed_rank_sums(ranks)
        tol = 1e-12 * max(abs(r_plus), 1.0)
        return min(1.0, 2.0 * min(np.mean(null <= r_plus + tol), np.mean(null >= r_plus - tol)))
    mean = n * (n + 1) / 4.0
    var = n * (n + 1) * (2 * n + 1) / 24.0 - float((tie_counts**3 - tie_counts).sum()) / 48.0
    if var <= 0.0:
        return 1.0
    z = (r_plus - mean) / math.sqrt(var)
    return min(1.0, math.erfc(abs(z) / math.sqrt(2.0)))


def paired_pvalue(a: Sequence[float], b: Sequence[float], test: str = "ttest") -> float:
    """p-value of the paired ``test`` ('ttest' or 'wilcoxon') of ``a`` against ``b``."""
    if test == "ttest":
        return paired_ttest(a, b)
    if test == "wilcoxon":
        return wilcoxon_signed_rank(a, b)
    raise ValueError(f"unknown test {test!r}; expected one of {TESTS}")


def silhouette_score(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient of ``labels`` over points ``x`` (Euclidean), as sklearn computes it
    (a point alone in its cluster scores 0); nan unless there are 2 .. n-1 clusters."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    n = len(x)
    if not 2 <= len(classes) <= n - 1:
        return math.nan
    sq = (x * x).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))
    np.fill_diagonal(dist, 0.0)
    onehot = np.eye(len(classes))[inverse]  # (n, c)
    sums = dist @ onehot  # distance of each point to every cluster, summed
    sizes = onehot.sum(0)
    own = sizes[inverse]
    a = np.where(own > 1, sums[np.arange(n), inverse] / np.maximum(own - 1, 1), 0.0)
    other = np.where(onehot.astype(bool), np.inf, sums / sizes)
    b = other.min(1)
    denom = np.maximum(a, b)
    s = np.where((own > 1) & (denom > 0), (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(s.mean())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
