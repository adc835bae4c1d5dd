"""FAISS's OpenMP thread count, which is a setting of the calling thread: one made in the main thread does not
reach the request threads, so every index call sets it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import faiss

_omp = threading.local()


def use_omp_threads(n: int) -> None:
    """Set FAISS's OpenMP thread count for the calling thread. Remembered per thread, so that the common case,
    every search with the same count, costs no call into OpenMP."""
    if getattr(_omp, "threads", None) != n:
        faiss.omp_set_num_threads(n)
        _omp.threads = n


@contextlib.contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """``use_omp_threads(n)`` for a block, then back to the thread's previous count (index builds)."""
    previous = faiss.omp_get_max_threads()
    use_omp_threads(n)
    try:
        yield
    finally:
        use_omp_threads(previous)
