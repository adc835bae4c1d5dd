"""In-process recommendation engine: one artifact version plus the online items and interactions applied to it.

A thin facade over collaborators with one job each: the id/row :class:`~service.catalog.Catalog`, the item
index (:mod:`service.index`, exact or approximate FAISS) that also holds items added online, the
:class:`~service.online_items.OnlineItems`, :class:`~service.popularity.Popularity`, each user's
:class:`~service.seen_items.SeenItems` (left out of recommendations), the precomputed lists
(:class:`~service.precomputed_answers.PrecomputedAnswers`) and the meta learner fusing new items on the fly
(:class:`~service.fusion.Fusion`).

The engine is pure in-memory state; :mod:`service.state` makes it durable and shared. All mutations and
searches hold one lock, since FAISS allows concurrent searches but not searches during add/remove.
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np

from models.artifacts import Bundle
from service.catalog import Catalog
from service.fusion import Fusion
from service.index.factory import build_index
from service.index.settings import IndexSettings
from service.online_items import OnlineItems
from service.popularity import Popularity
from service.precomputed import PrecomputedTopK, row_scores
from service.precomputed_answers import PrecomputedAnswers
from service.recommendation import Recommendation, with_fresh
from service.seen_items import SeenItems


class Engine:
    """Serves one artifact version plus the online items and interactions applied to it.

    Args:
        bundle: the artifact.
        index_settings: the item index (default: exact).
        precomputed_k: length of each training user's precomputed list; 0: none.
        torch_threads: for fusing items and embedding new users; None: as the calling thread has it.
        batch_torch_threads: for fusing a batch of items (service/fusion.py); None: ``torch_threads``.
        candidate_cap: with precomputed lists, the online items filed per training user at write time
            (service/online_candidates.py); 0: none, every request searches the online items.
    """

    def __init__(
        self,
        bundle: Bundle,
        index_settings: IndexSettings | None = None,
        precomputed_k: int = 0,
        torch_threads: int | None = None,
        batch_torch_threads: int | None = None,
        candidate_cap: int = 0,
    ) -> None:
        self.bundle = bundle
        self.artifact_id = bundle.artifact_id
        # Tags the events of writes this engine applied itself (its follower skips them); the engine built by
        # a reload has another origin, so it applies again what was written through this one.
        self.origin = uuid.uuid4().hex
        self.loaded_at = time.time()
        self.dim = bundle.item_embeddings.shape[1]
        self.modalities = bundle.modalities  # name -> dim, in feature concatenation order
        self._lock = threading.RLock()
        settings = index_settings or IndexSettings()
        # Built from the item embeddings (the artifact's items.faiss is the same vectors, exact), rows as ids;
        # an approximate kind calibrated on the users' embeddings to search wide enough for the target recall.
        self.index = build_index(settings, bundle.item_embeddings, calibration_queries=bundle.user_embeddings)
        self.catalog = Catalog(bundle.item_ids, bundle.user_ids)
        self.online = OnlineItems(bundle.item_embeddings, bundle.item_states)
        self.popularity = Popularity(bundle.item_popularity.tolist())
        self.seen = SeenItems(bundle.interactions, len(bundle.user_ids))
        self.fusion = Fusion(bundle.encoder, bundle.modalities, torch_threads, batch_torch_threads)
        self.precomputed = self._precomputed(precomputed_k, settings.build_thread_count, candidate_cap)

    def _precomputed(self, k: int, threads: int, candidate_cap: int) -> PrecomputedAnswers | None:
        """Exact top-k lists of every training user (service/precomputed.py), or None for k = 0."""
        bundle = self.bundle
        if k <= 0 or not len(bundle.user_ids):
            return None
        lists = PrecomputedTopK(bundle.user_embeddings, bundle.item_embeddings, self.seen.training_ptr,
                                self.seen.training_items, k, threads=threads)  # fmt: skip
        probes = self.index.probe_lists(bundle.user_embeddings)
        return PrecomputedAnswers(lists, bundle.user_embeddings, self.index.empty_like, len(bundle.item_ids), probes,
                                  candidate_cap)  # fmt: skip

    # -- catalogue ------------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return int(self.index.ntotal)

    def has_item(self, item_id: str) -> bool:
        return self.catalog.has_item(item_id)

    def training_row(self, item_id: str) -> int | None:
        """Row of a training item (also after it was deleted), else None."""
        return self.catalog.training_row(item_id)

    def item_row(self, item_id: str) -> int:
        """The live item's row; NotFound otherwise."""
        return self.catalog.item_row(item_id)

    def item_embedding(self, row: int) -> np.ndarray:
        return self.online.embedding(row)

    # -- fusing new items -----------------------------------------------------------------------------
    def feature_matrix(self, features: list[dict[str, list[float]]]) -> np.ndarray:
        """Check modality names and dims and concatenate in training order; raises InputError."""
        return self.fusion.feature_matrix(features)

    def fuse(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Meta learner on the fly: (b, d_x) raw features -> embeddings (b, d), states (b, n_states, d)."""
        return self.fusion.fuse(matrix)

    # -- applying state (called for local writes and for events from other replicas) -------------------
    def upsert(
        self, item_id: str, row: int, embedding: np.ndarray, states: np.ndarray, added_at: float | None = None
    ) -> None:
        """Add or replace an item, written online at unix time ``added_at`` (default: now); a training item
        of this artifact keeps its training row whatever ``row`` says (RowConflict for another's)."""
        self.upsert_many([(item_id, row, embedding, states, added_at)])

    def upsert_many(self, items: list[tuple[str, int, np.ndarray, np.ndarray, float | None]]) -> None:
        """:meth:`upsert` of items with distinct ids, each given as (item_id, row, embedding, states, added_at),
        with one addition to each index; nothing is applied if one of them has a conflicting row (RowConflict)."""
        now = time.time()
        rows = [self.catalog.row_for(item[0], item[1]) for item in items]
        if len(set(rows)) != len(rows):  # two ids on one row (state the consistency check reports): in order
            for item in items:
                self.upsert_many([item])
            return
        vectors = np.stack([np.asarray(item[2], dtype=np.float32) for item in items])
        row_array = np.array(rows, dtype=np.int64)
        # The training users each item reaches are found before the lock: requests go on meanwhile.
        matches = self.precomputed.match_written(row_array, vectors) if self.precomputed is not None else None
        with self._lock:
            for (item_id, _, embedding, states, added_at), row in zip(items, rows, strict=True):
                old = self.catalog.item_rows.get(item_id)
                if old is not None and old != row:
                    self.index.remove(old)
                    self._item_removed(old)
                self.catalog.place(item_id, row)
                self.online.put(item_id, row, embedding, states, now if added_at is None else added_at)
                self.popularity.add_row(row)
            self.index.add_many(row_array, vectors)
            if self.precomputed is not None:
                self.precomputed.items_written(row_array, vectors, matches)

    def delete(self, item_id: str) -> bool:
        with self._lock:
            row = self.catalog.remove(item_id)
            if row is None:
                return False
            self.index.remove(row)
            self.online.drop(item_id, row)
            self._item_removed(row)
            # popularity is kept: an item added again gets its counts back, as a restarted replica would
            return True

    def _item_removed(self, row: int) -> None:
        if self.precomputed is not None:
            self.precomputed.item_removed(row)

    def record_interaction(self, user_id: str, item_id: str) -> None:
        with self._lock:
            row = self.catalog.known_rows.get(item_id)
            if row is not None and self.seen.record(user_id, row):
                self.popularity.increment(row)

    # -- reading --------------------------------------------------------------------------------------
    def index_ids(self) -> np.ndarray:
        """Rows of every live vector in the index, duplicates included (there should be none)."""
        with self._lock:
            return self.index.rows()

    def index_vector(self, row: int) -> np.ndarray:
        with self._lock:
            return self.index.vector(int(row))

    def index_problems(self) -> list[str]:
        """Disagreements inside the index (FAISS against its row bookkeeping)."""
        with self._lock:
            return self.index.problems()

    def online_index_problems(self) -> list[str]:
        """Disagreements between the online items and what the precomputed answers search them in."""
        if self.precomputed is None:
            return []
        with self._lock:
            problems = [f"online items' search: {p}" for p in self.precomputed.online_problems()]
            held, online = set(self.precomputed.online_rows().tolist()), set(self.online.embeddings)
            if held != online:
                problems.append(
                    f"online items' search: {len(held - online)} rows that are not online items, "
                    f"{len(online - held)} online items missing"
                )
            return problems

    def seen_rows(self, user_id: str) -> set[int]:
        return self.seen.rows(user_id, self.catalog.user_rows.get(user_id))

    def precomputed_info(self) -> dict | None:
        if self.precomputed is None:
            return None
        with self._lock:
            return self.precomputed.info()

    def quick_recommend(self, user_id: str, k: int) -> bool:
        """Whether ``recommend(user_id, k)`` is bounded work that can run on the event loop: a training user
        whose precomputed list is sure to answer, or an approximate index (or a small one). Others (a flat
        scan of a large catalogue, a new user's tower pass) run in a worker thread."""
        if user_id not in self.catalog.user_rows:
            return False
        return self.index.bounded_search or self._list_suffices(user_id, k)

    def _list_suffices(self, user_id: str, k: int) -> bool:
        """Whether the user's precomputed list answers ``recommend(user_id, k)`` for sure."""
        if self.precomputed is None:
            return False
        return self.precomputed.suffices(self.catalog.user_rows[user_id], k, self.seen.online_count(user_id))

    def recommend(self, user_id: str, k: int, fresh: int = 0, fresh_window_s: float = 86400.0) -> Recommendation:
        """The user's top ``k`` unseen items. With ``fresh`` > 0, up to that many of the k slots go to the
        best items written online in the last ``fresh_window_s`` seconds (scored like every other item: by
        the user's embedding, or by popularity for a user without history), even where they would rank
        below the k-th; the list stays ordered by score and ``fresh`` names their positions."""
        seen = self.seen_rows(user_id)
        query, rec = self._recommend(user_id, k, seen)
        if fresh <= 0:
            return rec
        fresh_ids, fresh_scores = self._fresh_items(query, min(fresh, k), seen, time.time() - fresh_window_s)
        return with_fresh(rec, fresh_ids, fresh_scores, k)

    def _recommend(self, user_id: str, k: int, seen: set[int]) -> tuple[np.ndarray | None, Recommendation]:
        """(the user's query vector, None for a popularity answer; the top k)."""
        user_row = self.catalog.user_rows.get(user_id)
        if user_row is not None:
            query = self.bundle.user_embeddings[user_row]
            found = self._from_precomputed(user_row, k, seen)
            items, scores = found or self._search(query, k, seen)
            return query, Recommendation("model", items, scores)
        with self._lock:
            live = [r for r in seen if r in self.catalog.row_items]
            states = self.online.layer_states(live) if live else None
        if states is not None:
            query = self.fusion.embed_user(states)
            items, scores = self._search(query, k, seen)
            return query, Recommendation("inductive", items, scores)
        return None, self.popular(k, exclude=seen)

    def _from_precomputed(self, user_row: int, k: int, exclude: set[int]) -> tuple[list[str], list[float]] | None:
        """The top k from the user's precomputed list and a search of the online items' own index, or None when
        the index must answer. Same order as the index: score, row."""
        if self.precomputed is None:
            return None
        with self._lock:
            found = self.precomputed.answer(user_row, k, exclude)
            return None if found is None else (self.catalog.ids(found[0]), found[1])

    def _search(self, query: np.ndarray, k: int, exclude: set[int]) -> tuple[list[str], list[float]]:
        """Top-k by inner product, skipping ``exclude``; ties ordered by row, so replicas holding the same
        items answer the same list whatever order the index stored them in (see :mod:`service.index`)."""
        with self._lock:
            picked = self.index.search(query, k, exclude)
            return self.catalog.ids([r for r, _ in picked]), [s for _, s in picked]

    def _fresh_items(
        self, query: np.ndarray | None, n: int, seen: set[int], since: float
    ) -> tuple[list[str], list[float]]:
        """The best ``n`` unseen items written online at or after ``since``, by score then row."""
        with self._lock:
            rows = self.online.written_since(since, seen)
            if not len(rows):
                return [], []
            if query is None:
                scores = np.array([self.popularity.count(int(r)) for r in rows])
            else:
                scores = row_scores(np.stack([self.online.embeddings[int(r)] for r in rows]), query)
            order = np.lexsort((rows, -scores))[:n]
            return self.catalog.ids(rows[order].tolist()), scores[order].tolist()

    def popular(self, k: int, exclude: set[int] = frozenset()) -> Recommendation:
        """Most-interacted items (training counts plus online interactions), ties by row."""
        with self._lock:
            picked = self.popularity.best(k, exclude, self.catalog.row_items)
            items = self.catalog.ids([r for r, _ in picked])
        return Recommendation("popular", items, [float(count) for _, count in picked])

    def similar(self, item_id: str, k: int) -> tuple[list[str], list[float]]:
        with self._lock:
            row = self.catalog.item_row(item_id)
            query = self.item_embedding(row)
        return self._search(query, k, {row})
