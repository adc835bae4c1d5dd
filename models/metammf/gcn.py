r"""MetaMMF_GCN: dynamic multimodal fusion with a GraphSAGE backbone over the user-item graph.

Item nodes start from :math:`h_i^0 = [e_i^m ; e_i^c]`, user nodes from a free embedding :math:`h_u^0`.
Each layer is GraphSAGE with mean aggregation (PyG :class:`~torch_geometric.nn.SAGEConv`):

.. math::
    h_v^{l+1} = \mathrm{LeakyReLU}\big(W_1^l h_v^l + W_2^l \tfrac{1}{|N(v)|}\textstyle\sum_{w \in N(v)} h_w^l\big)

The final embedding is :math:`h^L` (``layer_combine='last'``) or :math:`\frac{1}{L+1}\sum_l h^l`
(``'mean'``), and :math:`\hat y_{ui} = e_u^\top e_i`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv

from models.base import ModelInputs, RecModel, info_nce, l2_penalty
from models.config import MetaMMFGraphConfig
from models.graph.neighbor_sampling import NeighborSampler
from models.graph.sage_rows import TowerSettings, sage_rows
from models.graph.utils import MeanAggregation, batch_rows, bipartite_edge_index, degree_sensitive_edges
from models.metammf.cold_items import (
    ContentNeighbors,
    batch_content_rows,
    content_keys,
    distinct_trained_positions,
    droppable_mask,
    fused_part,
    item_counts,
    replace_rows,
    untrained_mask,
    with_mean_id,
    with_neighbors,
)
from models.metammf.item_graph import ItemContentGraph, degree_scale
from models.metammf.mf import MultimodalItemEncoder, fusion_weights
from models.metammf.neighbor_search import nearest


def _unique_rows(rows: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """``rows.unique(return_inverse=True)`` for indices below ``n_rows``, with a mask instead of a sort."""
    present = torch.zeros(n_rows, dtype=torch.bool, device=rows.device)
    present[rows] = True
    position = present.cumsum(0) - 1
    return present.nonzero().squeeze(1), position.index_select(0, rows)


class SAGETower(nn.Module):
    """GraphSAGE layers with LeakyReLU, usable on the whole graph or on single new nodes."""

    def __init__(
        self,
        dim: int,
        n_layers: int,
        leaky_slope: float = 0.01,
        layer_combine: str = "mean",
        init: str = "default",
        bias: bool = True,
        activate_last: bool = True,
        isolated_nodes: str = "zeros",
    ):
        super().__init__()
        if init not in ("default", "mean", "residual"):
            raise ValueError(f"unknown SAGE init {init!r} (expected 'default', 'mean' or 'residual')")
        if isolated_nodes not in ("zeros", "self"):
            raise ValueError(f"unknown isolated_nodes {isolated_nodes!r} (expected 'zeros' or 'self')")
        self.isolated_nodes = isolated_nodes
        self.convs = nn.ModuleList(SAGEConv(dim, dim, aggr="mean", bias=bias) for _ in range(n_layers))
        self.activation = nn.LeakyReLU(leaky_slope)
        self.layer_combine = layer_combine
        self.n_layers = n_layers
        self.init = init
        self.activate_last = activate_last

    @classmethod
    def from_config(cls, config: MetaMMFGraphConfig) -> SAGETower:
        """The tower a :class:`MetaMMF_GCN` with ``config`` uses (also rebuilt by the service)."""
        return cls(
            config.embedding_dim,
            config.gcn_layers,
            config.leaky_slope,
            config.layer_combine,
            init=config.sage_init,
            bias=config.sage_bias,
            activate_last=config.activate_last,
            isolated_nodes=config.isolated_nodes,
        )

    def reset_parameters(self) -> None:
        """PyG's default init, or one that starts as plain mean aggregation ('mean': W_neigh = I,
        W_self = 0) or mean aggregation plus the node's own state ('residual': both = I)."""
        for conv in self.convs:
            conv.reset_parameters()
            if self.init == "default":
                continue
            with torch.no_grad():
                nn.init.eye_(conv.lin_l.weight)
                if conv.lin_l.bias is not None:
                    nn.init.zeros_(conv.lin_l.bias)
                if self.init == "mean":
                    nn.init.zeros_(conv.lin_r.weight)
                else:
                    nn.init.eye_(conv.lin_r.weight)

    def weights(self) -> list[Tensor]:
        """The layers' projection matrices (the targets of ``layer_reg``)."""
        return [w for conv in self.convs for w in (conv.lin_l.weight, conv.lin_r.weight)]

    def forward(self, x: Tensor, aggregate: MeanAggregation) -> list[Tensor]:
        """All node states [h^0, ..., h^L] on the graph whose neighbour means ``aggregate`` computes.
        Each layer is what ``SAGEConv(aggr='mean')`` computes (``lin_l(mean) + lin_r(x)``), with the
        aggregation done by :class:`MeanAggregation`."""
        states = [x]
        for layer in range(len(self.convs)):
            states.append(self.node_update(layer, states[-1], aggregate(states[-1])))
        return states

    def final_rows(self, x: Tensor, aggregate: MeanAggregation, rows: Tensor) -> Tensor:
        """``combine(forward(x, aggregate))[rows]`` without computing the last layer for other nodes:
        a training batch touches about half of the nodes, and the last layer is a quarter of the work."""
        unique, inverse = _unique_rows(rows, x.shape[0])
        device = x.device.type
        compute_dtype = None
        if torch.is_autocast_enabled(device):
            if device != "cpu":  # (CUDA: the bfloat16 CSR product is not measured there; autocast as it was)
                return self._final_rows_autocast(x, aggregate, unique, inverse)
            # The tower computes in bfloat16 itself: one cast in, one out, instead of casts around every product.
            compute_dtype = torch.get_autocast_dtype(device)
        weights = [w for conv in self.convs for w in (conv.lin_l.weight, conv.lin_l.bias, conv.lin_r.weight)]
        tower = TowerSettings(
            self.activation.negative_slope, self.activate_last, self.layer_combine == "mean", compute_dtype
        )
        out = sage_rows(x, aggregate.matrix, aggregate.transposed, unique, tower, weights)
        return out.index_select(0, inverse)

    def _final_rows_autocast(self, x: Tensor, aggregate: MeanAggregation, unique: Tensor, inverse: Tensor) -> Tensor:
        """:meth:`final_rows` left to autocast and autograd."""
        states = [x]
        for layer in range(len(self.convs) - 1):
            states.append(self.node_update(layer, states[-1], aggregate(states[-1])))
        h = states[-1]
        # index_select, not h[unique]: its backward (index_add_) is 3-4x faster on CPU than the
        # accumulating index_put_ that advanced indexing backpropagates through.
        last = self.node_update(len(self.convs) - 1, h.index_select(0, unique), aggregate(h).index_select(0, unique))
        if self.layer_combine == "last":
            return last.index_select(0, inverse)
        # Sum the full states first: one gather to backpropagate through instead of one per layer.
        earlier = sum(states[1:], states[0]).index_select(0, unique)
        return ((earlier + last) / (len(states) + 1)).index_select(0, inverse)

    def _activate(self, layer: int, h: Tensor) -> Tensor:
        last = layer == len(self.convs) - 1
        return h if last and not self.activate_last else self.activation(h)

    def combine(self, states: list[Tensor]) -> Tensor:
        """Final embeddings from the per-layer states [h^0..h^L]."""
        if self.layer_combine == "last":
            return states[-1]
        # A running sum: stacking the states would copy all of them on every training step.
        return sum(states[1:], states[0]) / len(states)

    def node_update(self, layer: int, own: Tensor, neighbor_mean: Tensor) -> Tensor:
        """One layer for nodes outside the training graph, given the mean of their neighbours' states;
        identical to what :class:`SAGEConv` computes for nodes inside it."""
        conv = self.convs[layer]
        # lin_l(mean) + lin_r(own), with the sum done inside the second matrix product (one pass less).
        return self._activate(layer, torch.addmm(conv.lin_l(neighbor_mean), own, conv.lin_r.weight.t()))

    def isolated(self, x: Tensor) -> list[Tensor]:
        """States of nodes with no neighbours yet (a freshly added item): their neighbour mean is zeros
        (``isolated_nodes='zeros'``, what the graph layers give such a node) or their own state ('self')."""
        states = [x]
        for layer in range(len(self.convs)):
            h = states[-1]
            states.append(self.node_update(layer, h, h if self.isolated_nodes == "self" else torch.zeros_like(h)))
        return states


