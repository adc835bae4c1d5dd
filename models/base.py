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


def sampled_softmax_loss(
    users: Tensor,
    pos_items: Tensor,
    neg_items: Tensor,
    u: Tensor,
    pos: Tensor,
    neg: Tensor,
    temperature: float,
    negatives: int,
) -> Tensor:
    r"""Sampled softmax with shared negatives: each (user, positive) pair b against the batch's first M sampled
    negatives (uniform over the items, as the rows are shuffled, unless ``train.negative_candidates`` picks hard
    ones),

    .. math::
        -\frac{1}{B}\sum_b \ln \frac{\exp(u_b^\top v_b / \tau)}
            {\exp(u_b^\top v_b / \tau) + \sum_{j \le M,\ j \notin P_b} \exp(u_b^\top v_{n_j} / \tau)},

    where :math:`P_b` are the shared negatives that are positives of b's user in this batch (not negatives for
    it). The batch's ids (``users``, ``pos_items``, ``neg_items``, (B,) each) find those; ``u``, ``pos``, ``neg``
    (B, d) are their embeddings. Its cost is B x (M + 1) scores."""
    shared = min(negatives, neg_items.shape[0])
    negative_ids = neg_items[:shared]
    u = u / temperature
    logits = torch.cat([(u * pos).sum(-1, keepdim=True), u @ neg[:shared].T], dim=1).float()
    not_negative = torch.zeros_like(logits, dtype=torch.bool)
    not_negative[:, 1:] = pos_items.unsqueeze(1) == negative_ids.unsqueeze(0)  # the row's own positive
    # The other positives of the row's user: few rows share a user, so their pairs are matched one by one.
    _, user_of_row, rows_per_user = torch.unique(users, return_inverse=True, return_counts=True)
    repeated = (rows_per_user[user_of_row] > 1).nonzero().squeeze(1)  # rows whose user has other rows
    rows, others = (users[repeated].unsqueeze(1) == users[repeated].unsqueeze(0)).nonzero(as_tuple=True)
    rows, others = repeated[rows], repeated[others]
    for start in range(0, rows.shape[0], 4096):
        chunk = slice(start, start + 4096)
        pair, column = (pos_items[others[chunk]].unsqueeze(1) == negative_ids.unsqueeze(0)).nonzero(as_tuple=True)
        not_negative[rows[chunk][pair], column + 1] = True
    logits = logits.masked_fill(not_negative, float("-inf"))
    return F.cross_entropy(logits, torch.zeros(users.shape[0], dtype=torch.long, device=logits.device))


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    r"""Symmetric InfoNCE between two views of the same n rows: row i of ``a`` must pick out row i of ``b``
    among all rows of ``b`` by cosine similarity, and the other way round,

    .. math::
        -\frac{1}{2n}\sum_i \Big(\ln \frac{e^{\cos(a_i, b_i)/\tau}}{\sum_j e^{\cos(a_i, b_j)/\tau}}
            + \ln \frac{e^{\cos(a_i, b_i)/\tau}}{\sum_j e^{\cos(a_j, b_i)/\tau}}\Big)."""
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


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
        or the sampled softmax against the batch's shared negatives (:func:`sampled_softmax_loss`). ``u``,
        ``pos``, ``neg``: the embeddings of ``users``, ``pos_items``, ``neg_items``."""
        if self.config.loss == "softmax":
            config = self.config
            return sampled_softmax_loss(
                users, pos_items, neg_items, u, pos, neg, config.softmax_temperature, config.softmax_negatives
            )
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
