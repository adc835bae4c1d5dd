"""Keep freed memory in the process (glibc): far fewer page faults in CPU training steps.

A training step on the CPU allocates and frees tensors of tens of MB (GAT's and GRCN's per-edge messages are
135,100 x 64 floats on TikTok). glibc gives such blocks back to the kernel when they are freed, and the next
step faults every page in again: a GAT step on TikTok took 129,000 page faults and 0.23 s of kernel time,
more than its arithmetic. Three ``mallopt`` settings keep such blocks in the heap, so that the blocks freed by
one step serve the next (docs/performance.md, "Page faults"; ``bench/allocator.py``): ``M_MMAP_THRESHOLD`` at
its maximum (32 MB: smaller blocks come from the heap, not from mmap, which unmaps them on free),
``M_TOP_PAD`` (the heap grows by the pad at a time, so a large block fits in its free top) and
``M_TRIM_THRESHOLD`` (up to twice the pad of free memory at the top is kept instead of returned).

The training entry points call :func:`keep_freed_memory` once at start; ``MMF_MALLOC_KEEP_MB`` sets the
amount (default 512; 0 leaves glibc's defaults). Elsewhere than Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "MMF_MALLOC_KEEP_MB"
DEFAULT_PAD_MB = 512
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest on 64-bit systems (HEAP_MAX_SIZE / 2)
_MAX_PAD_MB = 2047  # mallopt takes an int


def pad_from_env(environ: dict[str, str] | os._Environ = os.environ) -> int:
    """The pad in MB that ``MMF_MALLOC_KEEP_MB`` asks for (default 512); ValueError names a bad value."""
    raw = environ.get(ENV, str(DEFAULT_PAD_MB)).strip()
    try:
        pad_mb = int(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r} is not a whole number of MB (0 leaves glibc's defaults)") from None
    if not 0 <= pad_mb <= _MAX_PAD_MB:
        raise ValueError(f"{ENV}={pad_mb} is outside 0..{_MAX_PAD_MB} MB")
    return pad_mb


def keep_freed_memory(pad_mb: int | None = None) -> bool:
    """Keep up to ``pad_mb`` MB (default: :func:`pad_from_env`) of freed memory in glibc's heap; True when
    the settings were taken."""
    pad_mb = pad_from_env() if pad_mb is None else pad_mb
    if pad_mb <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    pad = pad_mb * 2**20
    trim = min(2 * pad, 2**31 - 1)  # free top memory beyond the pad is kept up to twice the pad
    settings = ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TOP_PAD, pad), (_M_TRIM_THRESHOLD, trim))
    if not all([mallopt(option, value) == 1 for option, value in settings]):
        return False
    # Grow the heap's free top by the pad now: one block just under the mmap threshold, freed at once. Until
    # the heap next grows, a block above the threshold (GAT's 35 MB messages) would still be mapped.
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    libc.free(libc.malloc(_MMAP_THRESHOLD_MAX - 2**20))
    return True
