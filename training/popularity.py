"""The popularity ranker: an evaluation-only, non-personalised baseline (nothing to train).

* warm protocol: every user gets the items ranked by their number of training interactions;
* cold_items protocol: held-out items have no interactions, so their popularity is predicted from
  content: a ridge regression of ``log(1 + train count)`` on the standardised features of the warm
  items (closed form, ``ridge`` = 1.0 by default), applied to the held-out items' features.

Both are scored with the same evaluators as the trained models (:func:`training.trainer.evaluate_split`'s
masking, :func:`training.coldstart.evaluate_cold_scores`).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from training.coldstart import evaluate_cold_scores, split_for
from training.data import RecData
from training.evaluate import EvalResult, add_untrained_slice, full_rank_evaluate

if TYPE_CHECKING:
    from training.config import RunConfig


def item_counts(pairs: np.ndarray, n_items: int) -> np.ndarray:
    """Number of interactions of every item in ``pairs`` (float64, length ``n_items``)."""
    return np.bincount(np.asarray(pairs)[:, 1], minlength=n_items).astype(np.float64)


def content_popularity(
    features: np.ndarray, counts: np.ndarray, new_features: np.ndarray, ridge: float = 1.0
) -> np.ndarray:
    """Predicted ``log(1 + count)`` of items with features ``new_features`` from a ridge regression fitted
    on (``features``, ``counts``); features are standardised with the fitted items' statistics."""
    x = np.asarray(features, dtype=np.float64)
    mean, std = x.mean(0), np.maximum(x.std(0, ddof=1) if len(x) > 1 else np.ones(x.shape[1]), 1e-6)
    x = (x - mean) / std
    y = np.log1p(np.asarray(counts, dtype=np.float64))
    y_mean = y.mean()
    n, d = x.shape
    if n < d:  # dual form: (X X^T + lambda I) alpha = y, w = X^T alpha
        weights = x.T @ np.linalg.solve(x @ x.T + ridge * np.eye(n), y - y_mean)
    else:
        weights = np.linalg.solve(x.T @ x + ridge * np.eye(d), x.T @ (y - y_mean))
    return ((np.asarray(new_features, dtype=np.float64) - mean) / std) @ weights + y_mean


def _broadcast(scores: np.ndarray):
    row = torch.from_numpy(scores.astype(np.float32))
    return lambda users: row.to(users.device).expand(len(users), -1)


def popularity_scores(train: np.ndarray, n_items: int):
    """The warm protocol's scorer: every user gets the items' numbers of ``train`` interactions."""
    return _broadcast(item_counts(train, n_items))


def evaluate_popularity(cfg: RunConfig, data: RecData) -> tuple[EvalResult, EvalResult]:
    """(valid, test) results of the popularity ranker under ``cfg.data.protocol``."""
    train = cfg.train
    if cfg.data.protocol == "cold_items":
        split = split_for(cfg, data)
        warm = split.warm
        predicted = content_popularity(
            warm.item_features(), item_counts(warm.train, warm.n_items), split.cold_item_features()
        )
        score = _broadcast(predicted)
        return tuple(  # type: ignore[return-value]
            evaluate_cold_scores(score, split, which, train.ks, train.eval_batch_size, train.device)
            for which in ("valid", "test")
        )
    score = popularity_scores(data.train, data.n_items)
    valid = full_rank_evaluate(
        score, data.valid, [data.train], data.n_users, data.n_items, train.ks, train.eval_batch_size, train.device
    )
    evaluate = partial(
        full_rank_evaluate,
        score,
        exclude=[data.train, data.valid],
        n_users=data.n_users,
        n_items=data.n_items,
        ks=train.ks,
        batch_size=train.eval_batch_size,
        device=train.device,
    )
    test = evaluate(targets=data.test)
    add_untrained_slice(test, evaluate, data.test, data.train, data.n_items)
    return valid, test
