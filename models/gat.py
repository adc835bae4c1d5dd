r"""GAT (Veličković et al., ICLR 2018) on the user-item graph with multimodal item features.

Node inputs as in :mod:`models.graphsage`: items :math:`h_i^0 = W_x x_i + b` (projected concatenated
multimodal features), users a free embedding. Each layer is PyG's
:class:`~torch_geometric.nn.GATConv`: attention over the node's neighbours and itself,

.. math::
    \alpha_{vw} = \mathrm{softmax}_w\big(\mathrm{LeakyReLU}_{0.2}(a^\top [W h_v \,\Vert\, W h_w])\big),
    \qquad h_v' = \tfrac{1}{H}\textstyle\sum_{h=1}^{H} \sum_{w \in N(v) \cup \{v\}} \alpha^h_{vw} W^h h_w

with ELU between layers (paper) and the last layer's output as the embedding;
:math:`\hat y_{ui} = h_u^\top h_i`.

Settings (paper -> here): attention LeakyReLU slope 0.2 and self loops (PyG defaults, as the paper);
heads: the paper's 8 hidden heads (concatenated) -> ``config.gat_heads`` heads whose outputs are
averaged (the paper's output-layer rule; keeps every layer ``config.embedding_dim`` wide);
attention dropout 0.6 -> ``config.message_dropout``; 2 layers -> ``config.gcn_layers``.
Loss: BPR plus ``reg_weight`` x the L2 norm of the batch's ego states / batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATConv

from models.base import RecModel, bpr_loss, l2_penalty
from models.config import ModelConfig
from models.graph_utils import standardize_features
from models.metammf_gcn import bipartite_edge_index
from models.registry import ModelInputs


class GAT(RecModel):
    """GAT layers over users (free embeddings) and items (projected multimodal features).

    Args:
        n_users: number of users.
        item_features: (n_items, d_x) concatenated raw features.
        train_pairs: (n, 2) training (user, item) pairs: the graph.
        config: ``embedding_dim``, ``gcn_layers``, ``gat_heads``, ``message_dropout``,
            ``normalize_features`` are used.
        reg_weight: L2 weight on the batch ego states.
    """

    def __init__(
        self, n_users: int, item_features: Tensor, train_pairs: Tensor, config: ModelConfig, reg_weight: float
    ):
        super().__init__()
        self.config = config
        self.n_users, self.n_items = n_users, item_features.shape[0]
        self.reg_weight = reg_weight
        dim = config.embedding_dim
        self.register_buffer(
            "features", standardize_features(item_features, config.normalize_features), persistent=False
        )
        self.user_embedding = nn.Embedding(n_users, dim)
        self.item_projection = nn.Linear(item_features.shape[1], dim)
        self.convs = nn.ModuleList(
            GATConv(dim, dim, heads=config.gat_heads, concat=False, dropout=config.message_dropout)
            for _ in range(config.gcn_layers)
        )
        edge_index = bipartite_edge_index(train_pairs.long(), self.n_users, self.n_items)
        self.register_buffer("edge_index", edge_index, persistent=False)
        self.reset_parameters()

    @classmethod
    def from_inputs(cls, inputs: ModelInputs, config: ModelConfig, reg_weight: float) -> GAT:
        return cls(inputs.n_users, inputs.item_features, inputs.train_pairs, config, reg_weight)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user_embedding.weight, std=0.1)
        self.item_projection.reset_parameters()
        for conv in self.convs:
            conv.reset_parameters()

    def ego(self) -> Tensor:
        """Input states h^0 of all nodes [users | items]."""
        return torch.cat([self.user_embedding.weight, self.item_projection(self.features)])

    def propagate(self, h: Tensor) -> Tensor:
        for k, conv in enumerate(self.convs):
            h = conv(h, self.edge_index)
            if k < len(self.convs) - 1:
                h = F.elu(h)
        return h

    def get_embedding(self) -> tuple[Tensor, Tensor]:
        final = self.propagate(self.ego())
        return final[: self.n_users], final[self.n_users :]

    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        ego = self.ego()
        final = self.propagate(ego)
        rows = torch.cat([users, self.n_users + pos_items, self.n_users + neg_items])
        u, pos, neg = final[rows].split(len(users))
        return bpr_loss((u * pos).sum(-1), (u * neg).sum(-1)) + self.reg_weight * l2_penalty(
            *ego[rows].split(len(users))
        )
