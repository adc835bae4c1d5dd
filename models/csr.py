"""The CSR sparse-dense product the graph models share."""

from __future__ import annotations

import torch
from torch import Tensor


def csr_matmul(matrix: Tensor, x: Tensor) -> Tensor:
    """``matrix @ x`` for a CSR ``matrix`` and a dense ``x``, in the matrix's dtype.

    On CPU, PyTorch's native CSR "sum" kernel is about 5x faster than the MKL path ``@`` takes (which
    zero-fills and copies the dense operand); it has no CUDA kernel, where ``@`` uses cuSPARSE. Under bf16
    autocast ``x`` arrives as bfloat16: the sparse product (autocast leaves it alone) runs in float32.
    """
    x = x.to(matrix.dtype)
    return torch.sparse.mm(matrix, x, "sum") if x.device.type == "cpu" else matrix @ x
