"""Items the model has no interactions for: a new item posted online, a held-out item, or an item of the
training catalogue that nobody interacted with in training.

Such an item is represented by its content alone: its fused features :math:`e_i^m`, the mean ID
embedding in place of its own :math:`e_i^c`, and (with a graph backbone) the graph layers of a node
without neighbours. With ``cold_item_dropout`` = p, each training batch scores a random share p of its
items through that representation instead of their trained one (DropoutNet, Volkovs et al. 2017), so the
content path learns to rank by itself and its scores land on the same scale as trained items'. With
``cold_item_dropout_skip_top`` = q, the share q of the items with the most training interactions is never
dropped: a popular item is never new, and its ordering among the most frequent hits is where its trained ID
embedding matters most (:func:`droppable_mask`).

With ``content_neighbors`` = k (graph backbone), a new item is also placed among its k nearest trained
items by content (cosine of the standardised raw features, :class:`ContentNeighbors`): its per-layer
states are the mean of theirs times a learned scale, plus (``content_residual``) its own content-only
states; the dropped-out training items train the scale and the residual (the neighbours' states
detached, refreshed once per epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.metammf.neighbor_search import nearest

if TYPE_CHECKING:
    from models.config import MetaMMFConfig


def with_mean_id(fused: Tensor, id_embedding: nn.Embedding) -> Tensor:
    """Ego representation ``[e^m ; mean e^c]`` of items known by their fused content ``fused`` (b, d_m) only."""
    mean_id = id_embedding.weight.mean(0).to(fused.dtype).expand(fused.shape[0], -1)
    return torch.cat([fused, mean_id], dim=1)


def fused_part(ego: Tensor, id_embedding: nn.Embedding) -> Tensor:
    """The fused content e^m of ego representations ``[e^m ; e^c]``."""
    return ego[:, : ego.shape[1] - id_embedding.embedding_dim]


def item_counts(train_pairs: Tensor, n_items: int) -> Tensor:
    """(n_items,) each item's number of training interactions."""
    return torch.bincount(train_pairs[:, 1].long(), minlength=n_items)


def untrained_mask(train_pairs: Tensor, n_items: int) -> Tensor:
    """(n_items,) bool: items without any training interaction."""
    return item_counts(train_pairs, n_items) == 0


def droppable_mask(train_pairs: Tensor, n_items: int, skip_top: float) -> Tensor | None:
    """(n_items,) bool: the items the new-item dropout may drop, all but the ``skip_top`` share with the most
    training interactions (ties broken by item index); ``None`` (every item) when ``skip_top`` is 0."""
    if skip_top <= 0:
        return None
    counts = item_counts(train_pairs, n_items)
    top = torch.argsort(counts, descending=True, stable=True)[: round(skip_top * n_items)]
    droppable = torch.ones(n_items, dtype=torch.bool, device=counts.device)
    droppable[top] = False
    return droppable


def content_rows(
    item_ids: Tensor,
    untrained: Tensor | None,
    dropout: float,
    training: bool,
    droppable: Tensor | None = None,
    first: int | None = None,
) -> Tensor | None:
    """Positions in ``item_ids`` to score from content alone: untrained items, plus in training a random
    ``dropout`` share of the items that are ``droppable`` (default all) among the ``first`` positions (default
    all); ``None`` when there are none by construction."""
    mask = untrained.index_select(0, item_ids) if untrained is not None else None
    if training and dropout > 0:
        drop = torch.rand(item_ids.shape[0], device=item_ids.device) < dropout
        if droppable is not None:
            drop &= droppable.index_select(0, item_ids)
        if first is not None:
            drop[first:] = False
        mask = drop if mask is None else mask | drop
    return None if mask is None else mask.nonzero().squeeze(1)


