"""training/allocator.py: freed memory kept in glibc's heap (fewer page faults per training step), its
setting and the clear error for a bad one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.patience import HANG_GUARD_S
from training.allocator import ENV, keep_freed_memory, pad_from_env

ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Allocates and frees 40 MB tensors as a GAT step on TikTok does (35 MB); prints the page faults per round.
FAULTS = """
import resource, sys, torch
from training.allocator import keep_freed_memory
print(keep_freed_memory())
x = torch.randn(10_000_000)  # 40 MB: above the largest size glibc ever serves from its heap by itself
def rounds(n):
    for _ in range(n):
        y = x * 2.0
        z = y + 1.0
        del y, z
rounds(5)  # as the first steps of a training run: the kept heap grows to what a step needs
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(20)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 20)
"""


def test_setting_from_the_environment_and_its_errors() -> None:
    assert pad_from_env({}) == 512
    assert pad_from_env({ENV: " 64 "}) == 64 and pad_from_env({ENV: "0"}) == 0
    with pytest.raises(ValueError, match=f"{ENV}='lots' is not a whole number"):
        pad_from_env({ENV: "lots"})
    with pytest.raises(ValueError, match=f"{ENV}=4096 is outside 0..2047"):
        pad_from_env({ENV: "4096"})
    assert keep_freed_memory(0) is False


@glibc
def test_kept_memory_saves_the_page_faults_of_large_tensors() -> None:
    def faults(keep_mb: str) -> tuple[bool, float]:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S,
            env={**os.environ, ENV: keep_mb, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        applied, per_round = out.stdout.split()
        return applied == "True", float(per_round)

    (off, without), (on, kept) = faults("0"), faults("512")
    assert not off and on
    # Without: both 40 MB results are mapped and unmapped every round (about 20,000 faults of 4 KB pages).
    assert without > 5_000 and kept < 0.1 * without, (without, kept)


def test_training_cli_names_a_bad_setting() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "training", "train", "--out", "unused"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, ENV: "lots"}, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert out.returncode == 2 and f"error: {ENV}='lots' is not a whole number of MB" in out.stderr, out.stderr
    assert not (ROOT / "unused").exists()