class MetaMMF_GCN(RecModel):
    """MetaMMF with GraphSAGE message passing over the training interactions.

    Args:
        inputs: the items' concatenated raw multimodal features and the training (user, item) pairs: the
            graph (with ``config.untrained_items='content'``, items absent from it are scored from content alone).
        config: model hyper-parameters (``gcn_layers``, ``layer_combine``, fusion settings).
        reg_weight: L2 weight on the batch ego representations.
        items: the item ego encoder (default: :class:`MultimodalItemEncoder`; see :class:`MetaMMF_MF`).
    """

    def __init__(
        self,
        inputs: ModelInputs,
        config: MetaMMFGraphConfig,
        reg_weight: float = 1e-4,
        *,
        items: nn.Module | None = None,
    ) -> None:
        super().__init__(inputs, config, reg_weight)
        train_pairs = inputs.train_pairs
        dim = config.embedding_dim
        self.user_embedding = nn.Embedding(self.n_users, dim)
        self.items = items if items is not None else MultimodalItemEncoder(config, inputs.item_features)
        self.graph = self.tower(config)
        edge_index = bipartite_edge_index(train_pairs.long(), self.n_users, self.n_items)
        self.register_buffer("edge_index", edge_index, persistent=False)
        untrained = untrained_mask(train_pairs, self.n_items)
        self.register_buffer(
            "untrained_items", untrained if config.untrained_items == "content" else None, persistent=False
        )
        droppable = droppable_mask(train_pairs, self.n_items, config.cold_item_dropout_skip_top)
        self.register_buffer("droppable_items", droppable, persistent=False)
        self.neighbors: ContentNeighbors | None = None
        if config.content_neighbors > 0:
            self.neighbors = ContentNeighbors(self.items.item_inputs, ~untrained, config.content_neighbors)
        self.item_graph: ItemContentGraph | None = None
        if config.item_graph_k > 0:
            self.item_graph = ItemContentGraph(
                self.items.item_inputs,
                ~untrained,
                config.item_graph_k,
                config.item_graph_normalize,
                config.item_graph_weight,
                config.new_item_graph_k,
                degree_scale(item_counts(train_pairs, self.n_items), config.item_graph_half_degree),
            )
        self._neighbor_states: Tensor | None = None  # detached (n_states, n_items, d), see _neighbor_prior
        self._aggregation: MeanAggregation | None = None
        self._pruned_edges: Tensor | None = None  # this epoch's subgraph with edge_pruning, and its propagation
        self._pruned: MeanAggregation | None = None
        self.reset_parameters()

    @staticmethod
    def tower(config: MetaMMFGraphConfig) -> SAGETower:
        """The graph layers (also rebuilt by the service, :mod:`models.metammf.inference`)."""
        return SAGETower.from_config(config)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user_embedding.weight, std=0.1)
        self.items.reset_parameters()
        self.graph.reset_parameters()
        self._neighbor_states = None

    def on_epoch_start(self) -> None:
        self._neighbor_states = None  # the content neighbours' states follow the weights once per epoch
        if self.config.edge_pruning > 0:
            kept = degree_sensitive_edges(self.edge_index, self.n_users + self.n_items, 1.0 - self.config.edge_pruning)
            self._pruned_edges, self._pruned = kept, self.propagation(kept)

    def _neighbor_prior(self) -> Tensor:
        """Detached per-layer states (n_states, n_items, d) of the items, what a dropped-out item's content
        neighbours contribute during an epoch."""
        if self._neighbor_states is None:
            with torch.no_grad():
                x, _, aggregate = self._graph_input()
                self._neighbor_states = torch.stack([s[self.n_users :] for s in self.graph(x, aggregate)]).float()
        return self._neighbor_states

    def propagation(self, edge_index: Tensor) -> MeanAggregation:
        """The neighbour aggregation of the graph layers over ``edge_index`` (GraphSAGE: the mean)."""
        return MeanAggregation(edge_index, self.n_users + self.n_items)

    def _adjacency(self) -> MeanAggregation:
        # Built once per device (the graph is fixed during training).
        if self._aggregation is None or self._aggregation.device != self.edge_index.device:
            self._aggregation = self.propagation(self.edge_index)
        return self._aggregation

    def _dropped_adjacency(self) -> MeanAggregation:
        """The graph (with ``edge_pruning``, the epoch's subgraph) with a random ``edge_dropout`` share of the
        (directed) edges removed."""
        edges = self.edge_index if self._pruned_edges is None else self._pruned_edges
        keep = torch.rand(edges.shape[1], device=edges.device) >= self.config.edge_dropout
        return self.propagation(edges[:, keep])

    def _graph_input(self) -> tuple[Tensor, Tensor, MeanAggregation]:
        """Ego states of all nodes, the item ego states, and the graph to propagate over (in training
        mode with ``edge_pruning`` > 0, the epoch's degree-sensitive subgraph; with ``edge_dropout`` > 0, a fresh
        random share of its edges dropped at every call)."""
        item_ego = self.items()
        x = torch.cat([self.user_embedding.weight, item_ego])
        if not self.training:
            return x, item_ego, self._adjacency()
        if self.config.edge_dropout > 0:
            return x, item_ego, self._dropped_adjacency()
        if self._pruned is not None:
            return x, item_ego, self._pruned
        return x, item_ego, self._adjacency()

    def new_item_states(
        self, fused: Tensor, neighbors: Tensor | None = None, item_states: Tensor | None = None
    ) -> list[Tensor]:
        """Per-layer states of items known by their content alone (:mod:`models.metammf.cold_items`): their fused
        content e^m with the mean ID embedding and no graph neighbours, plus, with ``neighbors`` (b, k item
        rows), the mean of those items' ``item_states`` (n_states, n_items, d)."""
        states = self.graph.isolated(with_mean_id(fused, self.items.id_embedding))
        if neighbors is None:
            return states
        return with_neighbors(states, item_states, neighbors, self.neighbors.scale, self.config.content_residual)

    def new_item_embeddings(
        self, fused: Tensor, neighbors: Tensor | None = None, item_states: Tensor | None = None
    ) -> Tensor:
        """Final embeddings of items known by their content alone (see :meth:`new_item_states`)."""
        return self.graph.combine(self.new_item_states(fused, neighbors, item_states))

    @torch.no_grad()
    def embed_unseen_items(self, features: Tensor) -> Tensor:
        """Final embeddings of items outside the model from their raw features (evaluation mode)."""
        inputs = self.items.fusion.standardize(features.float())
        fused = self.items.fusion.fuse_standardized(inputs)
        states = None
        if self.neighbors is not None or self.item_graph is not None:
            states, _ = self.layer_states()
        if self.neighbors is None:
            final = self.new_item_embeddings(fused)
        else:
            found = self.neighbors.rows[nearest(content_keys(inputs), self.neighbors.keys, self.neighbors.k)]
            final = self.new_item_embeddings(fused, found, torch.stack([s[self.n_users :] for s in states]))
        if self.item_graph is not None:
            final = final + self.item_graph.new_rows(inputs, states[0][self.n_users :]).to(final.dtype)
        return final

    def layer_states(self) -> tuple[list[Tensor], Tensor]:
        """Per-layer node states [h^0..h^L] (each (n_users + n_items, d)) and the item ego states; items
        without training interactions get their content-only states with ``untrained_items='content'``."""
        x, item_ego, aggregate = self._graph_input()
        states = self.graph(x, aggregate)
        if self.untrained_items is not None and bool(self.untrained_items.any()):
            rows = self.untrained_items.nonzero().squeeze(1)
            neighbors, items = None, None
            if self.neighbors is not None:
                neighbors = self.neighbors.table[rows]
                items = torch.stack([s[self.n_users :] for s in states]).detach()
            cold = self.new_item_states(fused_part(item_ego[rows], self.items.id_embedding), neighbors, items)
            states = [s.index_copy(0, rows + self.n_users, c.to(s.dtype)) for s, c in zip(states, cold, strict=True)]
        return states, item_ego

    def _content_items(
        self, item_ids: Tensor, items: Tensor, ego_rows: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor | float]:
        """A batch's final item rows ``items`` with the untrained and dropped-out ones from content alone
        (``ego_rows(positions)``: the ego states of the items at those positions of the batch), and the
        weighted ``content_alignment`` and ``content_contrast`` terms (0.0 when off)."""

        def content(rows: Tensor) -> Tensor:
            fused = fused_part(ego_rows(rows), self.items.id_embedding)
            if self.neighbors is None:
                return self.new_item_embeddings(fused)
            return self.new_item_embeddings(fused, self.neighbors.table[item_ids[rows]], self._neighbor_prior())

        alignment: Tensor | float = 0.0
        if self.training and self.config.content_alignment > 0:
            every = torch.arange(item_ids.shape[0], device=item_ids.device)
            gap = content(every) - items.detach().to(items.dtype)
            alignment = self.config.content_alignment * gap.float().pow(2).sum(-1).mean()
        if self.training and self.config.content_contrast > 0:
            config = self.config
            picked = distinct_trained_positions(item_ids, self.untrained_items, config.content_contrast_items)
            if picked.numel() > 1:
                views = content(picked), items.index_select(0, picked)
                alignment = alignment + config.content_contrast * info_nce(*views, config.content_contrast_temperature)
        cold = batch_content_rows(self.config, item_ids, self.untrained_items, self.droppable_items, self.training)
        return replace_rows(items, cold, content), alignment

    def get_embedding(self) -> tuple[Tensor, Tensor]:
        states, item_ego = self.layer_states()
        final = self.graph.combine(states)
        return final[: self.n_users], self._with_item_graph(final[self.n_users :], item_ego)

    def _with_item_graph(self, items: Tensor, item_ego: Tensor, item_ids: Tensor | None = None) -> Tensor:
        """Final item rows (of ``item_ids``, default all items) plus the item-item content graph's term."""
        if self.item_graph is None:
            return items
        extra = self.item_graph(item_ego)
        return items + (extra if item_ids is None else extra.index_select(0, item_ids)).to(items.dtype)

    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        x, item_ego, aggregate = self._graph_input()
        rows = batch_rows(self.n_users, users, pos_items, neg_items)
        final = self.graph.final_rows(x, aggregate, rows)
        item_ids = torch.cat([pos_items, neg_items])
        items, alignment = self._content_items(
            item_ids, final[len(users) :], lambda at: item_ego.index_select(0, item_ids[at])
        )
        items = self._with_item_graph(items, item_ego, item_ids)
        u, (pos, neg) = final[: len(users)], items.split(len(users))
        loss = self.ranking_loss(users, pos_items, neg_items, u, pos, neg) + alignment
        ego = self.user_embedding(users), item_ego[pos_items], item_ego[neg_items]
        loss = loss + self._penalty((u, pos, neg), ego)
        if self.config.layer_reg > 0:
            weights = self.graph.weights() + fusion_weights(self.items.fusion)
            loss = loss + self.config.layer_reg * sum(w.pow(2).sum() for w in weights) / 2
        return loss

    def _penalty(self, final: Sequence[Tensor], ego: Sequence[Tensor]) -> Tensor:
        """The weighted L2 term of a batch, given its (users, positives, negatives) ``final`` and ``ego``
        representations: ``reg_weight`` on the final ones (``reg_target='final'``) or on the ego ones, and with
        ``content_reg_weight`` the items' ego fused content e^m apart at that weight."""
        content_weight, fused = self.config.content_reg_weight, self.config.fused_dim
        user_ego, pos_ego, neg_ego = ego
        if self.config.reg_target == "final":
            rest = final
        elif content_weight is None:
            rest = ego
        else:
            rest = user_ego, pos_ego[:, fused:], neg_ego[:, fused:]
        reg = self.reg_weight * l2_penalty(*rest)
        if content_weight is None:
            return reg
        return reg + content_weight * l2_penalty(pos_ego[:, :fused], neg_ego[:, :fused])

    # ---- Neighbour-sampled mini-batch training (train.neighbor_sampling); evaluation stays full-graph ----

    def neighbor_sampler(self) -> NeighborSampler:
        """Uniform neighbour sampler over the training graph (built once per device)."""
        sampler = getattr(self, "_neighbor_sampler", None)
        if sampler is None or sampler.device != self.edge_index.device:
            sampler = self._neighbor_sampler = NeighborSampler(self.edge_index, self.n_users + self.n_items)
        return sampler

    def sampled_rows(
        self, rows: Tensor, fanouts: Sequence[int], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(final embeddings, ego states) of nodes ``rows`` (users, ``n_users`` + items), computed on a
        sampled ``len(fanouts)``-hop neighbourhood of them instead of on the whole graph.

        Ego states (user embeddings, item fusion) are computed only for the subgraph's nodes and the
        SAGE tower runs on the subgraph's sampled edges, so memory scales with the subgraph. With every
        fanout at least the maximum degree (or -1) the result equals ``combine(layer_states())[rows]``
        (the nodes ``L`` hops away get wrong higher-layer states, but no seed depends on those). In
        training mode with ``edge_dropout`` > 0 that share of the sampled edges is dropped.
        """
        sub = self.neighbor_sampler().sample(rows, fanouts, generator)
        is_user = sub.n_id < self.n_users
        position = torch.cat([is_user.nonzero().squeeze(1), (~is_user).nonzero().squeeze(1)])
        ego = torch.cat([self.user_embedding(sub.n_id[is_user]), self.items(sub.n_id[~is_user] - self.n_users)])
        x = ego.new_empty(ego.shape).index_copy(0, position, ego)  # back into subgraph order
        edge_index = sub.edge_index
        if self.training and self.config.edge_dropout > 0:
            edge_index = edge_index[:, torch.rand(edge_index.shape[1], device=x.device) >= self.config.edge_dropout]
        final = self.graph.final_rows(x, MeanAggregation(edge_index, len(sub.n_id)), sub.seed_index)
        return final, x[sub.seed_index]

    def calculate_sampled_loss(
        self,
        users: Tensor,
        pos_items: Tensor,
        neg_items: Tensor,
        fanouts: Sequence[int],
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:meth:`calculate_loss` on a neighbour-sampled subgraph around the batch's users, positive and
        negative items (``fanouts[k]`` neighbours per node at hop ``k + 1``, -1 = all; one per layer).
        Equal to :meth:`calculate_loss` when every fanout covers the maximum degree."""
        rows = batch_rows(self.n_users, users, pos_items, neg_items)
        final, ego = self.sampled_rows(rows, fanouts, generator)
        items, alignment = self._content_items(
            torch.cat([pos_items, neg_items]), final[len(users) :], lambda at: ego[len(users) :][at]
        )
        u, (pos, neg) = final[: len(users)], items.split(len(users))
        loss = self.ranking_loss(users, pos_items, neg_items, u, pos, neg) + alignment
        loss = loss + self._penalty((u, pos, neg), ego.split(len(users)))
        if self.config.layer_reg > 0:
            weights = self.graph.weights() + fusion_weights(self.items.fusion)
            loss = loss + self.config.layer_reg * sum(w.pow(2).sum() for w in weights) / 2
        return loss
