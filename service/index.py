"""The item index the engine searches: exact (``flat``) or approximate (``hnsw``, ``ivf``), all with FAISS.

Every kind is built from the artifact's item embeddings when an engine is built (start-up, hot reload,
rebuild); the artifact's own ``items.faiss`` (exact) stays as it is. The metric is the inner product.

* ``flat``: ``IndexFlatIP``, exact.
* ``hnsw``: ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT`` (``faiss.index_factory(d, "HNSW{M},Flat")``):
  ``MMF_HNSW_M`` links per node, ``MMF_HNSW_EF_CONSTRUCTION`` at build, ``MMF_HNSW_EF_SEARCH`` per query.
* ``ivf``: ``IndexIVFFlat`` over ``MMF_IVF_NLIST`` k-means lists (default about 4 sqrt(items)),
  ``MMF_IVF_NPROBE`` of them scanned per query. Lists made for the inner product serve embeddings of
  very different norms badly (benchmark's 100k embeddings, 1024 lists, 128 probed: recall@20 0.49), so
  the lists are built in L2 over vectors augmented with one coordinate ``sqrt(B^2 - |x|^2)`` (B: largest
  norm at build; queries get 0), where the L2 order is the inner-product order (Bachrach et al., RecSys
  2014): recall@20 0.89 there. The answers are scored again by exact inner product.
  The longest vectors are kept out of the lists, in an exact side list that every query scores
  (``MMF_IVF_EXACT_FRACTION`` of the items, default 5%, and at least ``MMF_IVF_EXACT_MIN_ITEMS``, default
  10,000, at most half the items), and B is the longest norm of the rest. Item
  norms are skewed (the benchmark's 100k: median 4.5, 99th percentile 10.7, largest 33.5) and the long
  vectors are the ones most often in a top 20, while one large B makes every other augmented vector nearly
  the same length and the lists coarse: with the 5% longest scored exactly, 72 of 1265 lists reach the
  recall 0.95 that 240 reach without (100k benchmark items; 1M: 22 of 4000 instead of 448), at about half
  the search time (docs/PERFORMANCE.md); at 100k items 10,000 (10%) need only 4 lists probed and search in
  0.13 instead of 0.17 ms, while at 1M 10% is twice as slow as 5%: scoring the side list costs about 4 us
  per 1,000 vectors, so a few thousand more of them pay only while they save many probes. An item added
  later with a norm above B joins the side list.

Items are FAISS ids 0, 1, 2, ... ("slots", in insertion order), mapped to engine rows here. HNSW cannot
remove a vector, so deleting or replacing an item only marks its slot dead, for every kind: searches pass
FAISS a bitmap of the live slots with the caller's excluded rows cleared (``IDSelectorBitmap`` in the
kind's ``SearchParameters``), so neither dead nor excluded items take places in the top k, and an item
that is added again gets a new slot (no duplicates). (An approximate search with at most OVERFETCH_MAX
dead and excluded slots asks for that many more answers and drops them instead: cheaper.) ``flat``
compacts its dead slots when they pass a quarter of the index; ``hnsw`` and ``ivf`` keep them until the
next build (restart, reload or rebuild).

An approximate search that finds fewer than the requested items while the index holds more (a small IVF
list, an HNSW walk through excluded nodes) is redone exactly (HNSW: its flat storage, IVF: every list), so
an answer is never short. Ties are broken by row, so replicas with the same items agree whatever order
their slots are in (for ``hnsw`` the graph itself depends on insertion order and build threads, so two
replicas can differ in which near neighbours they find).

Recall calibration (``MMF_ANN_TARGET_RECALL``, default 0.95; 0 turns it off): the search width of an
approximate index that suits one set of embeddings misses many neighbours in another (the benchmark's
1M items: ``ivf`` with 128 of 4000 lists probed found 0.76 of the exact top 20, ``hnsw`` with
efSearch 128 found 0.51). So after a build, ``calibrate`` searches a sample of real queries (the
artifact's user embeddings) exactly and approximately and doubles ``nprobe`` / ``efSearch`` from the
configured value until the mean recall@20 of the sample reaches the target (``nprobe`` up to every list;
``efSearch`` up to EF_SEARCH_MAX), or halves it while the target still holds (a configured width wider
than the embeddings need costs throughput for nothing), then bisects between the last two widths to
within an eighth of the narrowest that reaches it (to keep a width as configured, turn calibration off).
An index that cannot reach it stops widening where a doubling gains less than MIN_RECALL_GAIN and logs a
warning (an HNSW graph built with M 32 / efConstruction 80 over the benchmark's 1M items found 0.58 of the
top 20 even at efSearch 4096, at a twentieth of the throughput). The width chosen and the recall measured
are in ``params`` (``GET /info``); the bench measures recall again on other users.

Not thread-safe: the engine calls it under its lock. FAISS's OpenMP thread count is per calling thread, so
every call sets it (``MMF_FAISS_THREADS`` for searches and online adds, ``MMF_INDEX_BUILD_THREADS`` for
the build).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator

import faiss
import numpy as np

from service.index_settings import IndexSettings
from service.keyed_vectors import KeyedVectors

log = logging.getLogger(__name__)


def kind_params(settings: IndexSettings, n_items: int) -> dict:
    """The parameters that apply to the settings' kind (effective values)."""
    if settings.kind == "hnsw":
        return {"m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction,
                "ef_search": settings.hnsw_ef_search}  # fmt: skip
    if settings.kind == "ivf":
        nlist = settings.nlist(n_items - settings.exact_items(n_items))  # the lists hold the rest
        exact_items = settings.exact_items(n_items)
        return {"nlist": nlist, "nprobe": min(settings.ivf_nprobe, nlist), "exact_items": exact_items}
    return {}


