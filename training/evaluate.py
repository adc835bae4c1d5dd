"""Full-ranking top-K evaluation for implicit-feedback recommendation.

Protocol (as in the MetaMMF authors' code and MMRec): every user with at least one target
interaction is scored against *all* items; items the user interacted with in the ``exclude``
splits (e.g. ``[train]`` when validating, ``[train, valid]`` when testing) are masked to
``-inf``; the top ``max(ks)`` items are taken with :func:`torch.topk` (its tie order is kept).

For a user ``u`` with target set ``T_u`` (duplicates removed), top-K list ``L_u`` and
``hits_u@K = |L_u[:K] ∩ T_u|`` (binary relevance):

* ``precision@K = hits_u@K / K``
* ``recall@K    = hits_u@K / |T_u|``
* ``ndcg@K      = DCG_u@K / IDCG_u@K`` with
  ``DCG_u@K  = sum_{p < K, L_u[p] in T_u} 1 / log2(p + 2)`` (``p`` 0-based) and
  ``IDCG_u@K = sum_{p < min(|T_u|, K)} 1 / log2(p + 2)``
* ``hit@K`` (hit ratio, the paper's HR) ``= sum_u hits_u@K / sum_u |T_u|``, i.e. pooled over all
  target interactions rather than averaged per user.

``metrics["precision@K"]``, ``["recall@K"]`` and ``["ndcg@K"]`` are means over evaluated users;
``metrics["hit@K"]`` is the pooled ratio above, while ``per_user["hit@K"]`` holds ``hits_u@K``.

A target item that is also excluded for the same user can never be hit, but still counts in
``|T_u|`` (as in MMRec). When K exceeds the number of items, only ``n_items`` positions exist;
precision is still divided by K.

Per-user item lists are stored once in CSR form (``np.argsort`` + ``np.searchsorted``) and each
batch of users gets dense ``(batch, n_items)`` boolean masks built by vectorised indexing, so
memory is bounded by ``batch_size * n_items``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["METRIC_NAMES", "EvalResult", "full_rank_evaluate", "topk_items"]

METRIC_NAMES: tuple[str, ...] = ("recall", "ndcg", "precision", "hit")

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    """Outcome of :func:`full_rank_evaluate`.

    ``metrics`` maps ``"<name>@<K>"`` (name in ``recall``, ``ndcg``, ``precision``, ``hit``) to the
    aggregate value; ``users`` holds the evaluated users (sorted, int64) and ``per_user`` the
    per-user values aligned with ``users`` (for ``hit@K`` the user's number of hits). An evaluator that
    reports several rankings under prefixed metrics (``all_recall@20``, ...) keeps each prefix's own result,
    with its per-user values, in ``rankings`` (e.g. ``rankings["all"]``).
    """

    metrics: dict[str, float]
    users: np.ndarray
    per_user: dict[str, np.ndarray] = field(default_factory=dict)
    rankings: dict[str, EvalResult] = field(default_factory=dict)

    def save_per_user(self, path: str | os.PathLike[str]) -> None:
        """Write ``users`` and every per-user array to an ``.npz`` file (no pickling needed).

        Arrays are stored under ``"users"`` and the metric keys (e.g. ``"recall@20"``); as with
        :func:`numpy.savez`, ``.npz`` is appended to ``path`` if missing.
        """
        arrays = {"users": np.asarray(self.users, dtype=np.int64)}
        for key, values in self.per_user.items():
            if key == "users":
                raise ValueError("per-user metric key 'users' clashes with the users array")
            arrays[key] = np.asarray(values)
        np.savez(path, **arrays)


class _UserItemIndex:
    """CSR-style user -> item lists for fast per-batch dense mask construction."""

    def __init__(self, pairs: np.ndarray, n_users: int) -> None:
        order = np.argsort(pairs[:, 0], kind="stable")
        sorted_users = pairs[order, 0]
        self.items = np.ascontiguousarray(pairs[order, 1], dtype=np.int64)
        self.indptr = np.searchsorted(sorted_users, np.arange(n_users + 1, dtype=np.int64), side="left")

    def counts(self, users: np.ndarray) -> np.ndarray:
        return self.indptr[users + 1] - self.indptr[users]

    def gather(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) coordinates of all items of ``users``; row indexes into ``users``."""
        starts = self.indptr[users]
        counts = self.indptr[users + 1] - starts
        total = int(counts.sum())
        rows = np.repeat(np.arange(len(users), dtype=np.int64), counts)
        # position inside each user's run = global position - start of that run in the output
        run_offsets = np.cumsum(counts) - counts
        within = np.arange(total, dtype=np.int64) - np.repeat(run_offsets, counts)
        cols = self.items[np.repeat(starts, counts) + within]
        return rows, cols

    def dense_mask(self, users: np.ndarray, n_items: int, device: torch.device) -> torch.Tensor:
        rows, cols = self.gather(users)
        mask = torch.zeros((len(users), n_items), dtype=torch.bool, device=device)
        if len(rows):
            mask[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = True
        return mask


def _check_pairs(pairs: np.ndarray, n_users: int, n_items: int, what: str) -> np.ndarray:
    arr = np.asarray(pairs)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what}: expected an (n, 2) array of (user, item) pairs, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: expected integer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr[:, 0].min() < 0 or arr[:, 0].max() >= n_users:
        raise ValueError(f"{what}: user index out of range [0, {n_users})")
    if arr[:, 1].min() < 0 or arr[:, 1].max() >= n_items:
        raise ValueError(f"{what}: item index out of range [0, {n_items})")
    return arr


def _exclude_index(exclude: Sequence[np.ndarray], n_users: int, n_items: int) -> _UserItemIndex:
    parts = [_check_pairs(p, n_users, n_items, f"exclude[{i}]") for i, p in enumerate(exclude)]
    pairs = np.concatenate(parts, axis=0) if parts else np.zeros((0, 2), dtype=np.int64)
    return _UserItemIndex(pairs, n_users)


def _check_sizes(n_users: int, n_items: int, batch_size: int) -> None:
    if n_users <= 0 or n_items <= 0:
        raise ValueError(f"n_users and n_items must be positive, got {n_users}, {n_items}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def _masked_scores(
    score_fn: ScoreFn,
    users: np.ndarray,
    excl: _UserItemIndex,
    n_items: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of ``users`` with excluded items at ``-inf``, plus the boolean exclusion mask."""
    user_t = torch.from_numpy(users).to(device)
    scores = score_fn(user_t)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (len(users), n_items):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"score_fn must return a ({len(users)}, {n_items}) tensor, got {shape}")
    scores = scores.detach().to(device)
    if not scores.is_floating_point():
        scores = scores.float()
    mask = excl.dense_mask(users, n_items, device)
    return scores.masked_fill(mask, float("-inf")), mask


def full_rank_evaluate(
    score_fn: ScoreFn,
    targets: np.ndarray,
    exclude: Sequence[np.ndarray],
    n_users: int,
    n_items: int,
    ks: Sequence[int] = (10, 20),
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> EvalResult:
    """Full-ranking evaluation of ``score_fn`` on ``targets`` (see the module docstring).

    ``score_fn`` maps a ``(b,)`` int64 user tensor (on ``device``) to ``(b, n_items)`` scores; it is
    called under :func:`torch.no_grad` for batches of at most ``batch_size`` users. ``targets`` are
    the (user, item) pairs to retrieve (duplicates ignored); items of ``exclude`` pairs are masked
    for their user. Users without targets are not evaluated. With no target at all every metric
    is 0.0 and the per-user arrays are empty.
    """
    _check_sizes(n_users, n_items, batch_size)
    ks_sorted = sorted({int(k) for k in ks})
    if not ks_sorted or ks_sorted[0] <= 0:
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {list(ks)}")
    dev = torch.device(device)

    tgt_pairs = _check_pairs(targets, n_users, n_items, "targets")
    tgt_pairs = np.unique(tgt_pairs, axis=0) if len(tgt_pairs) else tgt_pairs
    tgt = _UserItemIndex(tgt_pairs, n_users)
    excl = _exclude_index(exclude, n_users, n_items)
    users = np.unique(tgt_pairs[:, 0]).astype(np.int64)
    n_targets = tgt.counts(users).astype(np.float64)

    k_max = ks_sorted[-1]
    k_eff = min(k_max, n_items)
    discounts = 1.0 / np.log2(np.arange(k_max, dtype=np.float64) + 2.0)
    ideal_cum = np.cumsum(discounts)

    hit_rows: list[np.ndarray] = []
    starts = range(0, len(users), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="evaluate", unit="batch", disable=not show_progress):
            batch = users[start : start + batch_size]
            scores, excl_mask = _masked_scores(score_fn, batch, excl, n_items, dev)
            tgt_mask = tgt.dense_mask(batch, n_items, dev) & ~excl_mask
            top_idx = torch.topk(scores, k_eff, dim=1, sorted=True).indices
            hits = torch.gather(tgt_mask, 1, top_idx).cpu().numpy()
            if k_eff < k_max:
                hits = np.pad(hits, ((0, 0), (0, k_max - k_eff)))
            hit_rows.append(hits)

    hits_all = np.concatenate(hit_rows, axis=0) if hit_rows else np.zeros((0, k_max), dtype=bool)
    hits_f = hits_all.astype(np.float64)
    hits_cum = np.cumsum(hits_f, axis=1)
    dcg_cum = np.cumsum(hits_f * discounts, axis=1)

    metrics: dict[str, float] = {}
    per_user: dict[str, np.ndarray] = {}
    total_targets = float(n_targets.sum())
    for k in ks_sorted:
        n_hit = hits_cum[:, k - 1]
        idcg = ideal_cum[np.minimum(n_targets, k).astype(np.int64) - 1]
        per_user[f"recall@{k}"] = n_hit / n_targets
        per_user[f"ndcg@{k}"] = dcg_cum[:, k - 1] / idcg
        per_user[f"precision@{k}"] = n_hit / k
        per_user[f"hit@{k}"] = n_hit
        for name in ("recall", "ndcg", "precision"):
            key = f"{name}@{k}"
            metrics[key] = float(per_user[key].mean()) if len(users) else 0.0
        metrics[f"hit@{k}"] = float(n_hit.sum() / total_targets) if total_targets > 0 else 0.0

    keys = [f"{name}@{k}" for k in ks_sorted for name in METRIC_NAMES]
    return EvalResult(
        metrics={key: metrics[key] for key in keys},
        users=users,
        per_user={key: per_user[key] for key in keys},
    )


def topk_items(
    score_fn: ScoreFn,
    users: np.ndarray,
    exclude: Sequence[np.ndarray],
    n_users: int,
    n_items: int,
    k: int,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items for each of ``users`` (in the given order, repeats allowed), with masking.

    Returns ``(items, scores)``: int64 and float32 arrays of shape ``(len(users), k)``, best first,
    items of ``exclude`` pairs removed for their user. When a user has fewer than ``k`` allowed items
    the remaining slots hold item ``-1`` with score ``-inf`` (the FAISS convention).
    """
    _check_sizes(n_users, n_items, batch_size)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    user_arr = np.asarray(users)
    if user_arr.ndim != 1 or (user_arr.size and not np.issubdtype(user_arr.dtype, np.integer)):
        raise ValueError("users must be a 1-D integer array")
    user_arr = user_arr.astype(np.int64, copy=False)
    if user_arr.size and (user_arr.min() < 0 or user_arr.max() >= n_users):
        raise ValueError(f"users: index out of range [0, {n_users})")
    dev = torch.device(device)
    excl = _exclude_index(exclude, n_users, n_items)

    k_eff = min(k, n_items)
    items_out = np.full((len(user_arr), k), -1, dtype=np.int64)
    scores_out = np.full((len(user_arr), k), -math.inf, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(user_arr), batch_size):
            batch = user_arr[start : start + batch_size]
            scores, excl_mask = _masked_scores(score_fn, batch, excl, n_items, dev)
            top = torch.topk(scores, k_eff, dim=1, sorted=True)
            valid = ~torch.gather(excl_mask, 1, top.indices)
            idx = torch.where(valid, top.indices, torch.full_like(top.indices, -1))
            vals = torch.where(valid, top.values, torch.full_like(top.values, -math.inf))
            items_out[start : start + len(batch), :k_eff] = idx.cpu().numpy()
            scores_out[start : start + len(batch), :k_eff] = vals.float().cpu().numpy()
    return items_out, scores_out


def add_untrained_slice(
    result: EvalResult,
    evaluate: Callable[..., EvalResult],
    targets: np.ndarray,
    train: np.ndarray,
    n_items: int,
) -> None:
    """Add ``untrained_<metric>`` to ``result``: ``evaluate(targets=...)`` (the same ranking and masks) on
    the ``targets`` whose item has no interaction in ``train``; nothing when there are none."""
    untrained = np.bincount(np.asarray(train)[:, 1], minlength=n_items) == 0
    targets = np.asarray(targets)
    if not len(targets) or not untrained[targets[:, 1]].any():
        return
    sliced = evaluate(targets=targets[untrained[targets[:, 1]]])
    result.metrics.update({f"untrained_{key}": value for key, value in sliced.metrics.items()})
