"""The benchmarks still run (tiny data, a couple of steps); no timing is asserted here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_bench_runs_and_reference_matches(tmp_path: Path) -> None:
    env = {**os.environ, "MMF_BENCH_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "bench/train.py", "--datasets", "tiny", "--steps", "2", "--warmup", "1",
         "--quality", "--target", "0.0", "--quality-seconds", "60"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| tiny |")]
    # 2 models x 2 tensors x (ours, authors-style)
    assert len(rows) == 8, out.stdout
    assert "error" not in out.stdout and "differ" not in out.stdout, out.stdout
    assert all(line.split("|")[5].strip().replace(".", "").isdigit() for line in rows)
    quality = [line for line in out.stdout.splitlines() if line.startswith("| metammf_")]
    assert len(quality) == 2 and "not reached" not in out.stdout, out.stdout
