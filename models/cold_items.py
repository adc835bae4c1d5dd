"""Items the model has no interactions for: a new item posted online, a held-out item, or an item of the
training catalogue that nobody interacted with in training.

Such an item is represented by its content alone: its fused features :math:`e_i^m`, the mean ID
embedding in place of its own :math:`e_i^c`, and (with a graph backbone) the graph layers of a node
without neighbours. With ``cold_item_dropout`` = p, each training batch scores a random share p of its
items through that representation instead of their trained one (DropoutNet, Volkovs et al. 2017), so the
content path learns to rank by itself and its scores land on the same scale as trained items'.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def with_mean_id(fused: Tensor, id_embedding: nn.Embedding) -> Tensor:
    """Ego representation ``[e^m ; mean e^c]`` of items known by their fused content ``fused`` (b, d_m) only."""
    mean_id = id_embedding.weight.mean(0).to(fused.dtype).expand(fused.shape[0], -1)
    return torch.cat([fused, mean_id], dim=1)


def fused_part(ego: Tensor, id_embedding: nn.Embedding) -> Tensor:
    """The fused content e^m of ego representations ``[e^m ; e^c]``."""
    return ego[:, : ego.shape[1] - id_embedding.embedding_dim]


def untrained_mask(train_pairs: Tensor, n_items: int) -> Tensor:
    """(n_items,) bool: items without any training interaction."""
    return torch.bincount(train_pairs[:, 1].long(), minlength=n_items) == 0


def content_rows(item_ids: Tensor, untrained: Tensor | None, dropout: float, training: bool) -> Tensor | None:
    """Positions in ``item_ids`` to score from content alone: untrained items, plus a random ``dropout``
    share in training; ``None`` when there are none by construction."""
    mask = untrained.index_select(0, item_ids) if untrained is not None else None
    if training and dropout > 0:
        drop = torch.rand(item_ids.shape[0], device=item_ids.device) < dropout
        mask = drop if mask is None else mask | drop
    return None if mask is None else mask.nonzero().squeeze(1)


def replace_rows(rows: Tensor, positions: Tensor | None, new_rows: Callable[[Tensor], Tensor]) -> Tensor:
    """``rows`` with the rows at ``positions`` replaced by ``new_rows(positions)`` (out of place, differentiable)."""
    if positions is None or positions.numel() == 0:
        return rows
    return rows.index_copy(0, positions, new_rows(positions).to(rows.dtype))
