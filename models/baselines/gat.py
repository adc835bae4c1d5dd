r"""GAT (Veličković et al., ICLR 2018) on the user-item graph with multimodal item features.

Node inputs as in :mod:`models.baselines.graphsage`: items :math:`h_i^0 = W_x x_i + b` (projected concatenated
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

import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATConv

from models.baselines.graphsage import ProjectedFeatureGraph, no_edges
from models.config import GATConfig


class GAT(ProjectedFeatureGraph):
    """GAT layers over users (free embeddings) and items (projected multimodal features); arguments: see
    :class:`~models.baselines.graphsage.ProjectedFeatureGraph` (``config.embedding_dim``, ``gcn_layers``,
    ``gat_heads``, ``message_dropout``, ``normalize_features`` are used).
    """

    def build_convs(self, dim: int, config: GATConfig) -> nn.ModuleList:
        return nn.ModuleList(
            GATConv(dim, dim, heads=config.gat_heads, concat=False, dropout=config.message_dropout)
            for _ in range(config.gcn_layers)
        )

    def layer(self, k: int, h: Tensor, isolated: bool) -> Tensor:
        # Without edges GATConv still adds the self loop: attention over the node alone.
        return self.convs[k](h, no_edges(h) if isolated else self.edge_index)

    def activate(self, h: Tensor) -> Tensor:
        return F.elu(h)
