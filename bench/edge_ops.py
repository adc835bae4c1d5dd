"""GRCN's attention as sparse kernels (models/graph/edge_ops.py) against per-edge gathers and scatters.

On GRCN's refining graph of a data set (both directions of every training edge), times forward + backward of
the edge scores ``x_t . x_s`` (SDDMM against ``(x[target] * x[source]).sum(-1)``) and of the weighted sum
``sum_e w_e x_s`` (SpMM against ``scatter(w[:, None] * x[source], target)``), then a whole GRCN training step
with each formulation (the gather/scatter one patched into models/baselines/grcn.py for its rows). Each row: the median
of ``--steps`` timed calls after one warm-up, the two formulations alternated ``--repeats`` times in this
process (best kept), so both see the same background load; the loss of both steps is checked to agree.

    python bench/edge_ops.py                        # TikTok (../shared/data/tiktok), one thread
    python bench/edge_ops.py --dataset tiny --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import Tensor
from torch_geometric.utils import scatter, softmax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import BATCH, ROOT, SYNTHETIC_SETS, load_dataset, model_config

import models.baselines.grcn
from models.graph.edge_ops import EdgePattern, edge_scores, weighted_sum
from training.allocator import keep_freed_memory
from training.sampling import BPRSampler
from training.trainer import build_model, make_optimizer


def gather_scores(a: Tensor, b: Tensor, pattern: EdgePattern) -> Tensor:
    source, target = pattern.edge_index
    return (a[target] * b[source]).sum(-1)


def gather_weighted_sum(weights: Tensor, x: Tensor, pattern: EdgePattern) -> Tensor:
    source, target = pattern.edge_index
    return scatter(weights.unsqueeze(1) * x[source], target, dim=0, dim_size=pattern.num_nodes, reduce="sum")


def gather_attention(x: Tensor, pattern: EdgePattern) -> tuple[Tensor, Tensor]:
    """models.baselines.grcn.attention written with gathers and scatters (what models/graph/edge_ops.py fuses)."""
    alpha = softmax(gather_scores(x, x, pattern), pattern.target, num_nodes=pattern.num_nodes)
    return gather_weighted_sum(alpha, x, pattern), alpha


@contextlib.contextmanager
def gather_formulation() -> Iterator[None]:
    """models/baselines/grcn.py with its attention and weighted sums written with gathers and scatters."""
    with (
        mock.patch.object(models.baselines.grcn, "attention", gather_attention),
        mock.patch.object(models.baselines.grcn, "weighted_sum", gather_weighted_sum),
    ):
        yield


def median_ms(fn: Callable[[], object], steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="tiktok", choices=["tiktok", *SYNTHETIC_SETS])
    p.add_argument("--tiktok", type=Path, default=ROOT.parent / "shared" / "data" / "tiktok")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--steps", type=int, default=10, help="timed calls per row and repeat")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)

    data = load_dataset(args.dataset, args.tiktok)
    torch.manual_seed(0)
    model = build_model(data, model_config(args.dataset, "grcn", "cp"), reg_weight=1e-2)
    pattern = model.graphs().both
    n_edges, dim = pattern.edge_index.shape[1], model.config.fused_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(pattern.num_nodes, dim, generator=g, requires_grad=True)
    w = torch.rand(n_edges, generator=g, requires_grad=True)
    users, pos, neg = (torch.from_numpy(a) for a in next(BPRSampler(data.train, data.n_items, BATCH).epoch()))
    optimizer = make_optimizer(model, 1e-3)

    def grcn_step() -> float:
        loss = model.calculate_loss(users, pos, neg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    def gather_grcn_step() -> float:
        with gather_formulation():
            return grcn_step()

    with torch.no_grad():  # the same model either way: compare the loss before timing any step
        kernel_loss = model.calculate_loss(users, pos, neg).item()
        with gather_formulation():
            gather_loss = model.calculate_loss(users, pos, neg).item()
    if abs(kernel_loss - gather_loss) > 1e-5 * max(1.0, abs(gather_loss)):
        raise SystemExit(f"the two formulations differ: loss {kernel_loss} against {gather_loss}")

    rows = {
        "edge scores, fwd + bwd": (
            lambda: edge_scores(x, x, pattern).sum().backward(),
            lambda: gather_scores(x, x, pattern).sum().backward(),
        ),
        "weighted sum, fwd + bwd": (
            lambda: weighted_sum(w, x, pattern).sum().backward(),
            lambda: gather_weighted_sum(w, x, pattern).sum().backward(),
        ),
        "GRCN training step": (grcn_step, gather_grcn_step),
    }
    print(f"data: {args.dataset}; {n_edges:,} directed edges, {pattern.num_nodes:,} nodes, d = {dim}; "
          f"{args.threads} thread(s); loss of both steps {kernel_loss:.6f} / {gather_loss:.6f}\n")  # fmt: skip
    print("| operation | sparse kernels ms | gather/scatter ms | speed-up |")
    print("|---|---:|---:|---:|")
    for name, (kernels, gathers) in rows.items():
        best = [float("inf"), float("inf")]
        for _ in range(args.repeats):
            for i, fn in enumerate((kernels, gathers)):
                best[i] = min(best[i], median_ms(fn, args.steps))
        print(f"| {name} | {best[0]:.2f} | {best[1]:.2f} | {best[1] / best[0]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