_omp = threading.local()


def use_omp_threads(n: int) -> None:
    """Set FAISS's OpenMP thread count for the calling thread (an OpenMP setting is per thread: one made in
    the main thread does not reach the request threads). Remembered per thread, so that the common case,
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


class ItemIndex:
    """Live items (engine rows) and their vectors in one FAISS index of the configured kind."""

    FLAT_COMPACT_MIN = 1024
    INLINE_FLAT_MAX = 20_000
    OVERFETCH_MAX = 64
    EF_SEARCH_MAX = 4096
    MIN_RECALL_GAIN = 0.01  # calibration stops widening when a doubling gains less recall than this
    CALIBRATION_K = 20

    def __init__(self, settings: IndexSettings, vectors: np.ndarray, rows: Iterable[int] | None = None) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, self.dim = vectors.shape
        settings.check(n)
        self.settings, self.kind = settings, settings.kind
        self.params = kind_params(settings, n)
        rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(list(rows), dtype=np.int64)
        self._slot_rows = np.full(max(16, n), -1, dtype=np.int64)
        self._bits = np.zeros(len(self._slot_rows) // 8 + 1, dtype=np.uint8)  # live slots, FAISS bit order
        self._row_slot: dict[int, int] = {}
        self._n_slots = 0
        self._n_dead = 0
        # ivf's exact side list (vectors longer than the bound), by slot: a change costs O(dim) and a query one
        # matrix-vector product, whatever its length
        self._side = KeyedVectors(self.dim)
        self._ivf_total = 0  # ivf: vectors ever added to the lists (the side list's are not)
        self._query_bits: np.ndarray | None = None  # per-query selector bitmap (see _selector)
        self._sel = None
        self._params: dict[tuple, faiss.SearchParameters] = {}
        self._query_aug = np.zeros((1, self.dim + 1), dtype=np.float32)  # ivf: the query, augmented with 0
        start = time.perf_counter()
        with omp_threads(settings.build_thread_count):
            self._index = self._new_index(vectors)
            self._append(rows, vectors)
        self.build_seconds = time.perf_counter() - start

    # -- building --------------------------------------------------------------------------------------
    def _new_index(self, vectors: np.ndarray) -> faiss.Index:
        d = self.dim
        if self.kind == "flat":
            return faiss.index_factory(d, "Flat", faiss.METRIC_INNER_PRODUCT)
        if self.kind == "hnsw":
            index = faiss.index_factory(d, f"HNSW{self.settings.hnsw_m},Flat", faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.settings.hnsw_ef_construction
            self._storage = faiss.downcast_index(index.storage)
            return index
        norms2 = np.einsum("ij,ij->i", vectors, vectors)
        listed = len(norms2) - self.params["exact_items"]  # the shorter vectors go to the lists
        self._bound2 = float(np.partition(norms2, listed - 1)[listed - 1]) if len(norms2) else 1.0
        index = faiss.index_factory(d + 1, f"IVF{self.params['nlist']},Flat", faiss.METRIC_L2)
        index.cp.max_points_per_centroid = 64  # k-means on a sample of at most 64 vectors per list: fast enough
        index.train(self._augment(vectors[norms2 <= self._bound2]))
        # reconstruct() by slot, for re-scoring; a hash table, as the side list's slots are not in the lists
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index

    # -- recall calibration ----------------------------------------------------------------------------
    def calibrate(self, queries: np.ndarray, seed: int = 0) -> None:
        """Set the approximate search's width to about the narrowest whose mean recall@CALIBRATION_K against
        exact search over a sample of ``queries`` reaches ``config.target_recall`` (see the module docstring).
        Call right after the build, before any change (the exact answers are computed over the built
        vectors)."""
        target = self.settings.target_recall
        if self.kind == "flat" or target <= 0 or len(queries) == 0 or self.ntotal <= self.CALIBRATION_K:
            return
        start = time.perf_counter()
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(queries), min(self.settings.calibration_queries, len(queries)), replace=False)
        q = np.ascontiguousarray(queries[np.sort(pick)], dtype=np.float32)
        k = self.CALIBRATION_K
        with omp_threads(self.settings.build_thread_count):
            truth = self._exact_top(q, k)
            name, limit = ("nprobe", self.params["nlist"]) if self.kind == "ivf" else ("ef_search", self.EF_SEARCH_MAX)
            width = self.params[name] if self.kind == "ivf" else max(self.params[name], k)  # hnsw: efSearch >= k
            recall = self._sample_recall(q, truth, k, width)
            narrower = width  # the widest width known to miss the target
            least = 1 if self.kind == "ivf" else k  # hnsw: efSearch >= k
            while recall >= target and width > least:  # wider than needed: halve while the target holds
                half = max(width // 2, least)
                half_recall = self._sample_recall(q, truth, k, half)
                if half_recall < target:
                    narrower = half
                    break
                narrower = width = half
                recall = half_recall
            while recall < target and width < limit:
                wider = min(2 * width, limit)
                gained = self._sample_recall(q, truth, k, wider)
                if gained - recall < self.MIN_RECALL_GAIN:
                    break  # the index cannot get much closer: doubling the search cost is not worth it
                narrower, width, recall = width, wider, gained
            # The doubling overshoots by up to 2x: bisect back to within an eighth of the narrowest width that
            # reaches the target (search cost grows about linearly with the width).
            while recall >= target and width - narrower > max(1, narrower // 8):
                middle = (narrower + width) // 2
                middle_recall = self._sample_recall(q, truth, k, middle)
                if middle_recall >= target:
                    width, recall = middle, middle_recall
                else:
                    narrower = middle
        if recall < target:
            log.warning(
                "%s index: recall@%d %.3f at %s=%d (the most a wider search gains), below "
                "MMF_ANN_TARGET_RECALL=%.2f; build it finer (hnsw: MMF_HNSW_M, MMF_HNSW_EF_CONSTRUCTION; "
                "ivf: MMF_IVF_NLIST) or use flat",
                self.kind, k, recall, name, width, target,
            )  # fmt: skip
        self.params = {**self.params, name: width, "calibrated_recall": round(recall, 4)}
        self._params = {}
        self.build_seconds += time.perf_counter() - start

    def _exact_top(self, q: np.ndarray, k: int) -> np.ndarray:
        """Slots of the exact top ``k`` per query (inner product over the stored vectors)."""
        if self.kind == "hnsw":
            return self._storage.search(q, k)[1]
        # every list probed: exact, and in the augmented L2 space the order is the inner-product order
        return self._ivf_search(q, k, self.params["nlist"])

    def _ivf_search(self, q: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        """Top ``k`` slots per query: the lists' answers and the side list, by exact inner product."""
        aug = np.hstack([q, np.zeros((len(q), 1), np.float32)])
        slots = self._index.search(aug, k, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]
        found = slots >= 0  # a short answer is padded with -1
        vectors = self._index.reconstruct_batch(slots[found])[:, : self.dim]
        scores = np.full(slots.shape, -np.inf, dtype=np.float32)
        scores[found] = np.einsum("nd,nd->n", vectors, np.broadcast_to(q[:, None, :], (*slots.shape, self.dim))[found])
        side_slots, side_vectors = self._side.arrays()
        slots = np.hstack([slots, np.broadcast_to(side_slots, (len(q), len(side_slots)))])
        scores = np.hstack([scores, q @ side_vectors.T])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(slots, order, axis=1)

    def _sample_recall(self, q: np.ndarray, truth: np.ndarray, k: int, width: int) -> float:
        if self.kind == "ivf":
            found = self._ivf_search(q, k, width)
        else:
            found = self._index.search(q, k, params=faiss.SearchParametersHNSW(efSearch=max(width, k)))[1]
        hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(found, truth, strict=True)]
        return float(np.mean(hits)) / k

    def _augment(self, vectors: np.ndarray) -> np.ndarray:
        norms2 = np.einsum("ij,ij->i", vectors, vectors)
        extra = np.sqrt(np.maximum(self._bound2 - norms2, 0.0)).astype(np.float32)
        return np.hstack([vectors, extra[:, None]])

    def _append(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        n = len(rows)
        if n == 0:
            return
        first = self._n_slots
        self._reserve(first + n)
        if self.kind == "ivf":
            norms2 = np.einsum("ij,ij->i", vectors, vectors)
            longer = norms2 > self._bound2 * (1 + 1e-6)
            listed = np.flatnonzero(~longer)
            self._index.add_with_ids(self._augment(vectors[listed]), first + listed)
            self._ivf_total += len(listed)
            self._side.extend(first + np.flatnonzero(longer), vectors[longer])
        else:
            self._index.add(vectors)
        slots = np.arange(first, first + n)
        self._slot_rows[first : first + n] = rows
        np.bitwise_or.at(self._bits, slots >> 3, (1 << (slots & 7)).astype(np.uint8))
        if not self._row_slot:  # the initial build (rows are distinct): at C speed
            self._row_slot = dict(zip(rows.tolist(), slots.tolist(), strict=True))
        else:
            for row, slot in zip(rows.tolist(), slots.tolist(), strict=True):
                old = self._row_slot.get(row)
                if old is not None:  # never expected: the engine removes a row before adding it again
                    self._kill(old)
                self._row_slot[row] = slot
        self._n_slots = first + n

    def _reserve(self, size: int) -> None:
        if size <= len(self._slot_rows):
            return
        capacity = max(size, 2 * len(self._slot_rows))
        self._slot_rows = np.concatenate([self._slot_rows, np.full(capacity - len(self._slot_rows), -1, np.int64)])
        self._bits = np.concatenate([self._bits, np.zeros(capacity // 8 + 1 - len(self._bits), np.uint8)])

    def _kill(self, slot: int) -> None:
        self._bits[slot >> 3] &= np.uint8(~(1 << (slot & 7)) & 0xFF)
        self._slot_rows[slot] = -1
        self._side.remove(slot)
        self._n_dead += 1

    # -- changes ---------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Live items."""
        return len(self._row_slot)

    @property
    def bounded_search(self) -> bool:
        """Whether a search costs well under a millisecond whatever the catalogue size: hnsw, ivf, or a flat
        index of at most INLINE_FLAT_MAX vectors."""
        return self.kind != "flat" or self._n_slots <= self.INLINE_FLAT_MAX

    @property
    def dead_slots(self) -> int:
        return self._n_dead

    def __contains__(self, row: int) -> bool:
        return row in self._row_slot

    def add(self, row: int, vector: np.ndarray) -> None:
        """Add ``row`` (replacing its vector if it is there)."""
        self.remove(row)
        use_omp_threads(self.settings.search_threads)
        self._append(np.array([row], dtype=np.int64), np.asarray(vector, dtype=np.float32).reshape(1, -1))

    def remove(self, row: int) -> bool:
        slot = self._row_slot.pop(row, None)
        if slot is None:
            return False
        self._kill(slot)
        if self.kind == "flat" and self._n_dead > max(self.FLAT_COMPACT_MIN, self._n_slots // 4):
            self._compact()
        return True

    def _compact(self) -> None:
        """flat only: a new index of the live vectors, slots renumbered."""
        live = np.flatnonzero(self._slot_rows[: self._n_slots] >= 0)
        xb = faiss.rev_swig_ptr(self._index.get_xb(), self._n_slots * self.dim).reshape(self._n_slots, self.dim)
        vectors, rows = xb[live].copy(), self._slot_rows[live].copy()
        self._index = faiss.index_factory(self.dim, "Flat", faiss.METRIC_INNER_PRODUCT)
        self._slot_rows[:] = -1
        self._bits[:] = 0
        self._row_slot, self._n_slots, self._n_dead = {}, 0, 0
        self._append(rows, vectors)

    # -- reading ---------------------------------------------------------------------------------------
    def rows(self) -> np.ndarray:
        """The row of every live slot, in slot order (a row twice would be a bug)."""
        live = np.unpackbits(self._bits, bitorder="little")[: self._n_slots].astype(bool)
        return self._slot_rows[: self._n_slots][live]

    def vector(self, row: int) -> np.ndarray:
        """The vector FAISS holds for ``row`` (KeyError if it is not live)."""
        slot = self._row_slot[row]
        if slot in self._side:
            return self._side.get(slot)
        return self._index.reconstruct(slot)[: self.dim]

    def problems(self) -> list[str]:
        """Disagreements between FAISS and the slot bookkeeping (empty when consistent)."""
        out = []
        expected = self._ivf_total if self.kind == "ivf" else self._n_slots
        if self._index.ntotal != expected:
            out.append(f"FAISS holds {self._index.ntotal} vectors, expected {expected}")
        side_slots, _ = self._side.arrays()
        if np.any(self._slot_rows[side_slots] < 0) or not self._side.consistent():
            out.append("the exact side list holds a dead slot, or its position map disagrees with it")
        live = np.unpackbits(self._bits, bitorder="little")[: self._n_slots].astype(bool)
        if int(live.sum()) != len(self._row_slot):
            out.append(f"{int(live.sum())} live slots, {len(self._row_slot)} live rows")
        if np.any(live != (self._slot_rows[: self._n_slots] >= 0)):
            out.append("live-slot bitmap and slot rows disagree")
        rows = np.fromiter(self._row_slot.keys(), dtype=np.int64, count=len(self._row_slot))
        slots = np.fromiter(self._row_slot.values(), dtype=np.int64, count=len(self._row_slot))
        outside = slots >= self._n_slots
        wrong = rows[outside | (self._slot_rows[np.where(outside, 0, slots)] != rows)]
        out += [f"row {r} maps to slot {self._row_slot[r]}, which holds another row" for r in wrong[:5].tolist()]
        return out

    def search(self, query: np.ndarray, k: int, exclude: Iterable[int] = ()) -> list[tuple[int, float]]:
        """Top-k (row, inner product) among live rows not in ``exclude``, by score then row.

        Asks FAISS for k+1 and widens while the (k+1)-th ties with the k-th, so that a tie straddling the
        k-th place is resolved by row."""
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        exclude = exclude if isinstance(exclude, set | frozenset) else set(exclude)
        excluded = [s for s in (self._row_slot.get(r) for r in exclude) if s is not None]
        available = len(self._row_slot) - len(excluded)
        if k <= 0 or available <= 0:
            return []
        want, exact = min(k + 1, available), self.kind == "flat"
        # Skipping excluded and dead slots: an approximate search with few of them asks for that many more
        # and drops them here (cheaper than a selector consulted at every vector visited); otherwise FAISS
        # gets a bitmap of the allowed slots.
        extra = len(excluded) + self._n_dead
        overfetch = bool(extra) and not exact and extra <= self.OVERFETCH_MAX
        filtered = bool(extra) and not overfetch
        if filtered:
            self._fill_selector(excluded)
        use_omp_threads(self.settings.search_threads)
        while True:
            if overfetch:
                rows, scores = self._candidates(q, want + extra, False, exact)
                keep = [i for i, r in enumerate(rows.tolist()) if r >= 0 and r not in exclude]
                rows, scores = rows[keep], scores[keep]
            else:
                rows, scores = self._candidates(q, want, filtered, exact)
            if len(rows) < want and not exact:
                exact = True  # the approximate search ran dry: the exact one finds every item
                if overfetch:
                    overfetch, filtered = False, True
                    self._fill_selector(excluded)
                continue
            order = np.lexsort((rows, -scores))  # by score, then row
            rows, scores = rows[order], scores[order]
            if want >= available or len(rows) <= k or scores[k] < scores[k - 1]:
                return list(zip(rows[:k].tolist(), scores[:k].tolist(), strict=True))
            want = min(2 * want, available)

    def _fill_selector(self, excluded: list[int]) -> None:
        """The live-slot bitmap with the excluded slots cleared, in the selector's buffer."""
        bits = self._selector()
        nbytes = (self._n_slots + 7) // 8
        np.copyto(bits[:nbytes], self._bits[:nbytes])
        for s in excluded:
            bits[s >> 3] &= ~(1 << (s & 7)) & 0xFF

    def _selector(self) -> np.ndarray:
        """The per-query bitmap buffer (as long as the live-slot bitmap) behind a FAISS IDSelectorBitmap,
        and the search parameters using it; made again when the bitmap grew."""
        if self._query_bits is None or len(self._query_bits) != len(self._bits):
            self._query_bits = np.zeros_like(self._bits)
            self._sel = faiss.IDSelectorBitmap(len(self._query_bits), faiss.swig_ptr(self._query_bits))
            self._params = {}
        return self._query_bits

    def _search_params(self, filtered: bool, exact: bool, want: int):
        """Cached SearchParameters of this kind (one FAISS object per combination, not one per query)."""
        if self.kind == "hnsw" and not exact:
            key = ("hnsw", filtered, max(self.params["ef_search"], want))
            make = lambda: faiss.SearchParametersHNSW(efSearch=key[2])  # noqa: E731
        elif self.kind == "ivf":
            key = ("ivf", filtered, self.params["nlist"] if exact else self.params["nprobe"])
            make = lambda: faiss.SearchParametersIVF(nprobe=key[2])  # noqa: E731
        else:  # flat, or hnsw's flat storage
            key = ("flat", filtered, 0)
            make = faiss.SearchParameters
        params = self._params.get(key)
        if params is None:
            params = make()
            if filtered:
                params.sel = self._sel
            if len(self._params) > 64:
                self._params.clear()
            self._params[key] = params
        return params

    def _candidates(self, q: np.ndarray, want: int, filtered: bool, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``want`` best (rows, scores) of live, non-excluded slots (approximate unless ``exact``),
        in no particular order. Arrays, not pairs: the caller orders and filters them with numpy."""
        params = self._search_params(filtered, exact, want)
        if self.kind == "ivf":
            return self._ivf_candidates(q, want, params, filtered)
        index = self._storage if self.kind == "hnsw" and exact else self._index
        scores, slots = index.search(q, want, params=params)
        found = slots[0] >= 0
        return self._slot_rows[slots[0][found]], scores[0][found]

    def _ivf_candidates(self, q: np.ndarray, want: int, params, filtered: bool) -> tuple[np.ndarray, np.ndarray]:
        """IVF answers re-scored by exact inner product, plus the best vectors of the exact side list."""
        self._query_aug[0, : self.dim] = q[0]
        _, slots = self._index.search(self._query_aug, want, params=params)
        slots = slots[0][slots[0] >= 0]
        scores = self._index.reconstruct_batch(slots)[:, : self.dim] @ q[0] if len(slots) else np.zeros(0, np.float32)
        if len(self._side):  # longer than the bound: scored exactly, always
            side_slots, matrix = self._side.arrays()
            side_scores = matrix @ q[0]  # all of them, then filtered: no copy of the matrix per query
            # Only side vectors scoring at least the lists' want-th best can be among the best want of both
            # (a comparison over the side list is far cheaper than a partition of all of it).
            floor = scores.min() if len(scores) >= want else -np.inf
            better = np.flatnonzero(side_scores >= floor)
            side_slots, side_scores = side_slots[better], side_scores[better]
            if filtered:
                bits = self._query_bits
                keep = ((bits[side_slots >> 3] >> (side_slots & 7)) & 1).astype(bool)
                side_slots, side_scores = side_slots[keep], side_scores[keep]
            if len(side_scores) > want:
                best = np.argpartition(-side_scores, want - 1)[:want]
                side_slots, side_scores = side_slots[best], side_scores[best]
            slots, scores = np.concatenate([slots, side_slots]), np.concatenate([scores, side_scores])
        return self._slot_rows[slots], scores
