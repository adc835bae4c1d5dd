"""Float precision of training: plain fp32, TF32 matrix products (CUDA), or bf16 autocast.

* ``fp32``: everything in float32 (the default; what the CPU runs).
* ``tf32``: float32 tensors, but CUDA matrix products may use TF32 tensor cores (10-bit mantissa inputs,
  float32 accumulation): ``torch.set_float32_matmul_precision("high")`` for the run, evaluation included.
* ``bf16``: the loss's forward pass under ``torch.autocast(dtype=torch.bfloat16)``: matrix products in
  bfloat16, parameters, optimiser state and evaluation in float32. On CPU MetaMMF_GCN's GraphSAGE tower then
  runs in bfloat16 as a whole (``models/sage_rows.py``): on a CPU with bfloat16 instructions (an AMD EPYC
  with AVX512-BF16) its TikTok step was about 1.5x faster than fp32 at the same test Recall@20; on a CPU
  without them (AVX2 only) bfloat16 products are not expected to pay (not measured there).

docs/PERFORMANCE.md measures the speed and the accuracy of each, on CPU and on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import get_args

import torch

from training.config import Precision, check_precision

PRECISIONS: tuple[Precision, ...] = get_args(Precision)


@contextmanager
def run_precision(precision: Precision, device: torch.device | str) -> Iterator[None]:
    """For a whole run (training and evaluation): TF32 matrix products when asked for, restored after."""
    check_precision(precision, str(device))
    if precision != "tf32":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def step_precision(precision: Precision, device: torch.device | str) -> AbstractContextManager[object]:
    """For one loss computation (the forward pass; backward runs outside it, as autocast wants)."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()
