"""Data-parallel training with ``torch.distributed``, launched by ``torchrun``.

    torchrun --nproc_per_node 2 -m training train --config configs/tiktok.yaml --out artifacts/tiktok

Every rank holds the whole model (and graph) and draws the same global batches (the BPR sampler is
seeded identically); rank ``r`` computes the loss of its contiguous share of each global batch, and
:class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients. Each rank's loss is scaled
by ``n_r * world_size / n`` (:func:`local_share`), so the averaged gradient is exactly the gradient of
the mean loss over the whole global batch, even when the shares differ in size: up to float rounding,
N processes take the same optimisation steps as one. Rank 0 alone evaluates, logs and writes artifacts,
and broadcasts its stop decision (early stopping, ``max_seconds``) so every rank leaves the loop together.

The backend follows the device: NCCL on CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``), gloo on CPU. Rank,
world size and rendezvous come from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without them (``WORLD_SIZE`` unset or 1) nothing here
is used and training runs the plain single-process loop.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

_DDP_OPTIONS = inspect.signature(DistributedDataParallel.__init__).parameters


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_context() -> DistContext:
    """This process's rank and world size: from an initialised process group, else from torchrun's
    environment variables, else a single process."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    return DistContext(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local_rank)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(device: str | torch.device) -> Iterator[tuple[DistContext, torch.device]]:
    """Yield this process's :class:`DistContext` and the device it trains on, joining the process group
    for the duration (and leaving it after) when launched by torchrun with more than one process. A group
    initialised by the caller is used as it is and left open."""
    ctx, device = env_context(), torch.device(device)
    if not ctx.enabled:
        yield ctx, device
        return
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend_for(device))
    try:
        yield env_context(), device
    finally:
        if created:
            dist.destroy_process_group()


def local_share(n: int, ctx: DistContext) -> tuple[slice, float]:
    """This rank's contiguous share of a global batch of ``n`` triples, and the factor to scale its
    (batch-mean) loss by: ``n_r * world_size / n``, so that DDP's gradient average equals the gradient
    of the mean loss over all ``n`` (terms that do not depend on the batch, like ``layer_reg``, come out
    once, as the scales add up to ``world_size``). An empty share has scale 0."""
    start, stop = n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size
    return slice(start, stop), (stop - start) * ctx.world_size / n


class LossForward(nn.Module):
    """The model with ``forward = loss_fn`` (our models compute their loss in ``calculate_loss``, not in
    ``forward``), so :class:`DistributedDataParallel` can hook the gradient all-reduce to it."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch: Tensor) -> Tensor:
        return self.loss_fn(*batch)


def data_parallel(model: nn.Module, loss_fn: Callable[..., Tensor], device: torch.device) -> DistributedDataParallel:
    """``model`` wrapped for data-parallel training; calling the result runs ``loss_fn`` and makes the
    following ``backward()`` all-reduce (average) the gradients.

    The parameters are broadcast from rank 0 once here. Buffers are not broadcast before every step:
    they are data (graph, standardised features), identical on every rank and constant in training.
    Every parameter takes part in every loss, so ``find_unused_parameters`` stays off (it would cost a
    graph traversal per step).
    """
    # torch >= 2.13 names the option forward_sync_buffers (and deprecates broadcast_buffers).
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_OPTIONS else "broadcast_buffers"
    return DistributedDataParallel(
        LossForward(model, loss_fn),
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False,
        **{no_buffer_sync: False},
    )


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank."""
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def all_reduce_sum(value: float, device: torch.device) -> float:
    """The sum of ``value`` over all ranks."""
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())
