"""The CSR sparse-dense product the graph models share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import to_torch_csr_tensor


def csr_matmul(matrix: Tensor, x: Tensor) -> Tensor:
    """``matrix @ x`` for a CSR ``matrix`` and a dense ``x``, in the matrix's dtype; not differentiable (the
    callers are autograd Functions that multiply by the transposed matrix in their backward pass).

    On CPU the product is an ``embedding_bag``: row r of the result is the sum of x's rows at the column indices
    of matrix row r, weighted by its values, i.e. the CSR arrays are the bags (indices, offsets,
    per-sample weights). On CPU that kernel is faster than PyTorch's CSR "sum" product, which zero-fills the
    output first, and that one is faster than the MKL path ``@`` takes
    (docs/performance.md, "The CSR sparse-dense product"). On CUDA ``@`` (cuSPARSE). Under bf16 autocast ``x``
    arrives as bfloat16: with a float32 matrix (``MeanAggregation``) the product runs in float32; ``SAGERows``
    passes a bfloat16 matrix to compute it in bfloat16.
    """
    x = x.to(matrix.dtype)
    if x.device.type != "cpu":
        return matrix @ x
    return F.embedding_bag(
        matrix.col_indices(),
        x.detach().contiguous(),  # (a tensor that requires grad would take the slower, differentiable kernel)
        matrix.crow_indices(),
        mode="sum",
        per_sample_weights=matrix.values(),
        include_last_offset=True,
    )


def csr_pair(edge_index: Tensor, weights: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """The weighted adjacency of edges ``source -> target`` (row = target) and its transpose, as CSR tensors:
    what :class:`SparseMatmul` multiplies by in the forward and the backward pass."""
    source, target = edge_index
    size = (num_nodes, num_nodes)
    return (
        to_torch_csr_tensor(torch.stack([target, source]), weights, size),
        to_torch_csr_tensor(torch.stack([source, target]), weights, size),
    )


class SparseMatmul(torch.autograd.Function):
    """``matrix @ x`` differentiable in ``x``; the backward pass multiplies by ``transposed``, built once with
    the matrix instead of transposed (re-sorted) on every step."""

    @staticmethod
    def forward(ctx, x: Tensor, matrix: Tensor, transposed: Tensor) -> Tensor:
        ctx.transposed = transposed
        return csr_matmul(matrix, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        return (csr_matmul(ctx.transposed, grad) if ctx.needs_input_grad[0] else None), None, None
