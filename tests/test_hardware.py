"""models/hardware.py: the CPUs a run may use, bfloat16 instructions; the trainer's use of both."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from models import hardware
from tests.patience import HANG_GUARD_S
from training.config import TrainConfig
from training.data import RecData
from training.precision import effective_precision
from training.trainer import cpu_threads, train


def test_usable_cpus_follows_affinity_and_the_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    none = tmp_path / "none"
    none.mkdir()
    assert hardware.usable_cpus(none) == affinity
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert hardware.usable_cpus(v2) == affinity
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert hardware.usable_cpus(v2) == 1
    (v2 / "cpu.max").write_text(f"{150000 * affinity} 100000\n")  # more quota than CPUs: the CPUs
    assert hardware.usable_cpus(v2) == affinity
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert hardware.usable_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert hardware.usable_cpus(v1) == affinity
    (v2 / "cpu.max").write_text("garbage\n")
    assert hardware.usable_cpus(v2) == affinity


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("flags\t\t: fpu sse2 avx2 avx512f avx512bw", None),
        ("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile", "avx512_bf16"),
        ("flags\t\t: fpu avx2 amx_bf16 amx_tile", "amx_bf16"),
        ("Features\t: fp asimd sve bf16 i8mm", "bf16"),
        ("Features\t: fp asimd", None),
    ],
)
def test_bf16_instructions_from_cpuinfo(tmp_path: Path, line: str, expected: str | None) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some CPU\n{line}\n\nprocessor\t: 1\n{line}\n")
    assert hardware.bf16_instructions(cpuinfo) == expected
    assert hardware.bf16_instructions(tmp_path / "missing") is None


def test_bf16_falls_back_to_fp32_on_a_cpu_without_it(monkeypatch, caplog, tiny_data: RecData, make_config) -> None:
    monkeypatch.setattr("training.precision.bf16_instructions", lambda: None)
    with caplog.at_level(logging.WARNING, logger="training.precision"):
        assert effective_precision("bf16", "cpu") == "fp32"
    assert "no bfloat16 instructions" in caplog.text and "training in fp32" in caplog.text
    assert effective_precision("bf16", "cuda") == "bf16" and effective_precision("fp32", "cpu") == "fp32"
    cfg = TrainConfig(epochs=2, batch_size=256, patience=10, progress=False, precision="bf16")
    assert train(tiny_data, make_config("metammf_mf"), cfg).precision == "fp32"
    monkeypatch.setattr("training.precision.bf16_instructions", lambda: "avx512_bf16")
    assert effective_precision("bf16", "cpu") == "bf16"
    assert train(tiny_data, make_config("metammf_mf"), cfg).precision == "bf16"


def test_cpu_threads_sets_and_restores(monkeypatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("training.trainer.usable_cpus", lambda: 3)
    with cpu_threads(None, torch.device("cpu")):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    with cpu_threads(1, torch.device("cpu")):
        assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice, which torch applied at start-up, stays
    with cpu_threads(None, torch.device("cpu")):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_openmp_waits_passively_only_on_a_busy_machine(monkeypatch, tmp_path: Path) -> None:
    measure = hardware.other_cpu_load
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(hardware, "other_cpu_load", lambda: 1.2)
    assert hardware.choose_openmp_wait().startswith("PASSIVE") and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(hardware, "other_cpu_load", lambda: 0.1)
    assert hardware.choose_openmp_wait().startswith("default") and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(hardware, "other_cpu_load", lambda: None)  # cannot tell: the default
    assert hardware.choose_openmp_wait().startswith("default") and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the caller's choice stays
    monkeypatch.setattr(hardware, "other_cpu_load", lambda: 1.2)
    assert hardware.choose_openmp_wait() == "ACTIVE (set by the caller)" and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 5 0 0 0 0 0\ncpu0 50 0 25 500 2 0 0 0 0 0\n")
    assert measure(0.01, stat) is None  # counters that did not move
    load = measure(0.05)
    assert load is None or 0.0 <= load <= (os.cpu_count() or 1) + 0.01


def test_entry_points_choose_the_openmp_wait_before_torch_loads() -> None:
    import subprocess
    import sys

    code = (
        "import os, runpy, sys\nsys.argv = ['x', '--help']\ntry:\n    runpy.run_module('{}', run_name='__main__')\n"
        "except SystemExit:\n    pass\nprint(os.environ.get('MMF_OPENMP_WAIT'), '|', os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for module in ("training", "training.experiments", "service"):
        out = subprocess.run([sys.executable, "-c", code.format(module)], capture_output=True, text=True, env=env,
                             cwd=Path(__file__).resolve().parents[1], timeout=HANG_GUARD_S)  # fmt: skip
        decision, policy = out.stdout.strip().splitlines()[-1].split(" | ")
        assert decision.startswith(("PASSIVE", "default")), (module, out.stdout[-500:], out.stderr[-500:])
        assert (policy == "PASSIVE") == decision.startswith("PASSIVE")
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # a policy the user set stays
    out = subprocess.run([sys.executable, "-c", code.format("training")], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=HANG_GUARD_S)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "ACTIVE (set by the caller) | ACTIVE"
