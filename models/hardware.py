"""What the CPU offers a training run: the cores this process may actually use, and bfloat16 instructions.

* ``usable_cpus()``: the CPUs of the process' affinity mask, capped by a cgroup CPU quota (a container with
  ``--cpus=2`` on a 64-core host may use 2, not 64). torch's default thread count is every core of the host.
* ``bf16_instructions()``: the CPU feature that runs bfloat16 products natively (x86 ``avx512_bf16`` or
  ``amx_bf16``, Arm ``bf16``), or None. Without one, bfloat16 products are emulated: a MetaMMF_GCN step on a
  2-core AVX2 CPU ran 10x slower in bf16 than in fp32 (71.9 against 7.4 s per 100 steps).

OpenMP's waiting policy: threads that finish a parallel region first spin, by default, waiting for the others;
on a machine shared with other jobs they spin against them. Passive waits cost on a quiet machine, though
(``bench/train.py --contention``, TikTok MetaMMF_GCN step, 2 threads, 2 cores: 3.30 s per 100 steps with the
default against 5.00 passive; beside one CPU-bound job 9.69 against 6.39). ``choose_openmp_wait()`` asks for
passive waits only when the machine is busy at start; it must run before torch is imported (the OpenMP runtime
reads its environment when it loads), so the command-line entry points call it first.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


BUSY_CPUS = 0.5  # other processes using at least this much CPU at start: a shared machine


def other_cpu_load(sample_s: float = 0.25, stat: Path = Path("/proc/stat")) -> float | None:
    """CPUs' worth of work done by other processes over ``sample_s`` (this one sleeps meanwhile), from the
    machine-wide counters of ``/proc/stat``; None where they cannot be read."""

    def busy_and_total() -> tuple[int, int]:
        fields = [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # guest time is already counted in user
        return total - idle, total

    try:
        busy0, total0 = busy_and_total()
        time.sleep(sample_s)
        busy1, total1 = busy_and_total()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)


def choose_openmp_wait() -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when other processes are using the CPUs at start; leave libgomp's
    default (spin a while, then sleep) on a quiet machine, where it is faster; never override the caller's
    choice. Call before torch is imported. Returns what applies, for the log."""
    if "OMP_WAIT_POLICY" in os.environ:
        return f"{os.environ['OMP_WAIT_POLICY'] or 'default'} (set by the caller)"
    load = other_cpu_load()
    if load is not None and load >= BUSY_CPUS:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return f"PASSIVE (other processes used {load:.1f} CPUs at start)"
    return "default (a quiet machine at start)"


def _cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup's quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cfs_period_us``),
    None when there is none or it cannot be read."""
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on, capped by the cgroup quota (rounded up: a quota of 1.5 CPUs keeps two
    threads busy); at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def bf16_instructions(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The name of the CPU feature that runs bfloat16 natively, or None (also when it cannot be told)."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
            return "FEAT_BF16" if out.stdout.strip() == "1" else None
        except OSError:
            return None
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            for flag in BF16_FLAGS:
                if flag in flags:
                    return flag
            return None
    return None
