"""Float precision of training: plain fp32, TF32 matrix products (CUDA), or bf16 autocast.

* ``fp32``: everything in float32 (the default; what the CPU runs).
* ``tf32``: float32 tensors, but CUDA matrix products may use TF32 tensor cores (10-bit mantissa inputs,
  float32 accumulation): ``torch.set_float32_matmul_precision("high")`` for the run, evaluation included.
* ``bf16``: the loss's forward pass under ``torch.autocast(dtype=torch.bfloat16)``: matrix products in
  bfloat16, parameters, optimiser state and evaluation in float32. On CPU MetaMMF_GCN's GraphSAGE tower then
  runs in bfloat16 as a whole (``models/graph/sage_rows.py``): on a CPU with bfloat16 instructions (an AMD EPYC
  with AVX512-BF16) its TikTok step was about 1.5x faster than fp32 at the same test Recall@20; on a CPU
  without them (AVX2 only) it was 10x slower than fp32 (71.9 against 7.4 s per 100 steps), so training there
  falls back to fp32 with a warning (``effective_precision``; ``models.hardware.bf16_instructions``).

docs/performance.md measures the speed and the accuracy of each, on CPU and on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import get_args

import torch

from models.hardware import bf16_instructions
from training.config import Precision, check_precision

PRECISIONS: tuple[Precision, ...] = get_args(Precision)
log = logging.getLogger(__name__)


def effective_precision(precision: Precision, device: torch.device | str) -> Precision:
    """The precision a run uses: ``precision``, except bf16 on a CPU without bfloat16 instructions, which
    trains in fp32 (with a warning): emulated bfloat16 products made the step about 10x slower."""
    if precision == "bf16" and torch.device(device).type == "cpu" and bf16_instructions() is None:
        log.warning(
            "train.precision=bf16, but this CPU has no bfloat16 instructions (no avx512_bf16, amx_bf16 or bf16 "
            "flag): emulated bfloat16 made a training step about 10x slower than fp32; training in fp32"
        )
        return "fp32"
    return precision


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
