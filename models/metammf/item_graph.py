r"""A frozen item-item graph from content, added to a graph backbone's item embeddings.

Each item's :math:`k` nearest *trained* items by content (cosine of the standardised raw features, the keys
of :mod:`models.metammf.cold_items`) are its neighbours, weighted by their similarity clamped at 0 and normalised
per item (rows sum to 1):

.. math::
    S_{ij} = \frac{\max(0, \cos(x_i, x_j))}{\sum_{j' \in N_k(i)} \max(0, \cos(x_i, x_{j'}))}, \qquad
    e_i \mathrel{+}= w \textstyle\sum_j S_{ij}\, h_j^0

with the weight :math:`w` (``item_graph_weight``), where :math:`h_j^0 = [e_j^m ; e_j^c]` is the neighbour's ego
representation. The graph is built once, before training, as FREEDOM (Zhou et al., ACM MM 2023) freezes
LATTICE's initial graph; it is row-normalised rather than symmetric, so a new item's row is computed exactly from
its own neighbours (``POST /items``) without changing any trained item's row. A trained item is never its own
neighbour, so an item whose ID part is dropped out in training (``cold_item_dropout``) learns nothing from its
own ID through this term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.graph.csr import SparseMatmul, csr_pair
from models.metammf.cold_items import content_keys, trained_keys
from models.metammf.neighbor_search import nearest, scores_at


def neighbor_weights(queries: Tensor, keys: Tensor, found: Tensor) -> Tensor:
    """(b, k) weights of the keys ``found`` (b, k) for unit ``queries``: cosine clamped at 0, rows summing to 1
    (a row with no positive similarity stays 0)."""
    similarity = scores_at(queries, keys, found).clamp_min(0)
    return similarity / similarity.sum(1, keepdim=True).clamp_min(1e-12)


def degree_scale(interactions: Tensor, half_degree: float | None) -> Tensor | None:
    """Each item's factor :math:`1 / (1 + n_i / n_{1/2})` of its item-graph term for ``interactions`` n_i
    (n_items,) and ``half_degree`` :math:`n_{1/2}` (the count at which the term is halved): an item with many
    training interactions has a well-trained ID embedding and leans less on its content neighbours. ``None``
    when ``half_degree`` is ``None`` (every item alike)."""
    if half_degree is None:
        return None
    return 1.0 / (1.0 + interactions.float() / half_degree)


def content_graph_rows(
    queries: Tensor,
    keys: Tensor,
    ego: Tensor,
    k: int,
    normalize: bool = False,
    found: Tensor | None = None,
    weight: float = 1.0,
) -> Tensor:
    """``weight`` x :math:`\\sum_j S_{ij} h_j^0` (b, d) for items outside the graph with unit content ``queries``
    (b, d_x), given the trained items' ``keys`` and ego representations ``ego`` (in key order); unit rows (before
    the weight) with ``normalize``. ``found``: each query's nearest keys, best first, if already searched (the
    first k used)."""
    found = nearest(queries, keys, k) if found is None else found[:, :k]
    weights = neighbor_weights(queries, keys, found)
    rows = (weights.unsqueeze(-1) * ego[found].float()).sum(1)
    return weight * (F.normalize(rows, dim=1) if normalize else rows)


class ItemContentGraph(nn.Module):
    """The frozen graph :math:`S` over all items.

    Args:
        inputs: (n_items, d_x) the fusion network's inputs (standardised raw features).
        trained: (n_items,) bool, the items with training interactions: the only possible neighbours.
        k: neighbours per trained item.
        normalize: scale each item's term to unit length (LATTICE adds its item-graph term that way).
        weight: the term's factor.
        new_k: neighbours per item without training interactions, here and in :meth:`new_rows` (default ``k``).
        row_scale: (n_items,) a factor of each item's term on top of ``weight`` (default 1 for all); the items
            without training interactions, like new items, must have 1.
    """

    def __init__(
        self,
        inputs: Tensor,
        trained: Tensor,
        k: int,
        normalize: bool = False,
        weight: float = 1.0,
        new_k: int | None = None,
        row_scale: Tensor | None = None,
    ) -> None:
        super().__init__()
        if row_scale is not None and not bool((row_scale[~trained] == 1).all()):
            raise ValueError("row_scale must be 1 for the items without training interactions, as for new items")
        self.k = k
        self.new_k = k if new_k is None else new_k
        self.normalize = normalize
        self.weight = weight
        self.n_items = inputs.shape[0]
        rows, keys, position = trained_keys(inputs, trained)
        queries = content_keys(inputs)
        found = nearest(queries, keys, max(self.k, self.new_k), skip=position)
        sources, targets, weights = [], [], []
        for group, group_k in ((trained, self.k), (~trained, self.new_k)):
            items = group.nonzero().squeeze(1)
            group_found = found[items, :group_k]
            sources.append(rows[group_found].reshape(-1))
            targets.append(items.repeat_interleave(group_found.shape[1]))
            group_weights = neighbor_weights(queries[items], keys, group_found)
            if row_scale is not None:
                group_weights = group_weights * row_scale[items].unsqueeze(1).to(group_weights.dtype)
            weights.append(group_weights.reshape(-1))
        self.register_buffer("keys", keys, persistent=False)  # (n_trained, d_x) unit rows
        self.register_buffer("rows", rows, persistent=False)  # key index -> item row
        self.register_buffer("edge_index", torch.stack([torch.cat(sources), torch.cat(targets)]), persistent=False)
        self.register_buffer("edge_weight", torch.cat(weights), persistent=False)
        self._matrices: tuple[Tensor, Tensor] | None = None

    def _csr(self) -> tuple[Tensor, Tensor]:
        """S and its transpose as CSR tensors, built once per device (the graph is fixed)."""
        if self._matrices is None or self._matrices[0].device != self.edge_index.device:
            self._matrices = csr_pair(self.edge_index, self.edge_weight, self.n_items)
        return self._matrices

    def forward(self, item_ego: Tensor) -> Tensor:
        """:math:`S h^0` (n_items, d) for the ego representations of all items (n_items, d)."""
        rows = SparseMatmul.apply(item_ego, *self._csr())
        return self.weight * (F.normalize(rows, dim=1) if self.normalize else rows)

    @torch.no_grad()
    def new_rows(self, inputs: Tensor, item_ego: Tensor) -> Tensor:
        """:math:`\\sum_j S_{ij} h_j^0` for items outside the graph from their standardised raw features."""
        return content_graph_rows(
            content_keys(inputs), self.keys, item_ego[self.rows], self.new_k, self.normalize, weight=self.weight
        )
