r"""GraphSAGE (Hamilton et al., NeurIPS 2017) on the user-item graph with multimodal item features.

Node inputs: items :math:`h_i^0 = W_x x_i + b` (a linear projection of the concatenated, standardised
multimodal features: the item node features), users a free embedding :math:`h_u^0`. Each layer is
GraphSAGE-mean (PyG :class:`~torch_geometric.nn.SAGEConv`, ``aggr='mean'``):

.. math::
    h_v^k = W_{self}^k h_v^{k-1} + W_{neigh}^k \tfrac{1}{|N(v)|}\textstyle\sum_{w \in N(v)} h_w^{k-1} + b^k

followed, on the hidden layers, by the paper's :math:`\sigma` = ReLU and L2 normalisation
:math:`h / \lVert h \rVert_2` (Algorithm 1); the final embedding is the last layer :math:`z_v = h_v^K`
and :math:`\hat y_{ui} = z_u^\top z_i`.

Settings (paper -> here): K = 2 layers -> ``config.gcn_layers`` (2 by default); mean aggregator;
hidden width ``config.embedding_dim``. One deviation: the last layer is neither activated nor
normalised, since the scores are inner products trained with BPR (a unit-norm output would bound
them to [-1, 1]). Loss: BPR plus ``reg_weight`` x the L2 norm of the batch's ego states / batch size.
The layers are PyG's ``SAGEConv`` modules; the neighbour mean is computed with the precomputed CSR
of :class:`~models.metammf.gcn.MeanAggregation` (the same result as ``SAGEConv.forward``, faster).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv

from models.base import ModelInputs, RecModel, l2_penalty
from models.config import GraphSAGEConfig
from models.graph.utils import FeatureStandardizer, MeanAggregation, batch_rows, bipartite_edge_index


class ProjectedFeatureGraph(RecModel):
    """Graph layers over users (free embeddings) and items (projected multimodal features): what GraphSAGE
    and GAT share. Subclasses build ``convs`` and define one layer and the activation between layers.

    Args:
        n_users: number of users.
        item_features: (n_items, d_x) concatenated raw features.
        train_pairs: (n, 2) training (user, item) pairs: the graph.
        config: ``embedding_dim``, ``gcn_layers``, ``normalize_features`` (and the subclass's fields).
        reg_weight: L2 weight on the batch ego states.
    """

    def __init__(self, inputs: ModelInputs, config: GraphSAGEConfig, reg_weight: float = 1e-4) -> None:
        super().__init__(inputs, config, reg_weight)
        item_features, train_pairs = inputs.item_features, inputs.train_pairs
        dim = config.embedding_dim
        self.standardizer = FeatureStandardizer(item_features, config.normalize_features)
        self.register_buffer("features", self.standardizer(item_features), persistent=False)
        self.user_embedding = nn.Embedding(self.n_users, dim)
        self.item_projection = nn.Linear(item_features.shape[1], dim)
        self.convs = self.build_convs(dim, config)
        edge_index = bipartite_edge_index(train_pairs.long(), self.n_users, self.n_items)
        self.register_buffer("edge_index", edge_index, persistent=False)
        self.reset_parameters()

    @abstractmethod
    def build_convs(self, dim: int, config: GraphSAGEConfig) -> nn.ModuleList:
        """The ``config.gcn_layers`` graph layers, ``dim`` wide."""

    @abstractmethod
    def layer(self, k: int, h: Tensor, isolated: bool) -> Tensor:
        """Layer ``k`` over the training graph, or for nodes without neighbours when ``isolated``."""

    @abstractmethod
    def activate(self, h: Tensor) -> Tensor:
        """What follows every layer but the last."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user_embedding.weight, std=0.1)
        self.item_projection.reset_parameters()
        for conv in self.convs:
            conv.reset_parameters()

    def ego(self) -> Tensor:
        """Input states h^0 of all nodes [users | items]."""
        return torch.cat([self.user_embedding.weight, self.item_projection(self.features)])

    def propagate(self, h: Tensor, isolated: bool = False) -> Tensor:
        """Final states from input states ``h``: of all graph nodes, or of nodes without neighbours (items
        unseen in training) when ``isolated``."""
        for k in range(len(self.convs)):
            h = self.layer(k, h, isolated)
            if k < len(self.convs) - 1:
                h = self.activate(h)
        return h

    def get_embedding(self) -> tuple[Tensor, Tensor]:
        final = self.propagate(self.ego())
        return final[: self.n_users], final[self.n_users :]

    @torch.no_grad()
    def embed_unseen_items(self, features: Tensor) -> Tensor:
        """The projected features through the layers as nodes without neighbours (GAT: a self loop only)."""
        return self.propagate(self.item_projection(self.standardizer(features)), isolated=True)

    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        ego = self.ego()
        final = self.propagate(ego)
        rows = batch_rows(self.n_users, users, pos_items, neg_items)
        u, pos, neg = final[rows].split(len(users))
        return self.ranking_loss(users, pos_items, neg_items, u, pos, neg) + self.reg_weight * l2_penalty(
            *ego[rows].split(len(users))
        )


def no_edges(like: Tensor) -> Tensor:
    """An empty edge_index on ``like``'s device."""
    return torch.zeros((2, 0), dtype=torch.long, device=like.device)


class GraphSAGE(ProjectedFeatureGraph):
    """GraphSAGE-mean with projected multimodal item features and free user embeddings (arguments: see
    :class:`ProjectedFeatureGraph`; ``config.embedding_dim``, ``gcn_layers``, ``normalize_features`` are used).
    """

    def __init__(self, inputs: ModelInputs, config: GraphSAGEConfig, reg_weight: float = 1e-4) -> None:
        self._aggregation: MeanAggregation | None = None
        super().__init__(inputs, config, reg_weight)

    def build_convs(self, dim: int, config: GraphSAGEConfig) -> nn.ModuleList:
        return nn.ModuleList(SAGEConv(dim, dim, aggr="mean") for _ in range(config.gcn_layers))

    def aggregation(self) -> MeanAggregation:
        if self._aggregation is None or self._aggregation.device != self.edge_index.device:
            self._aggregation = MeanAggregation(self.edge_index, self.n_users + self.n_items)
        return self._aggregation

    def layer(self, k: int, h: Tensor, isolated: bool) -> Tensor:
        conv = self.convs[k]
        if isolated:
            return conv(h, no_edges(h))
        return conv.lin_l(self.aggregation()(h)) + conv.lin_r(h)  # what SAGEConv(aggr="mean") computes

    def activate(self, h: Tensor) -> Tensor:
        return F.normalize(F.relu(h), dim=-1)
