"""``hnsw``: FAISS's ``IndexHNSWFlat`` with the inner product (``index_factory(d, "HNSW{M},Flat")``): ``MMF_HNSW_M``
links per node, ``MMF_HNSW_EF_CONSTRUCTION`` at build, ``MMF_HNSW_EF_SEARCH`` per query (calibrated). HNSW cannot
remove a vector: changes leave dead slots until the next build. Its flat storage answers exact searches."""

from __future__ import annotations

import faiss
import numpy as np

from service.index.base import SlottedIndex


class HnswIndex(SlottedIndex):
    kind = "hnsw"
    width_name = "ef_search"
    EF_SEARCH_MAX = 4096  # the widest search calibration tries

    def _initial_params(self, n_items: int) -> dict:
        settings = self.settings
        return {"m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction,
                "ef_search": settings.hnsw_ef_search}  # fmt: skip

    def _build(self, vectors: np.ndarray) -> faiss.Index:
        index = faiss.index_factory(self.dim, f"HNSW{self.settings.hnsw_m},Flat", faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.settings.hnsw_ef_construction
        self._storage = faiss.downcast_index(index.storage)
        return index

    def _searched(self, exact: bool) -> faiss.Index:
        return self._storage if exact else self._faiss

    def _parameter_values(self, exact: bool, want: int) -> tuple[type[faiss.SearchParameters], dict]:
        if exact:
            return faiss.SearchParameters, {}
        return faiss.SearchParametersHNSW, {"efSearch": max(self.params["ef_search"], want)}

    # -- for calibration (service/index/calibration.py) -------------------------------------------------------
    def width_limits(self, k: int) -> tuple[int, int]:
        """The narrowest and widest efSearch calibration tries for a top ``k`` (efSearch >= k)."""
        return k, self.EF_SEARCH_MAX

    def exact_slots(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Slots of the exact top ``k`` per query."""
        return self._storage.search(queries, k)[1]

    def approximate_slots(self, queries: np.ndarray, k: int, width: int) -> np.ndarray:
        """Slots of the top ``k`` per query that a search with efSearch ``width`` finds (-1: none)."""
        return self._faiss.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=max(width, k)))[1]
