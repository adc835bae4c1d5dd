r"""MetaMMF_GCN: dynamic multimodal fusion with a GraphSAGE backbone over the user-item graph.

Item nodes start from :math:`h_i^0 = [e_i^m ; e_i^c]`, user nodes from a free embedding :math:`h_u^0`.
Each layer is GraphSAGE with mean aggregation (PyG :class:`~torch_geometric.nn.SAGEConv`):

.. math::
    h_v^{l+1} = \mathrm{LeakyReLU}\big(W_1^l h_v^l + W_2^l \tfrac{1}{|N(v)|}\textstyle\sum_{w \in N(v)} h_w^l\big)

The final embedding is :math:`h^L` (``layer_combine='last'``) or :math:`\frac{1}{L+1}\sum_l h^l`
(``'mean'``), and :math:`\hat y_{ui} = e_u^\top e_i`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv
from torch_geometric.utils import coalesce, to_torch_csr_tensor

from models.base import RecModel, bpr_loss, l2_penalty
from models.config import ModelConfig
from models.metammf_mf import MultimodalItemEncoder, fusion_weights


def bipartite_edge_index(train_pairs: Tensor, n_users: int, n_items: int) -> Tensor:
    """Undirected, de-duplicated edges over nodes [users | items] (item j is node n_users + j)."""
    users, items = train_pairs[:, 0], train_pairs[:, 1] + n_users
    edge_index = torch.stack([torch.cat([users, items]), torch.cat([items, users])])
    return coalesce(edge_index, num_nodes=n_users + n_items)


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
    ):
        super().__init__()
        if init not in ("default", "mean", "residual"):
            raise ValueError(f"unknown SAGE init {init!r} (expected 'default', 'mean' or 'residual')")
        self.convs = nn.ModuleList(SAGEConv(dim, dim, aggr="mean", bias=bias) for _ in range(n_layers))
        self.activation = nn.LeakyReLU(leaky_slope)
        self.layer_combine = layer_combine
        self.init = init
        self.activate_last = activate_last

    @classmethod
    def from_config(cls, config: ModelConfig) -> SAGETower:
        """The tower a :class:`MetaMMF_GCN` with ``config`` uses (also rebuilt by the service)."""
        return cls(
            config.embedding_dim,
            config.gcn_layers,
            config.leaky_slope,
            config.layer_combine,
            init=config.sage_init,
            bias=config.sage_bias,
            activate_last=config.activate_last,
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

    def forward(self, x: Tensor, adj_t: Tensor) -> list[Tensor]:
        """All node states [h^0, ..., h^L] on the graph with (transposed, CSR) adjacency ``adj_t``."""
        states = [x]
        for layer, conv in enumerate(self.convs):
            states.append(self._activate(layer, conv(states[-1], adj_t)))
        return states

    def _activate(self, layer: int, h: Tensor) -> Tensor:
        last = layer == len(self.convs) - 1
        return h if last and not self.activate_last else self.activation(h)

    def combine(self, states: list[Tensor]) -> Tensor:
        return states[-1] if self.layer_combine == "last" else torch.stack(states).mean(0)

    def node_update(self, layer: int, own: Tensor, neighbor_mean: Tensor) -> Tensor:
        """One layer for nodes outside the training graph, given the mean of their neighbours' states;
        identical to what :class:`SAGEConv` computes for nodes inside it."""
        conv = self.convs[layer]
        return self._activate(layer, conv.lin_l(neighbor_mean) + conv.lin_r(own))

    def isolated(self, x: Tensor) -> list[Tensor]:
        """States of nodes with no neighbours yet (a freshly added item)."""
        states = [x]
        for layer in range(len(self.convs)):
            states.append(self.node_update(layer, states[-1], torch.zeros_like(states[-1])))
        return states


class MetaMMF_GCN(RecModel):
    """MetaMMF with GraphSAGE message passing over the training interactions.

    Args:
        n_users: number of users.
        item_features: (n_items, d_x) concatenated raw multimodal features.
        train_pairs: (n, 2) training (user, item) index pairs: the graph.
        config: model hyper-parameters (``gcn_layers``, ``layer_combine``, fusion settings).
        reg_weight: L2 weight on the batch ego representations.
    """

    def __init__(
        self,
        n_users: int,
        item_features: Tensor,
        train_pairs: Tensor,
        config: ModelConfig,
        reg_weight: float = 1e-4,
    ) -> None:
        super().__init__()
        self.config = config
        self.n_users, self.n_items = n_users, item_features.shape[0]
        self.reg_weight = reg_weight
        dim = config.embedding_dim
        self.user_embedding = nn.Embedding(n_users, dim)
        self.items = MultimodalItemEncoder(config, item_features)
        self.graph = SAGETower.from_config(config)
        edge_index = bipartite_edge_index(train_pairs.long(), self.n_users, self.n_items)
        self.register_buffer("edge_index", edge_index, persistent=False)
        self._adj_t: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user_embedding.weight, std=0.1)
        self.items.reset_parameters()
        self.graph.reset_parameters()

    def _adjacency(self) -> Tensor:
        # Sparse CSR mean aggregation is about twice as fast as scatter on CPU; built once per device.
        if self._adj_t is None or self._adj_t.device != self.edge_index.device:
            n = self.n_users + self.n_items
            self._adj_t = to_torch_csr_tensor(self.edge_index.flip(0), size=(n, n))
        return self._adj_t

    def _dropped_adjacency(self) -> Tensor:
        """The adjacency with a random ``edge_dropout`` share of the (directed) edges removed."""
        n = self.n_users + self.n_items
        keep = torch.rand(self.edge_index.shape[1], device=self.edge_index.device) >= self.config.edge_dropout
        return to_torch_csr_tensor(self.edge_index[:, keep].flip(0), size=(n, n))

    def layer_states(self) -> tuple[list[Tensor], Tensor]:
        """Per-layer node states [h^0..h^L] (each (n_users + n_items, d)) and the item ego states.
        In training mode with ``edge_dropout`` > 0 the graph is a fresh random subgraph per call."""
        item_ego = self.items()
        x = torch.cat([self.user_embedding.weight, item_ego])
        drop = self.training and self.config.edge_dropout > 0
        adj_t = self._dropped_adjacency() if drop else self._adjacency()
        return self.graph(x, adj_t), item_ego

    def get_embedding(self) -> tuple[Tensor, Tensor]:
        states, _ = self.layer_states()
        final = self.graph.combine(states)
        return final[: self.n_users], final[self.n_users :]

    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        states, item_ego = self.layer_states()
        final = self.graph.combine(states)
        u, pos, neg = final[users], final[self.n_users + pos_items], final[self.n_users + neg_items]
        loss = bpr_loss((u * pos).sum(-1), (u * neg).sum(-1))
        if self.config.reg_target == "final":
            reg = l2_penalty(u, pos, neg)
        else:
            reg = l2_penalty(self.user_embedding(users), item_ego[pos_items], item_ego[neg_items])
        loss = loss + self.reg_weight * reg
        if self.config.layer_reg > 0:
            weights = self.graph.weights() + fusion_weights(self.items.fusion)
            loss = loss + self.config.layer_reg * sum(w.pow(2).sum() for w in weights) / 2
        return loss