def distinct_trained_positions(item_ids: Tensor, untrained: Tensor | None, limit: int) -> Tensor:
    """Positions in ``item_ids`` of at most ``limit`` distinct items with training interactions, drawn at random
    (one position per item): the rows that have both a trained and a content-only representation."""
    order = torch.randperm(item_ids.shape[0], device=item_ids.device)
    shuffled = item_ids[order]
    keep = (
        ~untrained.index_select(0, shuffled) if untrained is not None else torch.ones_like(shuffled, dtype=torch.bool)
    )
    # the first of each item in the shuffled order: sort stably by id, keep where the id changes
    ids, by_id = torch.sort(shuffled, stable=True)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    distinct = torch.zeros_like(keep)
    distinct[by_id[first]] = True
    return order[(keep & distinct).nonzero().squeeze(1)[:limit]]


def batch_content_rows(
    config: MetaMMFConfig, item_ids: Tensor, untrained: Tensor | None, droppable: Tensor | None, training: bool
) -> Tensor | None:
    """:func:`content_rows` of a training batch's items ``item_ids`` (positives, then negatives) by the config's
    new-item dropout: ``cold_item_dropout``, among the positives alone with ``cold_item_dropout_negatives`` off."""
    first = None if config.cold_item_dropout_negatives else item_ids.shape[0] // 2
    return content_rows(item_ids, untrained, config.cold_item_dropout, training, droppable, first)


def replace_rows(rows: Tensor, positions: Tensor | None, new_rows: Callable[[Tensor], Tensor]) -> Tensor:
    """``rows`` with the rows at ``positions`` replaced by ``new_rows(positions)`` (out of place, differentiable)."""
    if positions is None or positions.numel() == 0:
        return rows
    return rows.index_copy(0, positions, new_rows(positions).to(rows.dtype))


class ContentNeighbors(nn.Module):
    """The ``k`` nearest trained items of every item by content, fixed at construction.

    Args:
        inputs: (n_items, d_x) the items' inputs to the fusion network (standardised raw features).
        trained: (n_items,) bool, the items with training interactions: the only possible neighbours.
        k: neighbours per item.
    """

    def __init__(self, inputs: Tensor, trained: Tensor, k: int) -> None:
        super().__init__()
        self.k = k
        rows, keys, position = trained_keys(inputs, trained)
        # Every item's neighbours (item rows), a trained item never its own: what training drops out.
        table = rows[nearest(content_keys(inputs), keys, k, skip=position)]
        self.register_buffer("keys", keys, persistent=False)  # (n_trained, d_x), unit rows
        self.register_buffer("rows", rows, persistent=False)  # key index -> item row
        self.register_buffer("table", table, persistent=False)  # (n_items, k) item rows
        # The mean of k states is shorter than each of them: a learned scale (trained by the dropped-out
        # items' BPR pairs against trained items) puts new items back on the trained items' score scale.
        self.scale = nn.Parameter(torch.ones(()))


def trained_keys(inputs: Tensor, trained: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The trained items as content neighbours: their item rows, their content keys (unit rows) and, for every
    item, its own key index (-1 for an item without training interactions), which a query must skip."""
    rows = trained.nonzero().squeeze(1)
    position = torch.full((inputs.shape[0],), -1, dtype=torch.long, device=inputs.device)
    position[rows] = torch.arange(len(rows), device=inputs.device)
    return rows, content_keys(inputs[rows]), position


def content_keys(inputs: Tensor) -> Tensor:
    """Unit rows of the fusion network's inputs (standardised raw features): content neighbours are ranked by
    their inner products, the cosine."""
    return F.normalize(inputs.float(), dim=1)


def with_neighbors(
    states: list[Tensor], item_states: Tensor, neighbors: Tensor, scale: Tensor, residual: bool
) -> list[Tensor]:
    """A new item's per-layer ``states`` with its content neighbours: ``scale`` times the mean over each row of
    ``neighbors`` (b, k) of ``item_states`` (n_states, n, d), plus the own content-only ``states`` when
    ``residual``."""
    prior = scale * item_states[:, neighbors].mean(2)
    return [s + p.to(s.dtype) if residual else p.to(s.dtype) for s, p in zip(states, prior, strict=True)]
