"""Test metrics on slices of the test interactions by the popularity of their item.

On micro-video data much of a ranking metric is earned on a few very popular items, so two models level on
the whole can differ in where they win: at the head or in the long tail (docs/results.md, "Where the
models differ"). Each slice is
scored as :func:`training.trainer.evaluate_split` scores the test split (the same masks, every item ranked),
restricted to the test interactions whose item is in the slice, as the slice of items without training
interactions is (:func:`training.evaluate.add_untrained_slice`).
"""

from __future__ import annotations

import numpy as np
import torch

from training.data import RecData
from training.evaluate import EvalResult, ScoreFn, full_rank_evaluate
from training.popularity import item_counts

# Shares of the items, ordered by training interactions (most first): the head to the tail.
POPULARITY_SLICES: tuple[tuple[float, float], ...] = ((0.0, 0.01), (0.01, 0.05), (0.05, 0.2), (0.2, 1.0))


def slice_name(low: float, high: float) -> str:
    return f"items ranked {low:.0%}-{high:.0%} by popularity"


def popularity_slices(
    train: np.ndarray, n_items: int, bounds: tuple[tuple[float, float], ...] = POPULARITY_SLICES
) -> list[np.ndarray]:
    """Item ids of each slice of the items ordered by their number of ``train`` interactions, most first
    (ties by id); a slice ``(low, high)`` holds the items at positions ``[round(low n), round(high n))``."""
    for low, high in bounds:
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"a popularity slice must satisfy 0 <= low < high <= 1, got ({low}, {high})")
    counts = item_counts(train, n_items)
    order = np.lexsort((np.arange(n_items), -counts))
    return [order[round(low * n_items) : round(high * n_items)] for low, high in bounds]


def embedding_scores(users: np.ndarray, items: np.ndarray) -> ScoreFn:
    """Scores :math:`e_u^\\top e_i` from a run's saved final embeddings."""
    user_table, item_table = torch.from_numpy(users).float(), torch.from_numpy(items).float()
    return lambda batch: user_table[batch.cpu()] @ item_table.T


def evaluate_slices(
    score: ScoreFn, data: RecData, slices: list[np.ndarray], ks: tuple[int, ...], batch_size: int = 1024
) -> list[EvalResult | None]:
    """The test split's metrics restricted to each slice's items (``None`` for a slice without test
    interactions)."""
    results: list[EvalResult | None] = []
    for items in slices:
        targets = data.test[np.isin(data.test[:, 1], items)]
        if not len(targets):
            results.append(None)
            continue
        results.append(
            full_rank_evaluate(
                score, targets, [data.train, data.valid], data.n_users, data.n_items, ks=ks, batch_size=batch_size
            )
        )
    return results
