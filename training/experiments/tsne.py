"""The representation study (the paper's Figure 4): users and the items they interacted with, in 2-D.

:func:`tsne` uses scikit-learn's ``TSNE`` when it is installed, else the exact (O(n^2)) t-SNE below,
which is fine for the few hundred points of a sample: perplexity-calibrated affinities (bisection on the
Gaussian precision), early exaggeration 12 for 250 iterations, momentum 0.5 then 0.8 (the second stage
starting afresh, as scikit-learn's), adaptive gains,
PCA initialisation, learning rate ``max(n / 48, 50)`` (scikit-learn's ``'auto'``).
"""

from __future__ import annotations

import numpy as np

from training.data import RecData

EXAGGERATED_ITERATIONS = 250


def _affinities(x: np.ndarray, perplexity: float) -> np.ndarray:
    """Symmetric joint probabilities P of exact t-SNE."""
    sq = (x * x).sum(1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    n = len(x)
    target = np.log(perplexity)
    lo, hi = np.full(n, -50.0), np.full(n, 50.0)  # bisection on log(precision), all rows at once
    off_diagonal = ~np.eye(n, dtype=bool)
    for _ in range(100):
        beta = np.exp((lo + hi) / 2.0)[:, None]
        logits = -dist * beta
        logits = np.where(off_diagonal, logits - logits[off_diagonal].reshape(n, n - 1).max(1, keepdims=True), -np.inf)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        entropy = -(p * np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(1)
        too_flat = entropy > target  # too wide a kernel: raise the precision
        lo = np.where(too_flat, (lo + hi) / 2.0, lo)
        hi = np.where(too_flat, hi, (lo + hi) / 2.0)
    joint = (p + p.T) / (2.0 * n)
    return np.maximum(joint, 1e-12)


def _tsne_numpy(x: np.ndarray, perplexity: float, n_iter: int, seed: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    p = _affinities(x, perplexity)
    centered = x - x.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    y = centered @ vt[:2].T if vt.shape[0] >= 2 else np.random.default_rng(seed).standard_normal((n, 2))
    y = y / max(float(y[:, 0].std()), 1e-12) * 1e-4
    y += np.random.default_rng(seed).standard_normal(y.shape) * 1e-8  # break exact ties
    lr = max(n / 12.0 / 4.0, 50.0)
    update, gains = np.zeros_like(y), np.ones_like(y)
    for it in range(n_iter):
        exaggeration, momentum = (12.0, 0.5) if it < EXAGGERATED_ITERATIONS else (1.0, 0.8)
        if it == EXAGGERATED_ITERATIONS:
            # A fresh start for the second stage, as scikit-learn's two gradient-descent runs: the last
            # exaggerated steps carried on with momentum 0.8 overshoot and tear clusters apart for a while.
            update, gains = np.zeros_like(y), np.ones_like(y)
        sq = (y * y).sum(1)
        num = 1.0 / (1.0 + np.maximum(sq[:, None] + sq[None, :] - 2.0 * y @ y.T, 0.0))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        w = (exaggeration * p - q) * num
        grad = 4.0 * (np.diag(w.sum(1)) - w) @ y
        same_sign = np.sign(grad) == np.sign(update)
        gains = np.maximum(np.where(same_sign, gains * 0.8, gains + 0.2), 0.01)
        update = momentum * update - lr * gains * grad
        y = y + update
    return y - y.mean(0)


def tsne(x: np.ndarray, perplexity: float = 30.0, n_iter: int = 1000, seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates of the rows of ``x`` (perplexity capped at (n - 1) / 3)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {len(x)}")
    perplexity = float(min(perplexity, max(1.0, (len(x) - 1) / 3.0)))
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return _tsne_numpy(x, perplexity, n_iter, seed)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def sample_users(data: RecData, n_users: int, seed: int = 0, min_items: int = 5) -> np.ndarray:
    """``n_users`` users (seeded) among those with at least ``min_items`` interactions (all splits)."""
    pairs = np.concatenate([data.train, data.valid, data.test])
    counts = np.bincount(pairs[:, 0], minlength=data.n_users)
    eligible = np.flatnonzero(counts >= min_items)
    if len(eligible) < 2:
        eligible = np.flatnonzero(counts > 0)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(eligible, size=min(n_users, len(eligible)), replace=False))


def user_item_points(
    data: RecData, users: np.ndarray, user_emb: np.ndarray, item_emb: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points, labels, is_user): each sampled user and the items they interacted with (any split),
    labelled by the user; items shared by several sampled users are left out (ambiguous label)."""
    pairs = np.concatenate([data.train, data.valid, data.test])
    pairs = pairs[np.isin(pairs[:, 0], users)]
    items, owners = np.unique(pairs[:, 1], return_counts=True)
    unique_items = set(items[owners == 1].tolist())
    pairs = pairs[[int(i) in unique_items for i in pairs[:, 1]]] if len(pairs) else pairs
    points = np.concatenate([user_emb[users], item_emb[pairs[:, 1]]])
    labels = np.concatenate([users, pairs[:, 0]])
    is_user = np.r_[np.ones(len(users), dtype=bool), np.zeros(len(pairs), dtype=bool)]
    return points.astype(np.float64), labels, is_user
