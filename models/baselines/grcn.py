r"""GRCN (Wei et al., ACM MM 2020): graph-refined convolutional network for implicit feedback.

Implicit feedback is noisy: some clicks do not reflect a user's taste. GRCN scores every training
edge from the content of its endpoints, prunes or down-weights the edges that do not fit, and
convolves the ID embeddings over the refined graph.

**Graph refining layer** (per modality :math:`m`, the official ``CGCN``). Items are
:math:`f_i = \mathrm{normalize}(\mathrm{LeakyReLU}(W_m x_i^m + b_m))`, users have a free preference
:math:`p_u`, normalised. A prototypical-network routing refines each user's prototype from the
content of its items, :math:`T` times:

.. math::
    \alpha_{ui} = \mathrm{softmax}_{i \in N(u)}(p_u^\top f_i), \qquad
    p_u \leftarrow \mathrm{normalize}\big(p_u + \textstyle\sum_{i \in N(u)} \alpha_{ui} f_i\big)

then one attention convolution over both directions of every edge gives the modality's content
representation :math:`c^m_v = x_v + \sum_{w \in N(v)} \alpha^m_{vw} x_w` (:math:`x` = prototypes and
item contents) and the edge scores :math:`\alpha^m_{vw} = \mathrm{softmax}_{w \in N(v)}(x_v^\top x_w)`,
in [0, 1]. As the inputs are unit vectors this is PyG's ``AGNNConv`` with :math:`\beta = 1` and no
self loops (a test checks it); here the attention is computed once and reused as the edge scores, with
sparse kernels instead of per-edge gathers (models/graph/edge_ops.py: a training step 2.3x faster on the CPU).

**Edge weights.** Each node carries a learned confidence per modality; the weight of the message
:math:`w \to v` is the max over modalities of score times the sender's confidence, pruned at 0
(official ``weight_mode='confid'``, ``pruning=True``):
:math:`\omega_{vw} = \mathrm{ReLU}\big(\max_m \alpha^m_{vw} \tanh(\kappa^m_w)\big) \in [0, 1]`.

**Graph convolution** (official ``EGCN``): free ID embeddings, normalised, summed over the refined
graph without transforms (PyG ``LGConv(normalize=False)`` with the weights as edge weights, the
official weighted ``SAGEConv`` with ``aggr='add'``; computed as one weighted sparse product per layer,
a test checks it against ``LGConv``), :math:`e = x + h^{(1)} + \dots + h^{(L)}`.
The final representation concatenates ID and content (``fusion_mode='concat'``):
:math:`r_v = [e_v ; c^1_v ; \dots ; c^M_v]`, :math:`\hat y_{ui} = r_u^\top r_i`.

Settings (official code -> here): routing iterations -> ``config.grcn_routing`` (3 by default);
ID width ``dim_E`` -> ``config.embedding_dim``, content width ``dim_C`` -> ``config.fused_dim``;
ID layers 2 -> ``config.gcn_layers``; ``has_norm=True``, ``has_act=False``; LeakyReLU slope
``config.leaky_slope``; edge dropout (``dropout_adj``) -> ``config.edge_dropout`` (training only);
Xavier-normal init of ID embeddings, preferences and confidences. Loss: BPR plus ``reg_weight`` x
the L2 norm of the batch's ID embeddings and its users' preferences / batch size (the official code
uses the element mean of the same terms).

Deviations / simplifications:

* the confidence enters through ``tanh`` (the official code uses the raw parameter): the same near
  its small Xavier initialisation, and it keeps every edge weight in [0, 1];
* the routing passes messages from items to their users, as the paper's prototype update reads
  (the official code runs that convolution on its directed (user, item) training edges, where
  which side receives depends on PyG's flow convention; we follow the paper);
* only the pre-extracted feature path (no word-embedding textual branch); features are
  standardised (``config.normalize_features``) like every model here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import coalesce, dropout_edge, softmax

from models.base import ModelInputs, RecModel, l2_penalty
from models.config import GRCNConfig
from models.graph.edge_ops import EdgePattern, edge_scores, weighted_sum
from models.graph.utils import FeatureStandardizer, batch_rows, register_modalities


def attention(x: Tensor, pattern: EdgePattern) -> tuple[Tensor, Tensor]:
    r"""Inner-product attention over ``pattern``'s edges (source -> target):
    :math:`\alpha_{vw} = \mathrm{softmax}_{w}(x_v^\top x_w)` per target :math:`v`, and
    :math:`\sum_w \alpha_{vw} x_w`, as sparse kernels (models/graph/edge_ops.py).
    Returns (aggregated (num_nodes, d), alpha (E,) in ``pattern.edge_index`` order)."""
    alpha = softmax(edge_scores(x, x, pattern), ptr=pattern.crow, num_nodes=pattern.num_nodes)
    return weighted_sum(alpha, x, pattern), alpha


class RefiningGraphs(NamedTuple):
    """The two edge sets of a refining step: items -> users (the prototype routing) and both directions."""

    to_users: EdgePattern
    both: EdgePattern

    @classmethod
    def from_user_item(cls, user_item: Tensor, num_nodes: int) -> RefiningGraphs:
        """``user_item``: (2, E) edges (user, n_users + item)."""
        to_users = user_item.flip(0)  # items send, users receive
        return cls(EdgePattern(to_users, num_nodes), EdgePattern(torch.cat([user_item, to_users], dim=1), num_nodes))


class ContentGraph(nn.Module):
    """GRCN's graph refining layer for one modality (the official ``CGCN``)."""

    def __init__(self, n_users: int, feature_dim: int, dim: int, routing: int, leaky_slope: float) -> None:
        super().__init__()
        self.n_users = n_users
        self.routing = routing
        self.leaky_slope = leaky_slope
        self.mlp = nn.Linear(feature_dim, dim)
        self.preference = nn.Parameter(torch.empty(n_users, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.mlp.reset_parameters()
        nn.init.xavier_normal_(self.preference)

    def item_content(self, features: Tensor) -> Tensor:
        """:math:`f_i = \\mathrm{normalize}(\\mathrm{LeakyReLU}(W x_i + b))`."""
        return F.normalize(F.leaky_relu(self.mlp(features), self.leaky_slope), dim=1)

    def forward(self, features: Tensor, graphs: RefiningGraphs) -> tuple[Tensor, Tensor]:
        """Content representation of all nodes and the edge scores on ``graphs.both``'s edges."""
        items = self.item_content(features)
        preference = F.normalize(self.preference, dim=1)
        for _ in range(self.routing):
            aggregated, _ = attention(torch.cat([preference, items]), graphs.to_users)
            preference = F.normalize(preference + aggregated[: self.n_users], dim=1)
        x = torch.cat([preference, items])
        aggregated, alpha = attention(x, graphs.both)
        return x + aggregated, alpha


class GRCN(RecModel):
    """GRCN over the training interactions.

    Args:
        n_users: number of users.
        item_features: (n_items, d_x) concatenated raw features.
        modality_dims: modality name -> width, in the column order of ``item_features``.
        train_pairs: (n, 2) training (user, item) pairs: the graph to refine.
        config: ``embedding_dim``, ``fused_dim``, ``gcn_layers``, ``grcn_routing``, ``leaky_slope``,
            ``edge_dropout``, ``normalize_features`` are used.
        reg_weight: L2 weight on the batch's ID embeddings and user preferences.
    """

    def __init__(self, inputs: ModelInputs, config: GRCNConfig, reg_weight: float = 1e-4) -> None:
        super().__init__(inputs, config, reg_weight)
        item_features, modality_dims, train_pairs = inputs.item_features, inputs.modality_dims, inputs.train_pairs
        self.n_nodes = self.n_users + self.n_items
        self.standardizer = FeatureStandardizer(item_features, config.normalize_features)
        register_modalities(self, self.standardizer(item_features), list(modality_dims.values()))
        pairs = train_pairs.long()
        user_item = coalesce(torch.stack([pairs[:, 0], self.n_users + pairs[:, 1]]), num_nodes=self.n_nodes)
        self.register_buffer("user_item", user_item, persistent=False)
        self.id_embedding = nn.Parameter(torch.empty(self.n_nodes, config.embedding_dim))
        self.content = nn.ModuleList(
            ContentGraph(self.n_users, dim, config.fused_dim, config.grcn_routing, config.leaky_slope)
            for dim in modality_dims.values()
        )
        self.confidence = nn.Parameter(torch.empty(self.n_nodes, len(modality_dims)))
        self._full_graphs: RefiningGraphs | None = None  # built on first use, on the buffers' device
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.id_embedding)
        nn.init.xavier_normal_(self.confidence)
        for graph in self.content:
            graph.reset_parameters()

    def graphs(self) -> RefiningGraphs:
        """The edges of this step: all training edges, minus dropped ones in training (then rebuilt)."""
        if self.training and self.config.edge_dropout > 0:
            kept = dropout_edge(self.user_item, p=self.config.edge_dropout)[0]
            return RefiningGraphs.from_user_item(kept, self.n_nodes)
        return self.full_graphs()

    def full_graphs(self) -> RefiningGraphs:
        """The refining graphs over all training edges, built once per device."""
        if self._full_graphs is None or self._full_graphs.both.edge_index.device != self.user_item.device:
            self._full_graphs = RefiningGraphs.from_user_item(self.user_item, self.n_nodes)
        return self._full_graphs

    def refine(self, graphs: RefiningGraphs) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(undirected edge_index, refined edge weights in [0, 1], content representations per modality)."""
        content, scores = [], []
        for n, layer in enumerate(self.content):
            rep, alpha = layer(getattr(self, f"features_{n}"), graphs)
            content.append(rep)
            scores.append(alpha)
        edge_index = graphs.both.edge_index
        confidence = torch.tanh(self.confidence)[edge_index[0]]  # the sender's, per modality
        weight = (torch.stack(scores, dim=1) * confidence).amax(dim=1).relu()
        return edge_index, weight, content

    def refined_edge_weights(self) -> tuple[Tensor, Tensor]:
        """The refined graph over all training edges: (edge_index (2, 2E) over [users | items], weights (2E,))."""
        edge_index, weight, _ = self.refine(self.full_graphs())
        return edge_index, weight

    def propagate(self) -> Tensor:
        """Final representations [users | items]: [ID over the refined graph ; content per modality]."""
        graphs = self.graphs()
        _, weight, content = self.refine(graphs)
        x = F.normalize(self.id_embedding, dim=1)
        total, h = x, x
        for _ in range(self.config.gcn_layers):  # LGConv(normalize=False) with the refined edge weights
            h = weighted_sum(weight, h, graphs.both)
            total = total + h
        return torch.cat([total, *content], dim=1)

    def get_embedding(self) -> tuple[Tensor, Tensor]:
        final = self.propagate()
        return final[: self.n_users], final[self.n_users :]

    @torch.no_grad()
    def embed_unseen_items(self, features: Tensor) -> Tensor:
        """Nodes without edges: ``[normalize(mean item ID embedding) ; f^1 ; ... ; f^M]`` (no messages to add to
        the ID part or to each modality's content ``f^m = normalize(LeakyReLU(W_m x^m + b_m))``)."""
        x = self.standardizer(features)
        mean_id = F.normalize(self.id_embedding[self.n_users :].mean(0), dim=0).expand(x.shape[0], -1)
        content, start = [], 0
        for n, layer in enumerate(self.content):
            width = getattr(self, f"features_{n}").shape[1]
            content.append(layer.item_content(x[:, start : start + width]))
            start += width
        return torch.cat([mean_id, *content], dim=1)

    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        final = self.propagate()
        rows = batch_rows(self.n_users, users, pos_items, neg_items)
        u, pos, neg = final[rows].split(len(users))
        reg = l2_penalty(*self.id_embedding[rows].split(len(users)), *(g.preference[users] for g in self.content))
        return self.ranking_loss(users, pos_items, neg_items, u, pos, neg) + self.reg_weight * reg
