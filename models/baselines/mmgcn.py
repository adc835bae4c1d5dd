r"""MMGCN (Wei et al., ACM MM 2019): one graph per modality, modality representations averaged.

For each modality :math:`m` the nodes start from :math:`x^0 = \mathrm{normalize}([P_m ; \tilde f^m])`
(free user preferences :math:`P_m`, item features :math:`\tilde f^m`) and each layer :math:`l` computes
(official code, ``concate=False``, ``has_id=True``):

.. math::
    h = \mathrm{LeakyReLU}\big(\mathrm{mean}_{w \in N(v)} W^l x_w\big), \quad
    \hat x = \mathrm{LeakyReLU}(W_{lin}^l x_v + b) + e^{id}_v, \quad
    x_v \leftarrow \mathrm{LeakyReLU}(W_g^l h + b_g + \hat x)

with a shared ID embedding :math:`e^{id}` of all users and items. The final representation is the mean
over modalities of the last layer, :math:`\hat y_{ui} = r_u^\top r_i`.

Settings (official code -> here):

* mean aggregation over the neighbours (no self loops), add combination, ID embedding added at every
  layer; 3 layers in the official code -> ``config.gcn_layers``;
* ``dim_E`` = 64 -> ``config.embedding_dim``; modalities wider than 256 are first projected to 256 by
  a linear layer (the official code does this for the 2048-d visual features, and uses the 128-d
  acoustic and 100-d textual ones as they are);
* LeakyReLU slope 0.01 (PyTorch's default there) -> ``config.leaky_slope``; Xavier-normal init;
* loss: BPR plus ``reg_weight`` (the official ``weight_decay`` 1e-5) x the L2 norm of the batch's ID
  embeddings and its users' preferences / batch size (the official code's user preferences are plain
  tensors it never trains; here they are parameters). Features are standardised
  (``config.normalize_features``) like every model here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import ModelInputs, RecModel, l2_penalty
from models.config import MMGCNConfig
from models.graph.utils import (
    FeatureStandardizer,
    MeanAggregation,
    batch_rows,
    bipartite_edge_index,
    register_modalities,
)

MAX_INPUT_WIDTH = 256  # the official code projects its 2048-d visual features to 256


class ModalityGraph(nn.Module):
    """MMGCN's graph for one modality (the official ``GCN`` module)."""

    def __init__(self, n_users: int, feature_dim: int, dim: int, n_layers: int, leaky_slope: float) -> None:
        super().__init__()
        latent = MAX_INPUT_WIDTH if feature_dim > MAX_INPUT_WIDTH else None
        width = latent or feature_dim
        self.projection = nn.Linear(feature_dim, latent) if latent else None
        self.preference = nn.Parameter(torch.empty(n_users, width))
        widths = [width] + [dim] * (n_layers - 1)
        self.conv = nn.ParameterList(nn.Parameter(torch.empty(w, w)) for w in widths)  # W^l (no bias)
        self.linear = nn.ModuleList(nn.Linear(w, dim) for w in widths)
        self.combine = nn.ModuleList(nn.Linear(w, dim) for w in widths)
        self.leaky_slope = leaky_slope
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.preference)
        for weight in self.conv:
            nn.init.xavier_normal_(weight)
        for layer in [*self.linear, *self.combine] + ([self.projection] if self.projection else []):
            layer.reset_parameters()
            nn.init.xavier_normal_(layer.weight)

    def forward(self, features: Tensor, id_embedding: Tensor, aggregate: MeanAggregation) -> Tensor:
        items = self.projection(features) if self.projection is not None else features
        x = F.normalize(torch.cat([self.preference, items]), dim=1)
        for weight, linear, combine in zip(self.conv, self.linear, self.combine, strict=True):
            h = F.leaky_relu(aggregate(x @ weight), self.leaky_slope)
            x_hat = F.leaky_relu(linear(x), self.leaky_slope) + id_embedding
            x = F.leaky_relu(combine(h) + x_hat, self.leaky_slope)
        return x


