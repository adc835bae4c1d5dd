"""models/graph/edge_ops.py: the sparse-kernel edge scores and weighted sums give the values and gradients of
the gather/scatter formulas they replace."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.utils import coalesce, scatter

from models.graph.edge_ops import EdgePattern, _EdgeScores, _WeightedSum, edge_scores, weighted_sum

N_NODES, DIM = 40, 6


def _edges(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    edges = coalesce(torch.randint(0, N_NODES, (2, 150), generator=g), num_nodes=N_NODES)
    return edges[:, torch.randperm(edges.shape[1], generator=g)]  # not in any sorted order


def _inputs(n_edges: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(N_NODES, DIM, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    weights = torch.rand(n_edges, generator=g, dtype=dtype).requires_grad_()
    return a, b, weights


def test_pattern_orders_edges_by_target_and_keeps_every_edge() -> None:
    edges = _edges()
    pattern = EdgePattern(edges, N_NODES)
    source, target = pattern.edge_index
    assert (target[1:] >= target[:-1]).all()
    assert set(map(tuple, pattern.edge_index.T.tolist())) == set(map(tuple, edges.T.tolist()))
    values = torch.arange(edges.shape[1], dtype=torch.float32)
    dense = torch.zeros(N_NODES, N_NODES)
    dense[target, source] = values
    torch.testing.assert_close(pattern.matrix(values).to_dense(), dense)
    torch.testing.assert_close(pattern.transposed(values).to_dense(), dense.T)


def test_values_and_gradients_match_gather_scatter() -> None:
    pattern = EdgePattern(_edges(), N_NODES)
    source, target = pattern.edge_index
    a, b, weights = _inputs(pattern.edge_index.shape[1])
    upstream = torch.Generator().manual_seed(2)
    score_grad = torch.randn(len(source), generator=upstream)
    sum_grad = torch.randn(N_NODES, DIM, generator=upstream)

    def run(scores_fn, sum_fn) -> list[torch.Tensor]:
        for t in (a, b, weights):
            t.grad = None
        scores, summed = scores_fn(), sum_fn()
        ((scores * score_grad).sum() + (summed * sum_grad).sum()).backward()
        return [scores.detach(), summed.detach(), a.grad.clone(), b.grad.clone(), weights.grad.clone()]

    ours = run(lambda: edge_scores(a, b, pattern), lambda: weighted_sum(weights, b, pattern))
    reference = run(
        lambda: (a[target] * b[source]).sum(-1),
        lambda: scatter(weights[:, None] * b[source], target, dim=0, dim_size=N_NODES, reduce="sum"),
    )
    for mine, expected in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["scores", "sum"])
def test_gradcheck_in_float64(op: str) -> None:
    pattern = EdgePattern(_edges(3), N_NODES)
    a, b, weights = _inputs(pattern.edge_index.shape[1], torch.float64)
    # The public ops cast to float32; check the autograd functions' backward formulas in float64.
    if op == "scores":
        assert torch.autograd.gradcheck(lambda a, b: _EdgeScores.apply(a, b, pattern), (a, b))
    else:
        assert torch.autograd.gradcheck(lambda w, x: _WeightedSum.apply(w, x, pattern), (weights, b))


def test_detached_weights_get_no_gradient_and_nodes_without_incoming_edges_sum_to_zero() -> None:
    edges = _edges()
    edges = edges[:, edges[1] != 0]  # node 0 receives nothing
    pattern = EdgePattern(edges, N_NODES)
    _, b, weights = _inputs(pattern.edge_index.shape[1])
    summed = weighted_sum(weights.detach(), b, pattern)
    summed.sum().backward()
    assert b.grad is not None and weights.grad is None
    assert (summed[0] == 0).all() and (summed[1:].abs().sum(1) > 0).any()
