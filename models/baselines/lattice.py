r"""LATTICE (Zhang et al., ACM MM 2021): latent item-item structures mined from the modalities, added to a
LightGCN collaborative-filtering backbone.

**Item-item graphs.** For every modality :math:`m` a kNN graph keeps, for each item, its :math:`k` most
cosine-similar other items, weighted by the similarity, and is normalised as
:math:`\tilde S = D^{-1/2} S D^{-1/2}` (:math:`D` = row sums):

* the *initial* graph :math:`\tilde S^m_0` from the raw (here: standardised) features, built once;
* the *learned* graph :math:`\tilde S^m` from projected features :math:`\tilde e_i^m = W_m e_i^m + b_m`,
  rebuilt at the first training step of every epoch, as the official code does (``build_item_graph``
  is true for an epoch's first batch only; the other batches use that graph detached), so the
  projections are trained through the similarities of the selected neighbours at that step. (The kNN
  search over all items dominates a step: rebuilding it at every step made an epoch on TikTok
  about 20x slower.) Inference builds it from the current weights.

The modality graphs are combined with learned weights :math:`\alpha = \mathrm{softmax}(a)`, and the
latent graph keeps a skip connection to the initial one:

.. math::
    S = (1 - \lambda)\, \mathrm{norm}\big(\textstyle\sum_m \alpha_m S^m\big)
        + \lambda \textstyle\sum_m \alpha_m \tilde S^m_0, \qquad
    h_i^{(l)} = \textstyle\sum_j S_{ij} h_j^{(l-1)}, \quad h^{(0)} = e^{id}_{items}

**Recommendation.** LightGCN (:class:`models.baselines.lightgcn.LightGCN`, PyG ``LGConv``) smooths the free user
and item ID embeddings over the user-item graph; the item-graph output is added, L2-normalised:
:math:`e_i = e_i^{LightGCN} + h_i^{(L)} / \lVert h_i^{(L)} \rVert`, :math:`\hat y_{ui} = e_u^\top e_i`.
The item-graph layers are PyG ``LGConv(normalize=False)`` with the normalised similarities as edge
weights (:math:`\sum_j S_{ij} h_j`).

Settings (paper / official code -> here):

* :math:`k` = 10 (``config.lattice_knn_k``), cosine similarity; :math:`\lambda` = 0.9
  (``config.lattice_lambda``); item-graph layers 1 (``config.lattice_item_layers``); modality
  weights initialised equal; projection width 64 (``feat_embed_dim``) -> ``config.embedding_dim``;
* CF backbone LightGCN, 2 layers -> ``config.gcn_layers``; embedding size 64 ->
  ``config.embedding_dim``; Xavier-uniform init of the ID embeddings (official code);
* loss: BPR plus ``reg_weight`` x the L2 norm of the batch's *final* embeddings / batch size (the
  official ``decay`` term); optimiser, lr and early stopping are the shared trainer's.

Deviations:

* the kNN graphs exclude the item itself (the official top-k includes it, with similarity 1, as one
  of the k), so each item has exactly :math:`k` other neighbours;
* similarities are clamped at 0 before normalisation (the official code takes the square root of
  the row sums as they are; negative cosine among the top-k would give NaNs there);
* the raw features stay fixed, standardised like every model here (``config.normalize_features``);
  the official code also fine-tunes the feature matrices (``from_pretrained(freeze=False)``), the
  paper trains only the projections;
* the kNN search is exact, chunked (no dense :math:`n \times n` matrix kept); the graphs are sparse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import LGConv
from torch_geometric.utils import to_torch_csr_tensor

from models.base import ModelInputs, l2_penalty
from models.baselines.lightgcn import LightGCN
from models.config import LATTICEConfig
from models.graph.utils import FeatureStandardizer, autocast_off

KNN_CHUNK = 2048  # rows per block of the similarity matrix during the top-k search


@torch.no_grad()
def knn_neighbours(x: Tensor, k: int, chunk: int = KNN_CHUNK) -> Tensor:
    """(n, k) indices of each row's ``k`` most cosine-similar *other* rows, exact, computed over row
    blocks of the similarity matrix (at most ``chunk`` x n at a time)."""
    n = x.shape[0]
    if not 0 < k < n:
        raise ValueError(f"k={k} neighbours needs 0 < k < n_items={n}")
    unit = F.normalize(x.detach(), dim=1)
    blocks = []
    for start in range(0, n, chunk):
        sim = unit[start : start + chunk] @ unit.T
        rows = torch.arange(sim.shape[0], device=x.device)
        sim[rows, rows + start] = float("-inf")  # no self loops
        blocks.append(sim.topk(k, dim=1).indices)
    return torch.cat(blocks)


def cosine_to(x: Tensor, neighbours: Tensor) -> Tensor:
    """(n, k) cosine similarity of each row of ``x`` to its ``neighbours`` (differentiable in ``x``)."""
    unit = F.normalize(x, dim=1)
    return (unit.unsqueeze(1) * unit[neighbours]).sum(-1)


def inv_sqrt_degree(row_sums: Tensor) -> Tensor:
    """:math:`d^{-1/2}`, 0 for an empty row (the official ``compute_normalized_laplacian``)."""
    return torch.where(row_sums > 0, row_sums.clamp_min(1e-12).rsqrt(), torch.zeros_like(row_sums))


def normalized_knn(neighbours: Tensor, similarity: Tensor) -> Tensor:
    r"""Values :math:`S_{ij} / \sqrt{d_i d_j}` of the kNN graph (row sums :math:`d`), shape (n, k)."""
    d = inv_sqrt_degree(similarity.sum(1))
    return d.unsqueeze(1) * similarity * d[neighbours]


@torch.no_grad()
def nearest_by_cosine(queries: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(indices (b, k), cosine similarities clamped at 0 (b, k)) of each query's ``k`` most similar keys."""
    sim = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
    top = sim.topk(min(k, keys.shape[0]), dim=1)
    return top.indices, top.values.clamp_min(0)


