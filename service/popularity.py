"""Interaction counts per row and the most popular rows, for users without a history."""

from __future__ import annotations

from collections.abc import Container, Iterable, Set

import numpy as np


class Popularity:
    """Counts per row (the artifact's training counts plus online interactions) and the best rows by
    (-count, row), deleted ones included (filtered when read): kept up to date as counts grow, ranked again
    from the counts only when too short.

    Args:
        counts: the artifact's count of each training row.
    """

    TOP_ROWS = 4096  # rows kept ranked at least

    def __init__(self, counts: Iterable[float]) -> None:
        self.counts: dict[int, float] = dict(enumerate(counts))
        self._top_rows: list[int] | None = None
        self._top_limit = 0  # how many rows _top_rows keeps
        self._top_complete = False  # whether _top_rows ranks every row of ``counts``

    def count(self, row: int) -> float:
        return self.counts.get(row, 0.0)

    def add_row(self, row: int) -> None:
        """A row that has no count yet starts at 0."""
        if row not in self.counts:
            self.counts[row] = 0.0
            self._rank_changed(row)

    def increment(self, row: int) -> None:
        self.counts[row] = self.counts.get(row, 0.0) + 1.0
        self._rank_changed(row)

    def best(self, k: int, exclude: Set[int], live: Container[int]) -> list[tuple[int, float]]:
        """The ``k`` most-interacted rows of ``live`` not in ``exclude``, ties by row, with their counts."""
        if self._top_rows is None or self._top_limit < k + len(exclude):
            self._rank(max(self.TOP_ROWS, 2 * (k + len(exclude))))
        while True:
            picked = []
            for r in self._top_rows:
                if r not in exclude and r in live:
                    picked.append((r, self.counts[r]))
                    if len(picked) == k:
                        break
            if len(picked) == k or self._top_complete:
                return picked
            self._rank(2 * self._top_limit)  # too many of the best are deleted or excluded: keep more

    def _rank(self, limit: int) -> None:
        """The best ``limit`` rows by (-count, row), with numpy: a sort of every row in Python costs far too
        much per request for a large catalogue."""
        rows = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
        counts = np.fromiter(self.counts.values(), dtype=np.float64, count=len(self.counts))
        if limit < len(rows):
            keep = np.argpartition(-counts, limit - 1)[:limit]
            cut = counts[keep].min()
            keep = np.flatnonzero(counts >= cut)  # every row tied with the last kept one, for the row order
            rows, counts = rows[keep], counts[keep]
        order = np.lexsort((rows, -counts))[:limit]
        self._top_rows, self._top_limit = rows[order].tolist(), limit
        self._top_complete = len(self._top_rows) == len(self.counts)

    def _rank_changed(self, row: int) -> None:
        """Keep the ranking right after ``row``'s count grew (or a new row appeared with count 0)."""
        top = self._top_rows
        if top is None:
            return
        key = (-self.counts[row], row)
        if row in top:
            top.remove(row)
        elif not self._top_complete and top and key > (-self.counts[top[-1]], top[-1]):
            return  # still ranks below every kept row, as it did: not kept
        lo, hi = 0, len(top)  # insert by (-count, row)
        while lo < hi:
            mid = (lo + hi) // 2
            if (-self.counts[top[mid]], top[mid]) < key:
                lo = mid + 1
            else:
                hi = mid
        top.insert(lo, row)
        if len(top) > self._top_limit:
            top.pop()
            self._top_complete = False
