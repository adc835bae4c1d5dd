"""``ivf``: FAISS's ``IndexIVFFlat`` over ``MMF_IVF_NLIST`` k-means lists (default about 4 sqrt(items)),
``MMF_IVF_NPROBE`` of them scanned per query (calibrated), plus an exact side list of the longest vectors.

Lists made for the inner product serve embeddings of very different norms badly, so the lists are built in
L2 over vectors augmented with one coordinate ``sqrt(B^2 - |x|^2)`` (B: the bound on the listed norms;
queries get 0), where the L2 order is the inner-product order (Bachrach et al., RecSys 2014). The answers are
scored again by exact inner product.

Item norms are skewed, and the long vectors are the ones most often in a top 20, while one large B makes every
other augmented vector nearly the same length and the lists coarse. So the longest vectors are kept out of
the lists, in an exact side list that every query scores (``MMF_IVF_EXACT_FRACTION`` of the items, and at
least ``MMF_IVF_EXACT_MIN_ITEMS``, at most half the items), and B is the longest norm of the rest: far fewer
lists need probing for the same recall. A side list costs a matrix-vector product per query, so it pays only
while it saves many probes (docs/performance.md, "Search time per ivf side-list setting"). An item added
later with a norm above B joins the side list.
"""

from __future__ import annotations

import faiss
import numpy as np

from service.index.base import SlottedIndex
from service.index.scores import row_scores
from service.index.settings import IndexSettings
from service.index.threads import omp_threads
from service.keyed_vectors import KeyedVectors


