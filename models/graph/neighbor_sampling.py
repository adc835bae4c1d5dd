"""Uniform, fanout-bounded L-hop neighbour sampling over a CSR, vectorised in torch.

Used by :meth:`models.metammf.gcn.MetaMMF_GCN.calculate_sampled_loss` for mini-batch GraphSAGE training
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
    random key per candidate edge, one sort by (node, key), the first ``fanout`` of each node. Time and
    transient memory per hop are linear in the frontier's total degree (plus a sort of the candidate
    edges of the capped nodes), held as 1-D index tensors.

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
        ``nodes[segment[k]]``.
        """
        start = self.rowptr[nodes]
        deg = self.rowptr[nodes + 1] - start
        everything = torch.arange(len(nodes), device=self.device)
        capped = deg > fanout if fanout >= 0 else None
        if capped is None or not bool(capped.any()):
            return self._all_neighbors(everything, start, deg)
        small, big = (~capped).nonzero().squeeze(1), capped.nonzero().squeeze(1)
        seg_small, neighbor_small = self._all_neighbors(small, start[small], deg[small])
        # Nodes with more than `fanout` neighbours: a random 31-bit key per candidate edge below the
        # node's number, one sort (grouped by node, random order within), the first `fanout` of each.
        start_big, deg_big = start[big], deg[big]
        segment = torch.repeat_interleave(torch.arange(len(big), device=self.device), deg_big)
        noise = torch.randint(0, 1 << 31, segment.shape, device=self.device, generator=generator)
        order = torch.argsort((segment << 31) | noise)
        offset = deg_big.cumsum(0) - deg_big
        first = (offset[:, None] + torch.arange(fanout, device=self.device)).flatten()
        kept_segment = torch.arange(len(big), device=self.device).repeat_interleave(fanout)
        edge = start_big[kept_segment] + order[first] - offset[kept_segment]
        return torch.cat([seg_small, big[kept_segment]]), torch.cat([neighbor_small, self.col[edge]])

    def _all_neighbors(self, segments: Tensor, start: Tensor, deg: Tensor) -> tuple[Tensor, Tensor]:
        """Every in-neighbour of the nodes whose CSR rows start at ``start`` (labelled ``segments``)."""
        offset = deg.cumsum(0) - deg
        edge = torch.repeat_interleave(start - offset, deg) + torch.arange(int(deg.sum()), device=self.device)
        return torch.repeat_interleave(segments, deg), self.col[edge]

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