class MMGCN(RecModel):
    """MMGCN over the training interactions.

    Args:
        n_users: number of users.
        item_features: (n_items, d_x) concatenated raw features.
        modality_dims: modality name -> width, in the column order of ``item_features``.
        train_pairs: (n, 2) training (user, item) pairs: the graph.
        config: ``embedding_dim``, ``gcn_layers``, ``leaky_slope``, ``normalize_features`` are used.
        reg_weight: L2 weight on the batch's ID embeddings and user preferences.
    """

    def __init__(self, inputs: ModelInputs, config: MMGCNConfig, reg_weight: float = 1e-4) -> None:
        super().__init__(inputs, config, reg_weight)
        item_features, modality_dims, train_pairs = inputs.item_features, inputs.modality_dims, inputs.train_pairs
        self.standardizer = FeatureStandardizer(item_features, config.normalize_features)
        register_modalities(self, self.standardizer(item_features), list(modality_dims.values()))
        self.modalities = list(modality_dims)
        self.id_embedding = nn.Parameter(torch.empty(self.n_users + self.n_items, config.embedding_dim))
        self.graphs = nn.ModuleList(
            ModalityGraph(self.n_users, dim, config.embedding_dim, config.gcn_layers, config.leaky_slope)
            for dim in modality_dims.values()
        )
        edge_index = bipartite_edge_index(train_pairs.long(), self.n_users, self.n_items)
        self.register_buffer("edge_index", edge_index, persistent=False)
        self._aggregation: MeanAggregation | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.id_embedding)
        for graph in self.graphs:
            graph.reset_parameters()

    def aggregation(self) -> MeanAggregation:
        if self._aggregation is None or self._aggregation.device != self.edge_index.device:
            self._aggregation = MeanAggregation(self.edge_index, self.n_users + self.n_items)
        return self._aggregation

    def propagate(self) -> Tensor:
        """Representations of all nodes [users | items]: the mean over the modality graphs."""
        aggregate = self.aggregation()
        reps = [
            graph(getattr(self, f"features_{n}"), self.id_embedding, aggregate) for n, graph in enumerate(self.graphs)
        ]
        return sum(reps[1:], reps[0]) / len(reps)

    def get_embedding(self) -> tuple[Tensor, Tensor]:
        final = self.propagate()
        return final[: self.n_users], final[self.n_users :]

    @torch.no_grad()
    def embed_unseen_items(self, features: Tensor) -> Tensor:
        """Per modality, the projected features with the mean item ID embedding through the layers of a node
        without neighbours (the aggregation term is 0, LeakyReLU(0) = 0); the modalities averaged."""
        x = self.standardizer(features)
        mean_id = self.id_embedding[self.n_users :].mean(0, keepdim=True)
        reps, start = [], 0
        for n, graph in enumerate(self.graphs):
            dim = getattr(self, f"features_{n}").shape[1]
            feats, start = x[:, start : start + dim], start + dim
            h = F.normalize(graph.projection(feats) if graph.projection is not None else feats, dim=1)
            for linear, combine in zip(graph.linear, graph.combine, strict=True):
                h_hat = F.leaky_relu(linear(h), graph.leaky_slope) + mean_id
                h = F.leaky_relu(combine(h.new_zeros(h.shape[0], combine.in_features)) + h_hat, graph.leaky_slope)
            reps.append(h)
        return sum(reps[1:], reps[0]) / len(reps)

    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        final = self.propagate()
        rows = batch_rows(self.n_users, users, pos_items, neg_items)
        u, pos, neg = final[rows].split(len(users))
        ids = self.id_embedding[rows].split(len(users))
        preferences = [graph.preference[users] for graph in self.graphs]
        reg = l2_penalty(*ids, *preferences)
        return self.ranking_loss(users, pos_items, neg_items, u, pos, neg) + self.reg_weight * reg
