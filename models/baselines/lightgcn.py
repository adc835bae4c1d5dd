r"""LightGCN (He et al., SIGIR 2020): pure collaborative filtering, no item content.

Free ID embeddings :math:`e^{(0)}` of users and items are smoothed over the user-item graph without
feature transforms or non-linearities (PyG :class:`~torch_geometric.nn.LGConv`):

.. math::
    e^{(k+1)} = D^{-1/2} A D^{-1/2} e^{(k)}, \qquad
    e = \frac{1}{K+1} \sum_{k=0}^{K} e^{(k)}, \qquad \hat y_{ui} = e_u^\top e_i

Settings of the paper / official code, and what this implementation uses:

* layer combination: uniform mean :math:`\alpha_k = 1/(K+1)` (as the paper);
* layers :math:`K`: ``config.gcn_layers`` (the paper reports K = 3 as best; MetaMMF's default is 2);
* embedding size: ``config.embedding_dim`` (64 by default, the paper's 64);
* init: normal, std 0.1 (the official PyTorch code);
* loss: BPR plus ``reg_weight`` times the L2 norm of the batch's *ego* (layer-0) embeddings divided by
  the batch size (the paper's 1e-4; set it with ``train.reg_weight``); no dropout.
* optimiser, lr (1e-3), batch size and early stopping are the shared trainer's.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch_geometric.nn import LGConv

from models.base import ModelInputs
from models.baselines.node_embeddings import PropagatedNodeEmbeddings
from models.config import GraphConfig
from models.graph.utils import autocast_off, bipartite_edge_index, symmetric_norm_adjacency


class LightGCN(PropagatedNodeEmbeddings):
    """LightGCN over the training interactions.

    Args:
        inputs: the graph size and the training (user, item) pairs: the graph.
        config: ``embedding_dim`` and ``gcn_layers`` are used.
        reg_weight: L2 weight on the batch ego embeddings.
    """

    def __init__(self, inputs: ModelInputs, config: GraphConfig, reg_weight: float = 1e-4):
        super().__init__(inputs, config, reg_weight)
        n_users, n_items = self.n_users, self.n_items
        self.embedding = nn.Embedding(n_users + n_items, config.embedding_dim)
        # Normalisation precomputed once: the layers get the normalised adjacency as PyG's ``adj_t``.
        self.convs = nn.ModuleList(LGConv(normalize=False) for _ in range(config.gcn_layers))
        edge_index = bipartite_edge_index(inputs.train_pairs.long(), n_users, n_items)
        self.register_buffer("edge_index", edge_index, persistent=False)
        self._adj: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding.weight, std=0.1)

    def adjacency(self) -> Tensor:
        if self._adj is None or self._adj.device != self.edge_index.device:
            self._adj = symmetric_norm_adjacency(self.edge_index, self.n_users + self.n_items)
        return self._adj

    def propagate(self) -> Tensor:
        """Final embeddings of all nodes [users | items]: the mean of e^(0..K)."""
        adj = self.adjacency()
        h = self.embedding.weight
        total = h
        with autocast_off(h):
            for conv in self.convs:
                h = conv(h, adj)
                total = total + h
        return total / (len(self.convs) + 1)
