r"""The training-step forward and backward of a GraphSAGE tower, for the batch's rows, written by hand.

:meth:`models.metammf.gcn.SAGETower.final_rows` computes, for layers :math:`l = 0 .. L-1` with weights
:math:`W_l` (neighbour mean, bias :math:`b_l`) and :math:`R_l` (own state),

.. math::
    m_l = A h_l, \qquad z_l = m_l W_l^\top + b_l + h_l R_l^\top, \qquad h_{l+1} = \mathrm{LeakyReLU}(z_l),

the last layer only for the batch's unique rows :math:`U`, and returns :math:`h_L[U]` or
:math:`\frac{1}{L+1}\sum_{l \le L} h_l[U]`. Left to autograd, that step is bound by memory traffic on a CPU:
every gather's backward zero-fills a (nodes x d) tensor, every gradient that reaches a state along two paths is
summed in a new tensor, and the combined states are summed over all nodes only to gather a quarter of them.
Here the backward pass runs layer by layer with the gradients of the own-state path and of the layer mean
added in place (``addmm_``, ``index_add_`` of the batch's rows), the forward pass sums only the batch's
rows, and the full layers' neighbour means :math:`m_l` are not kept: with :math:`P = A^\top \delta z_l`,
:math:`\partial W_l = \delta z_l^\top m_l = P^\top h_l` and :math:`A^\top (\delta z_l W_l) = P W_l`, so one sparse
product serves both. The same values and gradients (``tests/test_models.py``) with fewer passes over the
node states and 8 MB less kept per step on TikTok.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from models.graph.csr import csr_matmul


class TowerSettings(NamedTuple):
    slope: float  # LeakyReLU negative slope
    activate_last: bool  # LeakyReLU after the last layer too
    mean: bool  # average the states h^0..h^L (else return h^L)
    # The dtype of the tower's products, states and gradients (bf16 autocast: torch.bfloat16); None: the
    # input's. Inputs, outputs and gradients keep their own dtypes either way.
    compute_dtype: torch.dtype | None = None


class SAGERows(torch.autograd.Function):
    """``combine(states)[rows]`` of a GraphSAGE tower with a hand-written backward pass.

    Inputs: the ego states ``x`` (n, d); the row-normalised adjacency (CSR) and its transpose; the batch's
    unique ``rows``; the tower's settings; then per layer ``W_l`` (d, d), ``b_l`` (d,) or None, ``R_l`` (d, d)
    (``lin_l.weight``, ``lin_l.bias``, ``lin_r.weight`` of PyG's ``SAGEConv``).

    With ``tower.compute_dtype`` bfloat16 (what :meth:`SAGETower.final_rows` asks for under bf16 autocast) the
    states, products and gradients are bfloat16, as autocast would make them, but without autocast's casts
    around every product: ``x``, the weights and the matrices are cast once, the result and the gradients
    back once (products accumulate in float32 inside the kernels either way).
    """

    @staticmethod
    def forward(ctx, x: Tensor, matrix: Tensor, transposed: Tensor, rows: Tensor, tower: TowerSettings, *weights):
        slope, activate_last, mean, compute_dtype = tower
        dtype = compute_dtype or x.dtype  # (each cast below is a no-op when the dtype is already this)
        ctx.dtypes = x.dtype, [w.dtype if w is not None else None for w in weights]
        with torch.autocast(x.device.type, enabled=False):  # the casts are explicit here
            return SAGERows._forward(
                ctx, x.to(dtype), _csr_in(matrix, dtype), _csr_in(transposed, dtype), rows, slope, activate_last,
                mean, [w.to(dtype) if w is not None else None for w in weights], x.dtype,
            )  # fmt: skip

    @staticmethod
    def _forward(
        ctx, x: Tensor, matrix: Tensor, transposed: Tensor, rows: Tensor, slope: float, activate_last: bool,
        mean: bool, weights: list[Tensor | None], out_dtype: torch.dtype,
    ) -> Tensor:  # fmt: skip
        n_layers = len(weights) // 3
        states = [x]
        for layer in range(n_layers - 1):
            neighbor_weight, bias, own_weight = weights[3 * layer : 3 * layer + 3]
            # Not kept for the backward pass: it gets the gradient of W from A^T dz instead (see backward).
            neighbor_mean = csr_matmul(matrix, states[-1])
            z = _project(neighbor_mean, states[-1], neighbor_weight, bias, own_weight)
            states.append(F.leaky_relu(z, slope, inplace=True))
        neighbor_weight, bias, own_weight = weights[-3:]
        h = states[-1]
        # The last layer's neighbour means for the rows, as rows of A @ h: the batch's rows hold about three
        # quarters of the edges, so slicing the matrix to them first is slower than the full product.
        last_mean = csr_matmul(matrix, h).index_select(0, rows)
        last_own = h.index_select(0, rows)
        last = _project(last_mean, last_own, neighbor_weight, bias, own_weight)
        if activate_last:
            last = F.leaky_relu(last, slope, inplace=True)
        out = last.to(out_dtype)  # (the rows' sum in the output's dtype: a bfloat16 sum would round)
        if mean:
            out = out + last_own
            for state in states[:-1]:
                out += state.index_select(0, rows)
            out /= n_layers + 1
        ctx.slope, ctx.activate_last, ctx.mean = slope, activate_last, mean
        ctx.has_bias = [weights[3 * layer + 1] is not None for layer in range(n_layers)]
        ctx.save_for_backward(
            transposed, rows, last_mean, last_own, last, *states, *(w for w in weights if w is not None)
        )
        ctx.n_layers = n_layers
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x_dtype, weight_dtypes = ctx.dtypes
        n_layers = ctx.n_layers
        saved = list(ctx.saved_tensors)
        transposed, rows, last_mean, last_own, last = saved[:5]
        states = saved[5 : 5 + n_layers]
        params = iter(saved[5 + n_layers :])
        weights = [(next(params), next(params) if bias else None, next(params)) for bias in ctx.has_bias]
        slope = ctx.slope

        grad = grad.to(states[0].dtype).contiguous()  # in the compute dtype
        share = grad / (n_layers + 1) if ctx.mean else None  # each state's part of the layer mean
        grad_z = share if ctx.mean else grad
        if ctx.activate_last:
            grad_z = torch.ops.aten.leaky_relu_backward(grad_z, last, slope, True)
        weight_grads: list[tuple[Tensor, Tensor | None, Tensor]] = []
        neighbor_weight, _, own_weight = weights[-1]
        weight_grads.append(_weight_grads(grad_z.t() @ last_mean, grad_z, last_own, ctx.has_bias[-1]))
        own_grad = grad_z @ own_weight
        if share is not None:
            own_grad += share
        scattered = grad_z.new_zeros(states[-1].shape).index_add_(0, rows, grad_z @ neighbor_weight)
        grad_h = csr_matmul(transposed, scattered).index_add_(0, rows, own_grad)
        for layer in range(n_layers - 2, -1, -1):
            neighbor_weight, _, own_weight = weights[layer]
            grad_z = torch.ops.aten.leaky_relu_backward(grad_h, states[layer + 1], slope, True)
            # With pulled = A^T dz: dW = dz^T (A h) = pulled^T h and A^T (dz W) = pulled W.
            pulled = csr_matmul(transposed, grad_z)
            weight_grads.append(_weight_grads(pulled.t() @ states[layer], grad_z, states[layer], ctx.has_bias[layer]))
            grad_h = (pulled @ neighbor_weight).addmm_(grad_z, own_weight)
            if share is not None:
                grad_h.index_add_(0, rows, share)
        flat = [g for layer_grads in reversed(weight_grads) for g in layer_grads]
        flat = [g.to(dtype) if g is not None else None for g, dtype in zip(flat, weight_dtypes, strict=True)]
        return (grad_h.to(x_dtype) if ctx.needs_input_grad[0] else None, None, None, None, None, *flat)


def _csr_in(matrix: Tensor, dtype: torch.dtype) -> Tensor:
    """The CSR ``matrix`` with its values in ``dtype`` (the index arrays shared)."""
    if matrix.dtype == dtype:
        return matrix
    return torch.sparse_csr_tensor(
        matrix.crow_indices(), matrix.col_indices(), matrix.values().to(dtype), matrix.shape, check_invariants=False
    )


def _project(
    neighbor_mean: Tensor, own: Tensor, neighbor_weight: Tensor, bias: Tensor | None, own_weight: Tensor
) -> Tensor:
    """``lin_l(neighbor_mean) + lin_r(own)``, the second product added in place."""
    if bias is None:
        return torch.mm(neighbor_mean, neighbor_weight.t()).addmm_(own, own_weight.t())
    return torch.addmm(bias, neighbor_mean, neighbor_weight.t()).addmm_(own, own_weight.t())


def _weight_grads(
    neighbor_grad: Tensor, grad_z: Tensor, own: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Gradients of ``W_l`` (given), ``b_l``, ``R_l`` from the gradient ``grad_z`` of the layer's pre-activation."""
    return neighbor_grad, grad_z.sum(0) if has_bias else None, grad_z.t() @ own


def sage_rows(
    x: Tensor, matrix: Tensor, transposed: Tensor, rows: Tensor, tower: TowerSettings, weights: Sequence[Tensor | None]
) -> Tensor:
    """:class:`SAGERows` applied (``weights``: ``W_l, b_l, R_l`` per layer, flattened)."""
    return SAGERows.apply(x, matrix, transposed, rows, tower, *weights)