class IvfIndex(SlottedIndex):
    kind = "ivf"
    width_name = "nprobe"

    def __init__(self, settings: IndexSettings, vectors: np.ndarray) -> None:
        # The side list by slot: a change costs O(dim) and a query one matrix-vector product, whatever its length.
        self._side = KeyedVectors(np.shape(vectors)[1])
        self._listed = 0  # vectors ever added to the lists (the side list's are not)
        super().__init__(settings, vectors)

    def _start_empty_like(self, source: SlottedIndex) -> None:
        """The same lists (a copy of ``source``'s trained quantizer) and norm bound, none of its vectors."""
        assert isinstance(source, IvfIndex)
        self._side, self._listed, self._bound2 = KeyedVectors(self.dim), 0, source._bound2
        quantizer = faiss.clone_index(source._faiss.quantizer)
        # (FAISS's Python constructor keeps a reference to the quantizer for the index's lifetime)
        self._faiss = faiss.IndexIVFFlat(quantizer, self.dim + 1, self.params["nlist"], faiss.METRIC_L2)
        self._faiss.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._query_aug = np.zeros((1, self.dim + 1), dtype=np.float32)
        self._probe_buffers = None

    def _initial_params(self, n_items: int) -> dict:
        exact_items = self.settings.exact_items(n_items)
        nlist = self.settings.nlist(n_items - exact_items)  # the lists hold the rest
        return {"nlist": nlist, "nprobe": min(self.settings.ivf_nprobe, nlist), "exact_items": exact_items}

    def _build(self, vectors: np.ndarray) -> faiss.Index:
        norms2 = np.einsum("ij,ij->i", vectors, vectors)
        listed = len(norms2) - self.params["exact_items"]  # the shorter vectors go to the lists
        self._bound2 = float(np.partition(norms2, listed - 1)[listed - 1]) if len(norms2) else 1.0
        index = faiss.index_factory(self.dim + 1, f"IVF{self.params['nlist']},Flat", faiss.METRIC_L2)
        index.cp.max_points_per_centroid = 64  # k-means on a sample of at most 64 vectors per list: fast enough
        index.train(self._augment(vectors[norms2 <= self._bound2]))
        # reconstruct() by slot, for re-scoring; a hash table, as the side list's slots are not in the lists
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._query_aug = np.zeros((1, self.dim + 1), dtype=np.float32)  # the query, augmented with 0
        self._probe_buffers: _ProbeBuffers | None = None
        return index

    def _augment(self, vectors: np.ndarray) -> np.ndarray:
        norms2 = np.einsum("ij,ij->i", vectors, vectors)
        extra = np.sqrt(np.maximum(self._bound2 - norms2, 0.0)).astype(np.float32)
        return np.hstack([vectors, extra[:, None]])

    def _store(self, first_slot: int, vectors: np.ndarray) -> None:
        norms2 = np.einsum("ij,ij->i", vectors, vectors)
        longer = norms2 > self._bound2 * (1 + 1e-6)
        listed = np.flatnonzero(~longer)
        self._faiss.add_with_ids(self._augment(vectors[listed]), first_slot + listed)
        self._listed += len(listed)
        self._side.extend(first_slot + np.flatnonzero(longer), vectors[longer])

    def _kill(self, slot: int) -> None:
        super()._kill(slot)
        self._side.remove(slot)

    def _parameter_values(self, exact: bool, want: int) -> tuple[type[faiss.SearchParameters], dict]:
        return faiss.SearchParametersIVF, {"nprobe": self.params["nlist"] if exact else self.params["nprobe"]}

    # Queries per call of the quantizer in probe_lists: FAISS scores fewer than its BLAS threshold (20) pair by
    # pair, as it does a single query, so the lists are exactly those a search would choose.
    PROBE_CHUNK = 16

    def probe_lists(self, queries: np.ndarray) -> np.ndarray:
        """(n, nprobe) the lists, nearest first, that an approximate search of each query scans: the query
        augmented with 0 against the quantizer's centroids (int32, or int16 when the lists are that few)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        dtype = np.int16 if self.params["nlist"] <= np.iinfo(np.int16).max else np.int32
        out = np.empty((len(queries), self.params["nprobe"]), dtype=dtype)
        aug = np.zeros((self.PROBE_CHUNK, self.dim + 1), dtype=np.float32)
        with omp_threads(self.settings.build_thread_count):
            for lo in range(0, len(queries), self.PROBE_CHUNK):
                n = min(self.PROBE_CHUNK, len(queries) - lo)
                aug[:n, : self.dim] = queries[lo : lo + n]
                out[lo : lo + n] = self._faiss.quantizer.search(aug[:n], out.shape[1])[1]
        return out

    def _candidates(
        self,
        q: np.ndarray,
        want: int,
        filtered: bool,
        exact: bool,
        probes: np.ndarray | None = None,
        floor: float = -np.inf,
    ) -> tuple[np.ndarray, np.ndarray]:
        """IVF answers re-scored by exact inner product, plus the best vectors of the exact side list (those
        scoring at least ``floor``)."""
        self._query_aug[0, : self.dim] = q[0]
        params = self._search_parameters(filtered, exact, want)
        if probes is not None and not exact and len(probes) == self.params["nprobe"]:
            slots = self._search_probed(probes, want, params)
        else:
            slots = self._faiss.search(self._query_aug, want, params=params)[1]
        slots = slots[0][slots[0] >= 0]
        # Scored as the precomputed lists are (row_scores): equal vectors tie exactly, wherever they are stored.
        listed = np.zeros((0, self.dim), np.float32)
        if len(slots):
            listed = self._faiss.reconstruct_batch(slots)[:, : self.dim]
        scores = row_scores(listed, q[0])
        if len(self._side):  # longer than the bound: scored exactly, always
            side_slots, matrix = self._side.arrays()
            side_scores = matrix @ q[0]  # all of them, then filtered: no copy of the matrix per query
            # Only side vectors scoring at least the lists' want-th best (and the caller's floor) can be among
            # the best want of both (a comparison over the side list is far cheaper than a partition of all of
            # it). BLAS rounds equal vectors apart: the few just below the floor are kept, and the kept ones
            # scored again alike.
            if len(scores) >= want:
                floor = max(floor, float(scores.min()))
            better = np.flatnonzero(side_scores >= floor - 1e-4 * max(1.0, abs(floor)))
            side_slots, side_scores = side_slots[better], row_scores(matrix[better], q[0])
            if filtered:
                keep = self.slots.selected(side_slots)
                side_slots, side_scores = side_slots[keep], side_scores[keep]
            if len(side_scores) > want:
                best = np.argpartition(-side_scores, want - 1)[:want]
                side_slots, side_scores = side_slots[best], side_scores[best]
            slots, scores = np.concatenate([slots, side_slots]), np.concatenate([scores, side_scores])
        return self.slots.rows[slots], scores

    def _search_probed(self, probes: np.ndarray, want: int, params: faiss.SearchParametersIVF) -> np.ndarray:
        """(1, want) slots of the augmented query's search over the given lists (FAISS's search_preassigned;
        the distances to the centroids play no part in a flat list's scan). Into buffers kept from one search
        to the next (searches hold the engine's lock), as the augmented query is."""
        buffers = self._probe_buffers
        if buffers is None or buffers.want != want or len(buffers.assign[0]) != len(probes):
            buffers = self._probe_buffers = _ProbeBuffers(self._query_aug, len(probes), want)
        buffers.assign[0] = probes
        self._faiss.search_preassigned_c(1, buffers.query, want, *buffers.pointers, False, params)
        return buffers.slots

    def vector(self, row: int) -> np.ndarray:
        slot = self.slots.by_row[row]
        if slot in self._side:
            return self._side.get(slot)
        return self._faiss.reconstruct(slot)[: self.dim]

    def _vectors_in_faiss(self) -> int:
        return self._listed

    def _own_problems(self) -> list[str]:
        side_slots, _ = self._side.arrays()
        if np.any(self.slots.rows[side_slots] < 0) or not self._side.consistent():
            return ["the exact side list holds a dead slot, or its position map disagrees with it"]
        return []

    # -- for calibration (service/index/calibration.py) -------------------------------------------------------
    def width_limits(self, k: int) -> tuple[int, int]:
        """The fewest and most lists calibration probes."""
        return 1, self.params["nlist"]

    def exact_slots(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Slots of the exact top ``k`` per query: every list probed, where the L2 order of the augmented
        vectors is the inner-product order."""
        return self._search_lists(queries, k, self.params["nlist"])

    def approximate_slots(self, queries: np.ndarray, k: int, width: int) -> np.ndarray:
        """Slots of the top ``k`` per query with ``width`` lists probed."""
        return self._search_lists(queries, k, width)

    def _search_lists(self, q: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        """Top ``k`` slots per query: the lists' answers and the side list, by exact inner product."""
        aug = np.hstack([q, np.zeros((len(q), 1), np.float32)])
        slots = self._faiss.search(aug, k, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]
        found = slots >= 0  # a short answer is padded with -1
        vectors = self._faiss.reconstruct_batch(slots[found])[:, : self.dim]
        scores = np.full(slots.shape, -np.inf, dtype=np.float32)
        scores[found] = np.einsum("nd,nd->n", vectors, np.broadcast_to(q[:, None, :], (*slots.shape, self.dim))[found])
        side_slots, side_vectors = self._side.arrays()
        slots = np.hstack([slots, np.broadcast_to(side_slots, (len(q), len(side_slots)))])
        scores = np.hstack([scores, q @ side_vectors.T])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(slots, order, axis=1)


class _ProbeBuffers:
    """The arrays of one query's search over given lists, and their pointers for FAISS (made once per width)."""

    def __init__(self, query: np.ndarray, width: int, want: int) -> None:
        self.want = want
        self.assign = np.zeros((1, width), dtype=np.int64)
        self.centroid_distances = np.zeros((1, width), dtype=np.float32)
        self.distances = np.empty((1, want), dtype=np.float32)
        self.slots = np.empty((1, want), dtype=np.int64)
        self.query = faiss.swig_ptr(query)
        self.pointers = tuple(
            faiss.swig_ptr(a) for a in (self.assign, self.centroid_distances, self.distances, self.slots)
        )
