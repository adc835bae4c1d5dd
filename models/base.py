"""The small contract every recommender here implements, so a new baseline is one new file."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from models.config import ModelConfig


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    r"""Bayesian personalised ranking: :math:`-\frac{1}{B}\sum \ln \sigma(\hat y_{ui} - \hat y_{uj})`."""
    return F.softplus(neg_scores - pos_scores).mean()


def in_batch_softmax_loss(
    users: Tensor, pos_items: Tensor, neg_items: Tensor, u: Tensor, pos: Tensor, neg: Tensor, temperature: float
) -> Tensor:
    r"""Sampled softmax over the batch's items: each (user, positive) pair b against every positive and negative
    item of the batch,

    .. math::
        -\frac{1}{B}\sum_b \ln \frac{\exp(u_b^\top v_b / \tau)}{\sum_{j \in C_b} \exp(u_b^\top v_j / \tau)},

    where :math:`C_b` holds the batch's 2B items (``pos`` then ``neg``) less the items that are positives of b's
    user in this batch (other than b's own column), which are not negatives. The batch's ids (``users``,
    ``pos_items``, ``neg_items``, (B,) each) find those; ``u``, ``pos``, ``neg`` (B, d) are their embeddings. Its
    memory is B x 2B scores."""
    logits = (u @ torch.cat([pos, neg]).T).float() / temperature
    items = torch.cat([pos_items, neg_items])
    width = int(torch.maximum(items.max(), users.max())) + 1
    positives = users * width + pos_items
    not_negative = torch.isin(users.unsqueeze(1) * width + items.unsqueeze(0), positives)
    not_negative.fill_diagonal_(False)
    logits = logits.masked_fill(not_negative, float("-inf"))
    return F.cross_entropy(logits, torch.arange(users.shape[0], device=logits.device))


def l2_penalty(*tensors: Tensor) -> Tensor:
    r""":math:`\frac{1}{2B}\sum_t \lVert t \rVert_2^2` over batch representations (B = rows of the first)."""
    return sum(t.pow(2).sum() for t in tensors) / (2 * tensors[0].shape[0])


@dataclass(frozen=True)
class ModelInputs:
    """What a model is built from, derived from the data set (training interactions only).

    Attributes:
        n_users: number of users.
        item_features: (n_items, d_x) float32 raw features, modalities concatenated in
            ``modality_dims`` order.
        modality_dims: modality name -> width, in the column order of ``item_features``.
        train_pairs: (n, 2) int64 training (user, item) pairs: the interaction graph.
    """

    n_users: int
    item_features: Tensor
    modality_dims: dict[str, int]
    train_pairs: Tensor

    def __post_init__(self) -> None:
        if sum(self.modality_dims.values()) != self.item_features.shape[1]:
            raise ValueError(
                f"modality widths {self.modality_dims} do not add up to the {self.item_features.shape[1]} "
                "feature columns"
            )

    @property
    def n_items(self) -> int:
        return int(self.item_features.shape[0])

    @property
    def modality_slices(self) -> dict[str, slice]:
        """Columns of each modality in ``item_features``."""
        slices, start = {}, 0
        for name, dim in self.modality_dims.items():
            slices[name] = slice(start, start + dim)
            start += dim
        return slices


class RecModel(nn.Module, ABC):
    """A trainable recommender over ``n_users`` x ``n_items``, built from the data set's :class:`ModelInputs`,
    its config (the class registered with it in :mod:`models.registry`) and the L2 weight.

    Subclasses implement :meth:`get_embedding` (final user and item embeddings, scores are their inner
    products) and :meth:`calculate_loss`; :meth:`full_sort_predict` scores all items for a batch of
    users from embeddings cached by :meth:`prepare_inference`. A model that reads item content implements
    :meth:`embed_unseen_items`, and the trainer calls :meth:`on_epoch_start` before each epoch.
    """

    def __init__(self, inputs: ModelInputs, config: ModelConfig, reg_weight: float = 1e-4) -> None:
        super().__init__()
        self.config = config
        self.n_users, self.n_items = inputs.n_users, inputs.n_items
        self.reg_weight = reg_weight
        self._cache: tuple[Tensor, Tensor] | None = None

    @abstractmethod
    def get_embedding(self) -> tuple[Tensor, Tensor]:
        """Final (user_embeddings (n_users, d), item_embeddings (n_items, d))."""

    @abstractmethod
    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        """Training loss (:meth:`ranking_loss` + L2) for a batch of (user, positive item, negative item) triples."""

    @torch.no_grad()
    def prepare_inference(self) -> None:
        """Compute and cache the final embeddings once before many :meth:`full_sort_predict` calls."""
        self._cache = tuple(t.detach().clone() for t in self.get_embedding())  # a snapshot, not live weights

    def ranking_loss(
        self, users: Tensor, pos_items: Tensor, neg_items: Tensor, u: Tensor, pos: Tensor, neg: Tensor
    ) -> Tensor:
        """The ranking part of the loss, by the config's ``loss``: BPR on each (user, positive, negative) triple,
        or the sampled softmax over the batch's items (:func:`in_batch_softmax_loss`). ``u``, ``pos``,
        ``neg``: the embeddings of ``users``, ``pos_items``, ``neg_items``."""
        if self.config.loss == "softmax":
            return in_batch_softmax_loss(users, pos_items, neg_items, u, pos, neg, self.config.softmax_temperature)
        return bpr_loss((u * pos).sum(-1), (u * neg).sum(-1))

    def on_epoch_start(self) -> None:
        """Called by the trainer before each epoch (a model that keeps per-epoch state refreshes it)."""

    def embed_unseen_items(self, features: Tensor) -> Tensor:
        """Final embeddings (b, d) of items outside the training data from their raw features (b, d_x),
        scored against the trained users like any item (the cold-item protocol, :mod:`training.coldstart`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot embed items it never saw from their content")

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
