"""Full-graph vs neighbour-sampled MetaMMF_GCN training steps: seconds per step and peak memory.

Each mode runs in its own subprocess, so each peak (``ru_maxrss``) is its own; seconds per step are the
median and mean over ``--steps`` steps after one warm-up step. ``peak_mb`` is the whole
process (torch, data, model); ``before_steps_mb`` the peak before the first step (data loaded, model
built), so their difference is what the training steps add.

    python bench/sampling.py --config configs/tiktok-metammf_gcn.yaml --steps 10
    python bench/sampling.py --config configs/tiktok-metammf_gcn.yaml --fanouts 5 5 5 --batch-size 512
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args: argparse.Namespace) -> dict:
    import torch

    from training.cli import load_data
    from training.config import load_run_config
    from training.sampling import BPRSampler
    from training.trainer import build_model, make_optimizer, seed_everything

    run = load_run_config(args.config, args.set)
    batch_size = args.batch_size or run.train.batch_size
    data = load_data(run.data)
    seed_everything(run.train.seed)
    model = build_model(data, run.model, run.train.reg_weight)
    optimizer = make_optimizer(model, run.train.lr)
    sampler = BPRSampler(data.train, data.n_items, batch_size, seed=run.train.seed)
    fanouts = args.fanouts or [10] * run.model.gcn_layers
    generator = torch.Generator().manual_seed(run.train.seed)
    batches = (batch for _ in iter(int, 1) for batch in sampler.epoch())  # epoch after epoch
    model.train()

    def step() -> float:
        users, pos, neg = (torch.from_numpy(a) for a in next(batches))
        if args.mode == "sampled":
            loss = model.calculate_sampled_loss(users, pos, neg, fanouts, generator)
        else:
            loss = model.calculate_loss(users, pos, neg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    before = peak_mb()
    step()  # warm-up (builds the cached adjacency or sampler)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    row = {
        "mode": args.mode,
        "batch_size": batch_size,
        "seconds_per_step_median": round(statistics.median(times), 4),
        "seconds_per_step_mean": round(statistics.mean(times), 4),
    }
    if args.mode == "sampled":  # the size of one more batch's sampled subgraph
        users, pos, neg = (torch.from_numpy(a) for a in next(batches))
        sub = model.neighbor_sampler().sample(torch.cat([users, data.n_users + pos, data.n_users + neg]), fanouts)
        row.update(fanouts=fanouts, subgraph_nodes=len(sub.n_id), subgraph_edges=sub.edge_index.shape[1])
    total_nodes = data.n_users + data.n_items
    row.update(graph_nodes=total_nodes, graph_edges=model.edge_index.shape[1])
    row.update(before_steps_mb=round(before), peak_mb=round(peak_mb()))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiktok.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--fanouts", type=int, nargs="+")
    parser.add_argument("--mode", choices=["full", "sampled"], help="one mode in this process (internal)")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    for mode in ("full", "sampled"):
        command = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        print(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
