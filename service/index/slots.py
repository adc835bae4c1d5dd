"""The FAISS ids of an index ("slots", 0, 1, 2, ... in insertion order) and the engine rows they hold.

A deleted or replaced row only marks its slot dead (HNSW cannot remove a vector); searches hand FAISS a bitmap
of the allowed slots instead.
"""

from __future__ import annotations

import faiss
import numpy as np


class Slots:
    """Row per slot (-1: dead), the live slots as a bitmap in FAISS's bit order, and each live row's slot."""

    def __init__(self, capacity: int) -> None:
        self.rows = np.full(max(16, capacity), -1, dtype=np.int64)
        self.live = np.zeros(len(self.rows) // 8 + 1, dtype=np.uint8)
        self.by_row: dict[int, int] = {}
        self.count = 0  # slots used, live or dead
        self.dead = 0
        self._allowed: np.ndarray | None = None  # per-query bitmap behind ``selector``
        self.selector: faiss.IDSelectorBitmap | None = None
        self._live_selector: tuple[np.ndarray, faiss.IDSelectorBitmap] | None = None  # over ``live`` itself
        self._selected = self.live  # the bitmap of the last select

    def append(self, rows: np.ndarray) -> int:
        """Give each of ``rows`` (none of them live) a new slot; returns the first."""
        first, n = self.count, len(rows)
        self._reserve(first + n)
        slots = np.arange(first, first + n)
        self.rows[first : first + n] = rows
        np.bitwise_or.at(self.live, slots >> 3, (1 << (slots & 7)).astype(np.uint8))
        self.by_row.update(zip(rows.tolist(), slots.tolist(), strict=True))
        self.count = first + n
        return first

    def _reserve(self, size: int) -> None:
        if size <= len(self.rows):
            return
        capacity = max(size, 2 * len(self.rows))
        self.rows = np.concatenate([self.rows, np.full(capacity - len(self.rows), -1, np.int64)])
        self.live = np.concatenate([self.live, np.zeros(capacity // 8 + 1 - len(self.live), np.uint8)])

    def clear(self) -> None:
        """No slot used (the arrays, and so the selector's buffer, keep their size)."""
        self.rows[:] = -1
        self.live[:] = 0
        self.by_row, self.count, self.dead = {}, 0, 0

    def kill(self, slot: int) -> None:
        self.live[slot >> 3] &= np.uint8(~(1 << (slot & 7)) & 0xFF)
        self.rows[slot] = -1
        self.dead += 1

    def live_rows(self) -> np.ndarray:
        """The row of every live slot, in slot order."""
        live = np.unpackbits(self.live, bitorder="little")[: self.count].astype(bool)
        return self.rows[: self.count][live]

    def select(self, excluded: list[int]) -> faiss.IDSelectorBitmap:
        """A selector of the live slots less ``excluded``, in one buffer reused by every query (made again,
        a new selector, when the bitmap grew); with nothing excluded, one over the live bitmap itself (no
        copy per query)."""
        if not excluded:
            if self._live_selector is None or self._live_selector[0] is not self.live:
                self._live_selector = (self.live, faiss.IDSelectorBitmap(len(self.live), faiss.swig_ptr(self.live)))
            self._selected = self.live
            return self._live_selector[1]
        if self._allowed is None or len(self._allowed) != len(self.live):
            self._allowed = np.zeros_like(self.live)
            self.selector = faiss.IDSelectorBitmap(len(self._allowed), faiss.swig_ptr(self._allowed))
        nbytes = (self.count + 7) // 8
        np.copyto(self._allowed[:nbytes], self.live[:nbytes])
        for s in excluded:
            self._allowed[s >> 3] &= ~(1 << (s & 7)) & 0xFF
        self._selected = self._allowed
        return self.selector

    def selected(self, slots: np.ndarray) -> np.ndarray:
        """Whether each of ``slots`` is allowed by the last :meth:`select`."""
        return ((self._selected[slots >> 3] >> (slots & 7)) & 1).astype(bool)

    def problems(self) -> list[str]:
        """Disagreements between the bitmap, the rows by slot and the slots by row (empty when consistent)."""
        out = []
        live = np.unpackbits(self.live, bitorder="little")[: self.count].astype(bool)
        if int(live.sum()) != len(self.by_row):
            out.append(f"{int(live.sum())} live slots, {len(self.by_row)} live rows")
        if np.any(live != (self.rows[: self.count] >= 0)):
            out.append("live-slot bitmap and slot rows disagree")
        rows = np.fromiter(self.by_row.keys(), dtype=np.int64, count=len(self.by_row))
        slots = np.fromiter(self.by_row.values(), dtype=np.int64, count=len(self.by_row))
        outside = slots >= self.count
        wrong = rows[outside | (self.rows[np.where(outside, 0, slots)] != rows)]
        out += [f"row {r} maps to slot {self.by_row[r]}, which holds another row" for r in wrong[:5].tolist()]
        return out