def knn_edge_index(neighbours: Tensor) -> Tensor:
    """PyG ``edge_index`` (row 0 = source neighbour j, row 1 = target item i) of a (n, k) kNN graph."""
    n, k = neighbours.shape
    targets = torch.arange(n, device=neighbours.device).repeat_interleave(k)
    return torch.stack([neighbours.reshape(-1), targets])


class LATTICE(LightGCN):
    """LightGCN plus LATTICE's learned item-item graph.

    Args:
        inputs: the item features (modalities in ``modality_dims`` order) and the training (user, item) pairs.
        config: ``embedding_dim``, ``gcn_layers``, ``normalize_features``, ``lattice_knn_k``,
            ``lattice_lambda``, ``lattice_item_layers`` are used.
        reg_weight: L2 weight on the batch's final embeddings.
    """

    def __init__(self, inputs: ModelInputs, config: LATTICEConfig, reg_weight: float = 1e-4) -> None:
        super().__init__(inputs, config, reg_weight)
        item_features, modality_dims = inputs.item_features, inputs.modality_dims
        self.k = config.lattice_knn_k
        self.skip = config.lattice_lambda
        self.standardizer = FeatureStandardizer(item_features, config.normalize_features)
        features = self.standardizer(item_features)
        self.modalities = list(modality_dims)
        start = 0
        for n, dim in enumerate(modality_dims.values()):
            x = features[:, start : start + dim].contiguous()
            start += dim
            self.register_buffer(f"features_{n}", x, persistent=False)
            # The initial graph S_0^m: built once from the (fixed) features, normalised per modality.
            neighbours = knn_neighbours(x, self.k)
            similarity = cosine_to(x, neighbours).clamp_min(0)
            self.register_buffer(f"initial_neighbours_{n}", neighbours, persistent=False)
            self.register_buffer(f"initial_weights_{n}", normalized_knn(neighbours, similarity), persistent=False)
        dim = config.embedding_dim
        self.projections = nn.ModuleList(nn.Linear(d, dim) for d in modality_dims.values())
        self.modal_weight = nn.Parameter(torch.full((len(modality_dims),), 1.0 / len(modality_dims)))
        self.item_convs = nn.ModuleList(LGConv(normalize=False) for _ in range(config.lattice_item_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._epoch_graph: Tensor | None = None  # S of this epoch, detached, as a CSR adj_t
        nn.init.xavier_uniform_(self.embedding.weight[: self.n_users])  # the official separate tables
        nn.init.xavier_uniform_(self.embedding.weight[self.n_users :])
        if hasattr(self, "projections"):  # LightGCN.__init__ calls this before they exist
            for projection in self.projections:
                projection.reset_parameters()
            nn.init.constant_(self.modal_weight, 1.0 / len(self.modalities))

    def item_graph(self) -> tuple[Tensor, Tensor]:
        """The latent item-item graph S as (edge_index, edge_weight) over item indices; duplicate
        edges (a pair in several modality graphs) are summed by the propagation."""
        alpha = torch.softmax(self.modal_weight, dim=0)
        learned, initial = [], []
        for n, projection in enumerate(self.projections):
            z = projection(getattr(self, f"features_{n}"))
            neighbours = knn_neighbours(z, self.k)
            learned.append((neighbours, alpha[n] * cosine_to(z, neighbours).clamp_min(0)))
            initial.append((getattr(self, f"initial_neighbours_{n}"), alpha[n] * getattr(self, f"initial_weights_{n}")))
        # norm(sum_m alpha_m S^m): one degree vector over the union of the modality graphs.
        d = inv_sqrt_degree(sum(s.sum(1) for _, s in learned))
        edges, weights = [], []
        for neighbours, s in learned:
            edges.append(knn_edge_index(neighbours))
            weights.append(((1 - self.skip) * d.unsqueeze(1) * s * d[neighbours]).reshape(-1))
        for neighbours, s in initial:
            edges.append(knn_edge_index(neighbours))
            weights.append((self.skip * s).reshape(-1))
        return torch.cat(edges, dim=1), torch.cat(weights)

    def on_epoch_start(self) -> None:
        self._epoch_graph = None  # S is rebuilt at the epoch's first step

    def current_item_graph(self) -> tuple[Tensor, Tensor | None]:
        """S for this step, as LGConv's ``(edge_index, edge_weight)``. Training: built (with gradients to
        the projections) at an epoch's first step, then reused detached, as a CSR ``adj_t`` (a sparse
        product instead of a gather-scatter over the edges), until the next epoch, as in the official
        code. Inference: built from the current weights (restoring the best epoch's weights restores its
        graph)."""
        if not self.training:
            return self.item_graph()
        if self._epoch_graph is None:
            edge_index, edge_weight = self.item_graph()
            n = self.n_items
            self._epoch_graph = to_torch_csr_tensor(edge_index.flip(0), edge_weight.detach(), size=(n, n))
            return edge_index, edge_weight
        return self._epoch_graph, None

    def item_graph_embedding(self) -> Tensor:
        """:math:`h^{(L)}` of all items: the item ID embeddings propagated over S."""
        h = self.embedding.weight[self.n_users :]
        with autocast_off(h):
            edge_index, edge_weight = self.current_item_graph()
            for conv in self.item_convs:
                h = conv(h, edge_index, edge_weight)
        return h

    def get_embedding(self) -> tuple[Tensor, Tensor]:
        final = self.propagate()
        items = final[self.n_users :] + F.normalize(self.item_graph_embedding(), dim=1)
        return final[: self.n_users], items

    @torch.no_grad()
    def embed_unseen_items(self, features: Tensor) -> Tensor:
        """Items outside the catalogue, from their features: LightGCN's part of a node without edges (the mean
        item ID embedding, averaged with K empty layers) plus the item-graph term of a row of S built for them
        as for a catalogue item (their k nearest catalogue items per modality by the learned and by the initial
        similarity, normalised with their own and the catalogue's degrees) over the catalogue's states."""
        x = self.standardizer(features)
        alpha = torch.softmax(self.modal_weight, dim=0)
        learned, initial = [], []  # per modality: (catalogue rows (b, k), weights (b, k))
        new_sums, catalogue_sums, start = 0.0, 0.0, 0
        for n, projection in enumerate(self.projections):
            catalogue = getattr(self, f"features_{n}")
            query, start = x[:, start : start + catalogue.shape[1]], start + catalogue.shape[1]
            z = projection(catalogue)
            catalogue_sums = catalogue_sums + alpha[n] * cosine_to(z, knn_neighbours(z, self.k)).clamp_min(0).sum(1)
            rows, sim = nearest_by_cosine(projection(query), z, self.k)
            learned.append((rows, alpha[n] * sim))
            new_sums = new_sums + alpha[n] * sim.sum(1)
            rows, sim = nearest_by_cosine(query, catalogue, self.k)
            initial_degree = inv_sqrt_degree(
                cosine_to(catalogue, getattr(self, f"initial_neighbours_{n}")).clamp_min(0).sum(1)
            )
            weights = inv_sqrt_degree(sim.sum(1)).unsqueeze(1) * sim * initial_degree[rows]
            initial.append((rows, alpha[n] * weights))
        d_new, d_catalogue = inv_sqrt_degree(new_sums), inv_sqrt_degree(catalogue_sums)
        # The catalogue's item-graph states one layer short of the last: the new rows take the last step.
        states = self.embedding.weight[self.n_users :]
        if len(self.item_convs) > 1:  # the catalogue's graph is needed only for the layers before the last
            edge_index, edge_weight = self.item_graph()
            for conv in self.item_convs[:-1]:
                states = conv(states, edge_index, edge_weight)
        h = sum(
            ((1 - self.skip) * d_new.unsqueeze(1) * s * d_catalogue[rows]).unsqueeze(-1) * states[rows]
            for rows, s in learned
        )
        h = h + sum((self.skip * w).unsqueeze(-1) * states[rows] for rows, w in initial)
        lightgcn = self.embedding.weight[self.n_users :].mean(0) / (len(self.convs) + 1)
        return lightgcn + F.normalize(h.sum(1), dim=1)

    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        user_emb, item_emb = self.get_embedding()
        u, pos, neg = user_emb[users], item_emb[pos_items], item_emb[neg_items]
        return self.ranking_loss(users, pos_items, neg_items, u, pos, neg) + self.reg_weight * l2_penalty(u, pos, neg)
