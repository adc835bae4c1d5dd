"""The small contract every recommender here implements, so a new baseline is one new file."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    r"""Bayesian personalised ranking: :math:`-\frac{1}{B}\sum \ln \sigma(\hat y_{ui} - \hat y_{uj})`."""
    return F.softplus(neg_scores - pos_scores).mean()


def l2_penalty(*tensors: Tensor) -> Tensor:
    r""":math:`\frac{1}{2B}\sum_t \lVert t \rVert_2^2` over batch representations (B = rows of the first)."""
    return sum(t.pow(2).sum() for t in tensors) / (2 * tensors[0].shape[0])


class RecModel(nn.Module, ABC):
    """A trainable recommender over ``n_users`` x ``n_items``.

    Subclasses implement :meth:`get_embedding` (final user and item embeddings, scores are their inner
    products) and :meth:`calculate_loss`; :meth:`full_sort_predict` scores all items for a batch of
    users from embeddings cached by :meth:`prepare_inference`.
    """

    n_users: int
    n_items: int

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple[Tensor, Tensor] | None = None

    @abstractmethod
    def get_embedding(self) -> tuple[Tensor, Tensor]:
        """Final (user_embeddings (n_users, d), item_embeddings (n_items, d))."""

    @abstractmethod
    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        """Training loss (BPR + L2) for a batch of (user, positive item, negative item) triples."""

    @torch.no_grad()
    def prepare_inference(self) -> None:
        """Compute and cache the final embeddings once before many :meth:`full_sort_predict` calls."""
        self._cache = tuple(t.detach().clone() for t in self.get_embedding())  # a snapshot, not live weights

    def on_epoch_start(self) -> None:
        """Called by the trainer before each epoch (a model that keeps per-epoch state refreshes it)."""

    def clear_inference_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True) -> RecModel:
        self._cache = None  # parameters may change: cached embeddings are stale
        return super().train(mode)

    @torch.no_grad()
    def full_sort_predict(self, users: Tensor) -> Tensor:
        """Scores (len(users), n_items) of every item for each user."""
        user_emb, item_emb = self._cache if self._cache is not None else self.get_embedding()
        return user_emb[users] @ item_emb.T

    @torch.no_grad()
    def recommend(self, users: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
        """Top-``k`` item indices per user; ``exclude`` is an optional (len(users), n_items) bool mask."""
        scores = self.full_sort_predict(users)
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        return scores.topk(k, dim=-1).indices
