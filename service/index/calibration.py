"""Recall calibration of an approximate index (``MMF_ANN_TARGET_RECALL``; 0 turns it off).

The search width that suits one set of embeddings misses many neighbours in another. So after a build,
:func:`calibrate` searches a sample of real queries (the artifact's user embeddings) exactly and approximately
and doubles ``nprobe`` / ``efSearch`` from the configured value until the mean recall@20 of the sample reaches
the target (``nprobe`` up to every list, ``efSearch`` up to ``HnswIndex.EF_SEARCH_MAX``), or halves it while
the target still holds (a configured width wider than the embeddings need costs throughput for nothing), then
bisects between the last two widths to within an eighth of the narrowest that reaches it (to keep a width as
configured, turn calibration off). An index that cannot reach the target stops widening where a doubling
gains less than ``MIN_RECALL_GAIN`` and logs a warning: a wider search would multiply its cost for little
(docs/performance.md, "Recall calibration"). The width chosen and the recall measured are in the index's
``params`` (``GET /info``); the bench measures recall again on other users.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from service.index.settings import IndexSettings
from service.index.threads import omp_threads

log = logging.getLogger(__name__)

CALIBRATION_K = 20  # recall@20
MIN_RECALL_GAIN = 0.01  # widening stops when a doubling gains less recall than this


@runtime_checkable
class TunableIndex(Protocol):
    """An approximate index whose search width (``params[width_name]``) calibration sets."""

    kind: str
    settings: IndexSettings
    params: dict
    build_seconds: float
    width_name: str

    @property
    def ntotal(self) -> int: ...

    def width_limits(self, k: int) -> tuple[int, int]:
        """The narrowest and widest width calibration tries for a top ``k``."""

    def exact_slots(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Slots of the exact top ``k`` per query."""

    def approximate_slots(self, queries: np.ndarray, k: int, width: int) -> np.ndarray:
        """Slots of the top ``k`` per query found with ``width`` (-1: none)."""

    def forget_search_parameters(self) -> None:
        """Drop search parameters made for the previous width."""


def calibrate(index: TunableIndex, queries: np.ndarray, seed: int = 0) -> None:
    """Set the index's search width to about the narrowest whose mean recall@CALIBRATION_K against exact
    search over a sample of ``queries`` reaches the settings' target. Call right after the build, before any
    change (the exact answers are computed over the built vectors)."""
    settings = index.settings
    target = settings.target_recall
    if target <= 0 or len(queries) == 0 or index.ntotal <= CALIBRATION_K:
        return
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(queries), min(settings.calibration_queries, len(queries)), replace=False)
    q = np.ascontiguousarray(queries[np.sort(pick)], dtype=np.float32)
    k, name = CALIBRATION_K, index.width_name
    least, most = index.width_limits(k)
    with omp_threads(settings.build_thread_count):
        truth = index.exact_slots(q, k)
        width, recall = narrowest_width(
            lambda w: sample_recall(index, q, truth, k, w), max(index.params[name], least), least, most, target
        )
    if recall < target:
        log.warning(
            "%s index: recall@%d %.3f at %s=%d (the most a wider search gains), below "
            "MMF_ANN_TARGET_RECALL=%.2f; build it finer (hnsw: MMF_HNSW_M, MMF_HNSW_EF_CONSTRUCTION; "
            "ivf: MMF_IVF_NLIST) or use flat",
            index.kind, k, recall, name, width, target,
        )  # fmt: skip
    index.params = {**index.params, name: width, "calibrated_recall": round(recall, 4)}
    index.forget_search_parameters()
    index.build_seconds += time.perf_counter() - start


def narrowest_width(
    recall_at: Callable[[int], float], width: int, least: int, most: int, target: float
) -> tuple[int, float]:
    """(width, its recall): about the narrowest width in [least, most] whose recall reaches ``target``,
    searched from ``width``; else where widening stopped gaining."""
    recall = recall_at(width)
    narrower = width  # the widest width known to miss the target
    while recall >= target and width > least:  # wider than needed: halve while the target holds
        half = max(width // 2, least)
        half_recall = recall_at(half)
        if half_recall < target:
            narrower = half
            break
        narrower = width = half
        recall = half_recall
    while recall < target and width < most:
        wider = min(2 * width, most)
        gained = recall_at(wider)
        if gained - recall < MIN_RECALL_GAIN:
            break  # the index cannot get much closer: doubling the search cost is not worth it
        narrower, width, recall = width, wider, gained
    # The doubling overshoots by up to 2x: bisect back to within an eighth of the narrowest width that reaches
    # the target (search cost grows about linearly with the width).
    while recall >= target and width - narrower > max(1, narrower // 8):
        middle = (narrower + width) // 2
        middle_recall = recall_at(middle)
        if middle_recall >= target:
            width, recall = middle, middle_recall
        else:
            narrower = middle
    return width, recall


def sample_recall(index: TunableIndex, queries: np.ndarray, truth: np.ndarray, k: int, width: int) -> float:
    """Mean share of each query's exact top ``k`` (``truth``, slots) that a search with ``width`` finds."""
    found = index.approximate_slots(queries, k, width)
    hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / k
