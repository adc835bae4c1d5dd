r"""Attention-style message passing as sparse-matrix kernels: per-edge scores and weighted sums whose
edge values are learned (and so need gradients).

Written with gathers and scatters, ``(x[target] * x[source]).sum(-1)`` and
``scatter(w[:, None] * x[source], target)`` materialise several (E, d) tensors per call and as many in
the backward pass. Over a fixed edge pattern both are standard sparse kernels, with no (E, d)
intermediate:

* edge scores :math:`s_e = a_{t_e}^\top b_{s_e}`: an SDDMM, ``torch.sparse.sampled_addmm`` on the
  pattern; backward :math:`\partial a = G b`, :math:`\partial b = G^\top a` with :math:`G` the pattern
  holding the incoming gradient;
* weighted sum :math:`o_t = \sum_{e: t_e = t} w_e x_{s_e}`: an SpMM :math:`o = W x`; backward
  :math:`\partial x = W^\top \partial o`, :math:`\partial w_e = \partial o_{t_e}^\top x_{s_e}` (an SDDMM).

PyTorch's own autograd through a CSR tensor's values is far slower (a backward pass over 119k edges took
1.2 s), hence the two autograd functions. On the TikTok graph (119k edges, d = 32, one CPU core) the scores
take 0.9 ms instead of 23 ms and the weighted sum 0.8 ms instead of 14 ms; a GRCN training step is 2.3x
faster. Computed in float32 (bf16 autocast is turned off inside).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.index import index2ptr

from models.graph.csr import csr_matmul


class EdgePattern:
    """A fixed set of directed edges ``source -> target`` over ``num_nodes`` nodes, in target-major order
    (the CSR order, row = target), with the permutation to the transposed (source-major) order.

    Per-edge values passed to :func:`edge_scores` / :func:`weighted_sum` and returned by them follow
    :attr:`edge_index`, which is the input's edges sorted by (target, source).

    Args:
        edge_index: (2, E) edges, row 0 = source, row 1 = target; no duplicates.
        num_nodes: number of nodes.
    """

    def __init__(self, edge_index: Tensor, num_nodes: int) -> None:
        source, target = edge_index
        order = torch.argsort(target * num_nodes + source)
        self.edge_index = edge_index[:, order]
        source, target = self.edge_index
        self.num_nodes = num_nodes
        self.crow = index2ptr(target, num_nodes)
        self.transpose_order = torch.argsort(source * num_nodes + target)
        self.transpose_crow = index2ptr(source[self.transpose_order], num_nodes)
        self.transpose_col = target[self.transpose_order]

    @property
    def target(self) -> Tensor:
        return self.edge_index[1]

    def matrix(self, values: Tensor) -> Tensor:
        """The (num_nodes, num_nodes) CSR matrix with ``values`` at (target, source)."""
        size = (self.num_nodes, self.num_nodes)
        return torch.sparse_csr_tensor(self.crow, self.edge_index[0], values, size, check_invariants=False)

    def transposed(self, values: Tensor) -> Tensor:
        """The transposed matrix: ``values`` at (source, target)."""
        size = (self.num_nodes, self.num_nodes)
        return torch.sparse_csr_tensor(
            self.transpose_crow, self.transpose_col, values[self.transpose_order], size, check_invariants=False
        )

    def sampled_products(self, a: Tensor, b: Tensor) -> Tensor:
        r""":math:`a_{t_e}^\top b_{s_e}` for every edge (no gradient)."""
        pattern = self.matrix(torch.zeros(self.edge_index.shape[1], dtype=a.dtype, device=a.device))
        return torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values()


class _EdgeScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, pattern: EdgePattern) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.pattern = pattern
        return pattern.sampled_products(a.contiguous(), b.contiguous())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        a, b = ctx.saved_tensors
        pattern: EdgePattern = ctx.pattern
        grad = grad.contiguous()
        grad_a = csr_matmul(pattern.matrix(grad), b) if ctx.needs_input_grad[0] else None
        grad_b = csr_matmul(pattern.transposed(grad), a) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


class _WeightedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: Tensor, x: Tensor, pattern: EdgePattern) -> Tensor:
        ctx.save_for_backward(weights, x)
        ctx.pattern = pattern
        return csr_matmul(pattern.matrix(weights), x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weights, x = ctx.saved_tensors
        pattern: EdgePattern = ctx.pattern
        grad = grad.contiguous()
        grad_weights = pattern.sampled_products(grad, x.contiguous()) if ctx.needs_input_grad[0] else None
        grad_x = csr_matmul(pattern.transposed(weights), grad) if ctx.needs_input_grad[1] else None
        return grad_weights, grad_x, None


def edge_scores(a: Tensor, b: Tensor, pattern: EdgePattern) -> Tensor:
    r"""(E,) inner products :math:`a_{t_e}^\top b_{s_e}` over ``pattern``'s edges (differentiable in both)."""
    with torch.autocast(a.device.type, enabled=False):
        return _EdgeScores.apply(a.float(), b.float(), pattern)


def weighted_sum(weights: Tensor, x: Tensor, pattern: EdgePattern) -> Tensor:
    r"""(num_nodes, d) :math:`o_t = \sum_{e: t_e = t} w_e x_{s_e}` (differentiable in ``weights`` and ``x``)."""
    with torch.autocast(x.device.type, enabled=False):
        return _WeightedSum.apply(weights.float(), x.float(), pattern)
