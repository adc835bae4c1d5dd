"""Uniform, fanout-bounded L-hop neighbour sampling over a CSR, vectorised in torch.

Used by :meth:`models.metammf_gcn.MetaMMF_GCN.calculate_sampled_loss` for mini-batch GraphSAGE training
whose memory scales with the sampled subgraph rather than with the whole graph.

Why not PyG's ``NeighborLoader`` / ``LinkNeighborLoader`` (or ``torch_geometric.sampler.NeighborSampler``):
their sampling kernels live in the optional C++ extensions ``pyg-lib`` or ``torch-sparse``, which have no
build for every torch release (none for the torch this project runs on); without them PyG raises
``ImportError: 'NeighborSampler' requires either 'pyg-lib' or 'torch-sparse'``. Sampling is a few sorts
and gathers, so this module does it in plain torch, on whatever device the graph lives on, with the same
semantics as PyG's sampler (``num_neighbors`` = ``fanouts``, hop 1 first, -1 = all neighbours,
uniform without replacement, seeds first in the node list, then the nodes first reached at hop 1, 2, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SampledSubgraph:
    """A sampled L-hop neighbourhood of some seed nodes.

    Attributes:
        n_id: (n,) global ids of the subgraph's nodes, unique: the seeds first, then the nodes first
            reached at hop 1, hop 2, ...
        edge_index: (2, e) sampled edges ``source -> target`` in local ids (rows of ``n_id``). Every node
            first reached at hop ``k < L`` has at most ``fanouts[k]`` incoming sampled edges (all of its
            in-edges when it has no more than that); nodes first reached at hop ``L`` have none.
        seed_index: local id of each seed as passed to :meth:`NeighborSampler.sample` (duplicates allowed).
        hop_sizes: number of nodes first reached at hop 0 (the unique seeds), 1, ..., L.
    """

    n_id: Tensor
    edge_index: Tensor
    seed_index: Tensor
    hop_sizes: list[int]


class NeighborSampler:
    """Uniform neighbour sampler over a fixed graph stored as CSR by target (in-neighbours).

    Vectorised: one pass per hop over the frontier's CSR segments (no Python loop over nodes). A node
    with more in-neighbours than the fanout gets a uniformly random subset (without replacement): a
    random key per candidate edge, a sort by (node, key), the first ``fanout`` of each node. Time and
    transient memory per hop are linear in the frontier's total degree, held as 1-D index tensors.

    Not thread-safe: a (num_nodes,) scratch map from global to local ids is reused between calls.

    Args:
        edge_index: (2, E) edges ``source -> target`` (for an undirected graph, both directions).
        num_nodes: number of nodes.
    """

    def __init__(self, edge_index: Tensor, num_nodes: int) -> None:
        source, target = edge_index
        order = torch.argsort(target, stable=True)
        counts = torch.bincount(target, minlength=num_nodes)
        self.rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.col = source[order]
        self.num_nodes = num_nodes
        self.device = edge_index.device
        self._local = torch.full((num_nodes,), -1, dtype=torch.long, device=self.device)

    def degree(self, nodes: Tensor) -> Tensor:
        """In-degree of ``nodes``."""
        return self.rowptr[nodes + 1] - self.rowptr[nodes]

    def sample_neighbors(
        self, nodes: Tensor, fanout: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Up to ``fanout`` (-1: all) uniformly drawn in-neighbours of each of ``nodes``.

        Returns (segment, neighbour): ``neighbour[k]`` is a sampled in-neighbour (global id) of
        ``nodes[segment[k]]``; grouped by segment.
        """
        start = self.rowptr[nodes]
        deg = self.rowptr[nodes + 1] - start
        segment = torch.repeat_interleave(torch.arange(len(nodes), device=self.device), deg)
        offset_of_segment = deg.cumsum(0) - deg
        edge = start[segment] + torch.arange(len(segment), device=self.device) - offset_of_segment[segment]
        if fanout >= 0 and bool((deg > fanout).any()):
            capped = (deg > fanout)[segment]
            seg_c, edge_c = segment[capped], edge[capped]
            # Random order inside each capped node's segment: shuffle, then a stable sort by segment.
            perm = torch.randperm(len(seg_c), device=self.device, generator=generator)
            perm = perm[torch.argsort(seg_c[perm], stable=True)]
            seg_c, edge_c = seg_c[perm], edge_c[perm]
            rank_in_segment = torch.arange(len(seg_c), device=self.device) - torch.searchsorted(seg_c, seg_c)
            keep = rank_in_segment < fanout
            segment = torch.cat([segment[~capped], seg_c[keep]])
            edge = torch.cat([edge[~capped], edge_c[keep]])
        return segment, self.col[edge]

    def sample(
        self, seeds: Tensor, fanouts: Sequence[int], generator: torch.Generator | None = None
    ) -> SampledSubgraph:
        """The ``len(fanouts)``-hop sampled neighbourhood of ``seeds``: hop ``k + 1`` samples up to
        ``fanouts[k]`` in-neighbours of every node first reached at hop ``k`` (the seeds are hop 0).

        This is the subgraph an L-layer message-passing network needs to compute the seeds' layer-L
        states; with every fanout at least the maximum degree (or -1) those states are exact.
        """
        local = self._local
        n_id, seed_index = seeds.unique(return_inverse=True)
        parts, hop_sizes = [n_id], [len(n_id)]
        sources, targets = [], []
        count = len(n_id)
        try:
            local[n_id] = torch.arange(count, device=self.device)
            frontier = n_id
            for fanout in fanouts:
                segment, neighbor = self.sample_neighbors(frontier, int(fanout), generator)
                new = neighbor[local[neighbor] < 0].unique()
                local[new] = torch.arange(count, count + len(new), device=self.device)
                count += len(new)
                sources.append(local[neighbor])
                targets.append(local[frontier][segment])
                parts.append(new)
                hop_sizes.append(len(new))
                frontier = new
            n_id = torch.cat(parts)
        finally:
            local[torch.cat(parts)] = -1  # leave the scratch map clean, also after an error
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        edge_index = torch.stack([torch.cat(sources or [empty]), torch.cat(targets or [empty])])
        return SampledSubgraph(n_id, edge_index, seed_index, hop_sizes)
