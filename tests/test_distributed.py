"""Data-parallel training: ``torchrun --nproc_per_node 2 -m training train`` (gloo, CPU) takes the same
steps as one process, so weights, losses, early stopping and metrics match a single-process run.

The tolerance: both runs compute the same gradients in a different summation order (each rank sums
its half of the batch, then gloo adds the halves), so they differ by float32 rounding, about 1e-7
relative per step. Adam divides each gradient element by its running RMS, which amplifies that rounding
for elements whose gradient is almost zero; here (a dozen steps) the largest weight difference is about
1e-6, checked with ``atol=1e-5, rtol=1e-4``. (On TikTok, 40 steps, a few elements differ by up to 3e-3
with mean differences of 1e-6 and equal metrics: exactly what accumulating the two halves' gradients in
one process gives too.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.patience import HANG_GUARD_S
from tests.training_support import SMALL_MODEL, TINY
from training.config import load_run_config
from training.data import load_mmrec, save_mmrec
from training.distributed import DistContext, local_share
from training.synthetic import generate_synthetic
from training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# Odd batch size: the two shares of a batch differ in size (150/151), and so does the last batch.
# patience=1 makes the run stop early (at epoch 3 of 8), so the ranks must follow rank 0's decision.
SETTINGS = [
    "train.epochs=8",
    "train.batch_size=301",
    "train.lr=0.01",
    "train.patience=1",
    "train.seed=3",
    "model.layer_reg=0.0001",
    *(f"model.{k}={v}" for k, v in SMALL_MODEL.items()),
]
ATOL, RTOL = 1e-5, 1e-4


@pytest.mark.parametrize("n", [1, 2, 7, 300, 301])
def test_local_shares_partition_the_batch_and_scales_average_to_one(n: int) -> None:
    world = 2 if n != 7 else 3
    shares = [local_share(n, DistContext(rank, world)) for rank in range(world)]
    covered = [i for share, _ in shares for i in range(n)[share]]
    assert covered == list(range(n))  # contiguous, disjoint, in rank order
    assert sum(scale for _, scale in shares) == pytest.approx(world)
    for share, scale in shares:
        size = len(range(n)[share])
        assert scale == pytest.approx(size * world / n)
        assert size in (n // world, -(-n // world))
    if n < world:
        assert any(scale == 0 for _, scale in shares)  # an empty share: forward with weight 0


def test_two_processes_match_one(tmp_path: Path) -> None:
    data_dir, art = tmp_path / "data", tmp_path / "art"
    save_mmrec(generate_synthetic(TINY), data_dir)
    # --standalone: a local rendezvous on a free port chosen by the OS.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training", "train", "--data", str(data_dir), "--out", str(art), "--no-progress",
               *(arg for s in SETTINGS for arg in ("--set", s))]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # The single-process reference, meanwhile, with the config the CLI resolves.
    cfg = load_run_config(None, [*SETTINGS, f"data.path={json.dumps(str(data_dir))}", "train.progress=false"])
    single = train(load_mmrec(data_dir), cfg.model, cfg.train)
    assert single is not None and len(single.history) < cfg.train.epochs  # it stops early

    stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)  # one JSON document: only rank 0 prints
    metrics = json.loads((art / "metrics.json").read_text())

    assert metrics["epochs_run"] == len(single.history)
    assert metrics["best_epoch"] == single.best_epoch == summary["best_epoch"]
    losses = [h["loss"] for h in metrics["history"]]
    assert losses == pytest.approx([h["loss"] for h in single.history], rel=1e-5)
    weights, reference = load_file(art / "model.safetensors"), single.model.state_dict()
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, atol=ATOL, rtol=RTOL, msg=name)
    for split in ("valid", "test"):
        expected = getattr(single, split).metrics
        assert metrics[split] == pytest.approx(expected, abs=1e-6), split
    for h, ref in zip(metrics["history"], single.history, strict=True):
        assert h["valid_recall@20"] == pytest.approx(ref["valid_recall@20"], abs=1e-6)
