"""``flat``: FAISS's ``IndexFlatIP``, exact; dead slots are compacted away once they pass a quarter of it."""

from __future__ import annotations

import faiss
import numpy as np

from service.index.base import SlottedIndex


class FlatIndex(SlottedIndex):
    kind = "flat"
    EXACT = True
    COMPACT_MIN = 1024  # dead slots kept at least, whatever the quarter
    INLINE_FLAT_MAX = 20_000  # a scan of at most this many vectors counts as bounded work

    def _build(self, vectors: np.ndarray) -> faiss.Index:
        return faiss.index_factory(self.dim, "Flat", faiss.METRIC_INNER_PRODUCT)

    def _parameter_values(self, exact: bool, want: int) -> tuple[type[faiss.SearchParameters], dict]:
        return faiss.SearchParameters, {}

    @property
    def bounded_search(self) -> bool:
        """Whether the index is small enough for a scan to cost well under a millisecond."""
        return self.slots.count <= self.INLINE_FLAT_MAX

    def remove(self, row: int) -> bool:
        removed = super().remove(row)
        if removed and self.slots.dead > max(self.COMPACT_MIN, self.slots.count // 4):
            self._compact()
        return removed

    def _compact(self) -> None:
        """A new FAISS index of the live vectors, slots renumbered."""
        count = self.slots.count
        live = np.flatnonzero(self.slots.rows[:count] >= 0)
        stored = faiss.rev_swig_ptr(self._faiss.get_xb(), count * self.dim).reshape(count, self.dim)
        vectors, rows = stored[live].copy(), self.slots.rows[live].copy()
        self._faiss = self._build(vectors)
        self.slots.clear()
        self._append(rows, vectors)
