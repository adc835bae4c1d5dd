"""Page faults of CPU training steps with and without freed memory kept in the heap (training/allocator.py).

For each model, trains ``--steps`` steps of 3000 triples (after ``--warmup``) in a fresh process with
``MMF_MALLOC_KEEP_MB=0`` (glibc's default behaviour) and with the amount the training entry points keep
(``--keep-mb``, default 512), alternating the two ``--repeats`` times (best kept), and prints a table:
seconds per 100 steps, page faults and kernel seconds per step, the peak resident memory and the speed-up.
Models are built with the settings of configs/tiktok-metammf_gcn.yaml, as bench/train.py builds them.

    python bench/allocator.py --models gat grcn metammf_gcn          # on ../shared/data/tiktok
    python bench/allocator.py --dataset tiny --models gat            # the small synthetic set
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import ROOT, SYNTHETIC_SETS, run_child

from models.registry import model_names
from training.allocator import DEFAULT_PAD_MB, ENV


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gat", "grcn", "metammf_gcn"], choices=model_names())
    p.add_argument("--dataset", default="tiktok", choices=["tiktok", *SYNTHETIC_SETS])
    p.add_argument("--tiktok", type=Path, default=ROOT.parent / "shared" / "data" / "tiktok")
    p.add_argument("--keep-mb", type=int, default=DEFAULT_PAD_MB, help=f"the {ENV} to compare with 0")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    print(f"data: {args.dataset}; {ENV}=0 (glibc default) against {ENV}={args.keep_mb}\n")
    print("| model | kept MB | s / 100 steps | page faults / step | kernel s / step | peak RSS MB | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model in args.models:
        best: dict[int, dict] = {}
        for pad in [0, args.keep_mb] * args.repeats:  # alternated: both see the same background load
            spec = {"dataset": args.dataset, "model": model, "tensor": "cp", "precision": "fp32", "impl": "ours",
                    "device": "cpu", "tiktok": str(args.tiktok), "steps": args.steps, "warmup": args.warmup,
                    "max_seconds": 600.0}  # fmt: skip
            r = run_child(spec, env={ENV: str(pad)})
            if "error" in r:
                raise SystemExit(f"{model} with {ENV}={pad}: {r['error']}")
            if pad not in best or r["s_per_100_steps"] < best[pad]["s_per_100_steps"]:
                best[pad] = r
        for pad, r in best.items():
            speedup = "-" if pad == 0 else f"{best[0]['s_per_100_steps'] / r['s_per_100_steps']:.2f}x"
            print(f"| {model} | {pad} | {r['s_per_100_steps']:.2f} | {r['page_faults_per_step']:,.0f} | "
                  f"{r['kernel_s_per_step']:.3f} | {r['peak_mb']:,.0f} | {speedup} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
