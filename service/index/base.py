"""What every kind of item index shares: slots mapped to rows, changes as dead slots, and the search that
skips dead and excluded slots, widens past ties and never answers short (see :mod:`service.index`)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable

import faiss
import numpy as np

from service.index.parameters import SearchParameterCache
from service.index.scores import row_scores
from service.index.settings import IndexSettings
from service.index.slots import Slots
from service.index.threads import omp_threads, use_omp_threads


class SlottedIndex(ABC):
    """One FAISS index of a kind, its slots holding engine rows; a subclass builds and searches the FAISS index.

    Args:
        settings: the index settings (the subclass's kind).
        vectors: (n, d) the artifact's item embeddings; row i is item i.
    """

    kind: str
    EXACT = False  # whether the FAISS index itself answers exactly (then nothing is over-fetched or redone)
    OVERFETCH_MAX = 64

    def __init__(self, settings: IndexSettings, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, self.dim = vectors.shape
        settings.check(n)
        self.settings = settings
        self.params = self._initial_params(n)
        self.slots = Slots(n)
        self._parameters = SearchParameterCache()
        start = time.perf_counter()
        with omp_threads(settings.build_thread_count):
            self._faiss = self._build(vectors)
            self._append(np.arange(n, dtype=np.int64), vectors)
        self.build_seconds = time.perf_counter() - start

    def empty_like(self) -> SlottedIndex:
        """An empty index of this kind that searches as this one does (its parameters and calibrated width; for
        ivf its lists and norm bound): for the items written online, searched apart from the artifact's."""
        other = object.__new__(type(self))
        other.dim, other.settings, other.params = self.dim, self.settings, dict(self.params)
        other.slots = Slots(0)
        other._parameters = SearchParameterCache()
        other.build_seconds = 0.0
        other._start_empty_like(self)
        return other

    # -- what a kind provides ------------------------------------------------------------------------------
    def _start_empty_like(self, source: SlottedIndex) -> None:
        """The kind's own state for :meth:`empty_like`: an empty FAISS index searching as ``source``'s."""
        self._faiss = self._build(np.zeros((0, self.dim), dtype=np.float32))

    def _initial_params(self, n_items: int) -> dict:
        """The kind's parameters for ``n_items`` (effective values), before any calibration."""
        return {}

    @abstractmethod
    def _build(self, vectors: np.ndarray) -> faiss.Index:
        """An empty FAISS index of this kind, trained on ``vectors`` where the kind needs training."""

    def _store(self, first_slot: int, vectors: np.ndarray) -> None:
        """Add ``vectors`` to FAISS as the slots from ``first_slot`` on."""
        self._faiss.add(vectors)

    @abstractmethod
    def _parameter_values(self, exact: bool, want: int) -> tuple[type[faiss.SearchParameters], dict]:
        """The SearchParameters class and values of a search for ``want`` answers, exact or approximate."""

    def _searched(self, exact: bool) -> faiss.Index:
        """The FAISS index a search asks, exact or approximate."""
        return self._faiss

    def probe_lists(self, queries: np.ndarray) -> np.ndarray | None:
        """For a kind that scans lists (ivf): (n, width) the lists an approximate search of each query scans,
        to hand to :meth:`search` as ``probes`` for a query searched again and again; None for the others."""
        return None

    def _candidates(
        self,
        q: np.ndarray,
        want: int,
        filtered: bool,
        exact: bool,
        probes: np.ndarray | None = None,
        floor: float = -np.inf,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``want`` best (rows, scores) of live, non-excluded slots (approximate unless ``exact``),
        in no particular order. Arrays, not pairs: the caller orders and filters them with numpy. Every kind
        scores its answers with :func:`row_scores`, as the precomputed lists do, so that equal vectors tie
        exactly whichever path answers. ``probes``, ``floor``: see :meth:`search`."""
        params = self._search_parameters(filtered, exact, want)
        _, slots = self._searched(exact).search(q, want, params=params)
        slots = slots[0][slots[0] >= 0]
        vectors = self._faiss.reconstruct_batch(slots) if len(slots) else np.zeros((0, self.dim), np.float32)
        return self.slots.rows[slots], row_scores(vectors, q[0])

    def _vectors_in_faiss(self) -> int:
        """How many vectors FAISS should hold."""
        return self.slots.count

    def _own_problems(self) -> list[str]:
        """Disagreements inside what the kind holds besides FAISS."""
        return []

    # -- changes ---------------------------------------------------------------------------------------------
    def _append(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        if len(rows):
            self._store(self.slots.append(rows), vectors)

    def _kill(self, slot: int) -> None:
        """Mark ``slot`` dead (a kind holding more than FAISS for it drops that too)."""
        self.slots.kill(slot)

    @property
    def ntotal(self) -> int:
        """Live items."""
        return len(self.slots.by_row)

    @property
    def bounded_search(self) -> bool:
        """Whether a search costs well under a millisecond whatever the catalogue size."""
        return True

    @property
    def dead_slots(self) -> int:
        return self.slots.dead

    def __contains__(self, row: int) -> bool:
        return row in self.slots.by_row

    def add(self, row: int, vector: np.ndarray) -> None:
        """Add ``row`` (replacing its vector if it is there)."""
        self.add_many(np.array([row], dtype=np.int64), np.asarray(vector, dtype=np.float32).reshape(1, -1))

    def add_many(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Add distinct ``rows`` (replacing the vectors of those already there) in one FAISS call."""
        for row in rows.tolist():
            self.remove(row)
        use_omp_threads(self.settings.search_threads)
        self._append(np.asarray(rows, dtype=np.int64), np.ascontiguousarray(vectors, dtype=np.float32))

    def remove(self, row: int) -> bool:
        slot = self.slots.by_row.pop(row, None)
        if slot is None:
            return False
        self._kill(slot)
        return True

    # -- reading ---------------------------------------------------------------------------------------------
    def rows(self) -> np.ndarray:
        """The row of every live slot, in slot order (a row twice would be a bug)."""
        return self.slots.live_rows()

    def vector(self, row: int) -> np.ndarray:
        """The vector FAISS holds for ``row`` (KeyError if it is not live)."""
        return self._faiss.reconstruct(self.slots.by_row[row])[: self.dim]

    def problems(self) -> list[str]:
        """Disagreements between FAISS and the slot bookkeeping (empty when consistent)."""
        out = []
        expected = self._vectors_in_faiss()
        if self._faiss.ntotal != expected:
            out.append(f"FAISS holds {self._faiss.ntotal} vectors, expected {expected}")
        return out + self._own_problems() + self.slots.problems()

    def search(
        self,
        query: np.ndarray,
        k: int,
        exclude: Iterable[int] = (),
        complete: bool = True,
        probes: np.ndarray | None = None,
        floor: float = -np.inf,
    ) -> list[tuple[int, float]]:
        """Top-k (row, inner product) among live rows not in ``exclude``, by score then row. An approximate
        search that finds fewer than k is done again exactly, unless ``complete`` is False: then the answer
        may be short (what the part of the index searched holds; the online items' index, whose answer only
        competes with a precomputed list). ``probes``: this query's row of :meth:`probe_lists` (of this index
        or of one it was made :meth:`empty_like`), which spares the approximate search choosing them again.
        ``floor`` (with ``complete`` False): answers scoring below it may be left out (the caller's list holds
        k answers scoring at least that), which spares scoring them again.

        Asks FAISS for k+1 and widens while the (k+1)-th ties with the k-th, so that a tie straddling the
        k-th place is resolved by row."""
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        exclude = exclude if isinstance(exclude, set | frozenset) else set(exclude)
        excluded = [s for s in (self.slots.by_row.get(r) for r in exclude) if s is not None]
        available = len(self.slots.by_row) - len(excluded)
        if k <= 0 or available <= 0:
            return []
        want, exact = min(k + 1, available), self.EXACT
        # Skipping excluded and dead slots: an approximate search with few of them asks for that many more
        # and drops them here (cheaper than a selector consulted at every vector visited); otherwise FAISS
        # gets a bitmap of the allowed slots.
        extra = len(excluded) + self.slots.dead
        overfetch = bool(extra) and not exact and extra <= self.OVERFETCH_MAX
        filtered = bool(extra) and not overfetch
        if filtered:
            self._select(excluded)
        use_omp_threads(self.settings.search_threads)
        while True:
            if overfetch:
                rows, scores = self._candidates(q, want + extra, False, exact, probes, floor)
                keep = [i for i, r in enumerate(rows.tolist()) if r >= 0 and r not in exclude]
                rows, scores = rows[keep], scores[keep]
            else:
                rows, scores = self._candidates(q, want, filtered, exact, probes, floor)
            if len(rows) < want and not exact and complete:
                exact = True  # the approximate search ran dry: the exact one finds every item
                if overfetch:
                    overfetch, filtered = False, True
                    self._select(excluded)
                continue
            order = np.lexsort((rows, -scores))  # by score, then row
            rows, scores = rows[order], scores[order]
            if want >= available or len(rows) <= k or scores[k] < scores[k - 1]:
                return list(zip(rows[:k].tolist(), scores[:k].tolist(), strict=True))
            want = min(2 * want, available)

    def _select(self, excluded: list[int]) -> None:
        """Allow FAISS the live slots less ``excluded`` in the filtered searches that follow."""
        self._parameters.use_selector(self.slots.select(excluded))

    def _search_parameters(self, filtered: bool, exact: bool, want: int) -> faiss.SearchParameters:
        return self._parameters.get(*self._parameter_values(exact, want), filtered)

    def forget_search_parameters(self) -> None:
        """Drop the SearchParameters made so far (after the kind's search width changed)."""
        self._parameters.clear()
