"""In-process recommendation engine: the trained embeddings, an item index (:mod:`service.index`: exact or
approximate FAISS) that also holds items added online, per-user exclusions, and the meta learner that fuses
new items on the fly.

The engine is pure in-memory state; :mod:`service.state` makes it durable and shared. All mutations and
searches hold one lock, since FAISS allows concurrent searches but not searches during add/remove.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from models.artifacts import Bundle
from service.index.factory import build_index
from service.index.settings import IndexSettings
from service.keyed_vectors import KeyedVectors
from service.precomputed import PrecomputedTopK, row_scores

_torch_threads = threading.local()


def use_torch_threads(n: int) -> None:
    """torch's intra-op thread count for the calling thread. Under OpenMP a count is per thread, but a thread
    takes the process default (the count set last, by any thread) at its first parallel operation: a request
    thread started while precomputed lists were being built (with more threads, service/precomputed.py) kept
    the build's count. Remembered per thread, so the common case costs no call into torch."""
    if getattr(_torch_threads, "n", None) != n:
        torch.set_num_threads(n)
        _torch_threads.n = n


class InputError(ValueError):
    """A request whose content is wrong (unknown modality, wrong dimension, ...): HTTP 422."""


class RowConflict(RuntimeError):
    """Redis assigns an online item a row that is a training row of another item in this artifact."""


class NotFound(KeyError):
    """An unknown item: HTTP 404."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


@dataclass
class Recommendation:
    strategy: str  # "model", "inductive" or "popular"; "+fresh" when fresh slots were filled
    item_ids: list[str]
    scores: list[float]
    fresh: list[int] = field(default_factory=list)  # positions in item_ids of the fresh slots


def _merge_best(
    rows_a: list[int], scores_a: list[float], rows_b: list[int], scores_b: list[float], k: int
) -> tuple[list[int], list[float]]:
    """The best k of two lists, each ordered by (score descending, row), in that order."""
    rows, scores = [], []
    i = j = 0
    while len(rows) < k and (i < len(rows_a) or j < len(rows_b)):
        take_a = j == len(rows_b) or (
            i < len(rows_a) and (scores_a[i] > scores_b[j] or (scores_a[i] == scores_b[j] and rows_a[i] < rows_b[j]))
        )
        if take_a:
            rows.append(rows_a[i])
            scores.append(scores_a[i])
            i += 1
        else:
            rows.append(rows_b[j])
            scores.append(scores_b[j])
            j += 1
    return rows, scores


class Engine:
    """Serves one artifact version plus the online items and interactions applied to it."""

    # Items that came online after the artifact, scored exactly next to a precomputed list: above this many
    # the scan costs about what an index search does (10,000 x 64 floats: ~0.1 ms), so the index answers.
    ONLINE_SCAN_MAX = 10_000

    def __init__(
        self,
        bundle: Bundle,
        index_settings: IndexSettings | None = None,
        precomputed_k: int = 0,
        torch_threads: int | None = None,
    ) -> None:
        self.bundle = bundle
        self.torch_threads = torch_threads  # for fusing items and embedding new users; None: as the thread has it
        self.artifact_id = bundle.artifact_id
        # Tags the events of writes this engine applied itself (its follower skips them); a new engine
        # after a reload has a new origin, so it re-applies what was written through the old one.
        self.origin = uuid.uuid4().hex
        self.loaded_at = time.time()
        self.dim = bundle.item_embeddings.shape[1]
        self.n_states = bundle.item_states.shape[0]
        self.modalities = bundle.modalities  # name -> dim, in feature concatenation order
        self._lock = threading.RLock()
        # Built from the item embeddings (the artifact's items.faiss is the same vectors, exact); rows are ids.
        settings = index_settings or IndexSettings()
        # approximate kinds: calibrated on the users' embeddings, to search wide enough for the target recall
        self.index = build_index(settings, bundle.item_embeddings, calibration_queries=bundle.user_embeddings)
        self.user_rows = {u: i for i, u in enumerate(bundle.user_ids)}
        self._training_rows = {it: i for i, it in enumerate(bundle.item_ids)}
        self.item_rows = dict(self._training_rows)
        # Row of every item ever served, deleted ones included (rows are never reused), so that an
        # interaction still excludes its item if that item is deleted and added again later.
        self.known_rows = dict(self._training_rows)
        self.row_items: dict[int, str] = dict(enumerate(bundle.item_ids))
        self.online_embeddings: dict[int, np.ndarray] = {}
        self.online_states: dict[int, np.ndarray] = {}
        self.online_items: set[str] = set()
        self.online_added: dict[int, float] = {}  # row -> unix time its item was written online (fresh slots)
        self.popularity: dict[int, float] = dict(enumerate(bundle.item_popularity.tolist()))
        # The most popular rows, best first by (-count, row), deleted ones included (filtered when read):
        # kept up to date as counts grow, rebuilt from ``popularity`` only when too short (see popular()).
        self._top_rows: list[int] | None = None
        self._top_limit = 0  # how many rows _top_rows keeps
        self._top_complete = False  # whether _top_rows ranks every row of ``popularity``
        # Items each training user already interacted with (train, valid and test of the data set).
        inter = bundle.interactions
        order = np.argsort(inter[:, 0], kind="stable")
        self._seen_items = inter[order, 1]
        self._seen_ptr = np.searchsorted(inter[order, 0], np.arange(len(bundle.user_ids) + 1))
        self.online_seen: dict[str, set[int]] = {}
        # Exact top-K per training user (service/precomputed.py); training rows deleted or replaced since
        # the artifact (their listed scores are stale), and the online vectors as one array for the scan.
        self.precomputed = (
            PrecomputedTopK(
                bundle.user_embeddings, bundle.item_embeddings, self._seen_ptr, self._seen_items,
                precomputed_k, threads=settings.build_thread_count,
            )
            if precomputed_k > 0 and len(bundle.user_ids)
            else None
        )  # fmt: skip
        self._changed_training_rows: set[int] = set()
        self._online_vectors = KeyedVectors(self.dim)  # online_embeddings by row, as one array

    # -- catalogue ------------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return int(self.index.ntotal)

    def has_item(self, item_id: str) -> bool:
        return item_id in self.item_rows

    def training_row(self, item_id: str) -> int | None:
        """Row of a training item (also after it was deleted), else None."""
        return self._training_rows.get(item_id)

    def item_row(self, item_id: str) -> int:
        try:
            return self.item_rows[item_id]
        except KeyError:
            raise NotFound(f"unknown item {item_id!r}") from None

    def item_embedding(self, row: int) -> np.ndarray:
        if row in self.online_embeddings:
            return self.online_embeddings[row]
        return self.bundle.item_embeddings[row]

    def item_states(self, rows: list[int]) -> np.ndarray:
        """(n_states, len(rows), d) per-layer states, for inductive users."""
        return np.stack(
            [self.online_states[r] if r in self.online_states else self.bundle.item_states[:, r] for r in rows],
            axis=1,
        )

    # -- fusing new items -----------------------------------------------------------------------------
    def feature_matrix(self, features: list[dict[str, list[float]]]) -> np.ndarray:
        """Check modality names and dims and concatenate in training order; raises InputError."""
        rows = []
        for n, item in enumerate(features):
            missing = [m for m in self.modalities if m not in item]
            extra = [m for m in item if m not in self.modalities]
            where = f"item {n}: " if len(features) > 1 else ""
            if missing or extra:
                raise InputError(
                    f"{where}features must have exactly the modalities {list(self.modalities)}"
                    + (f"; missing {missing}" if missing else "")
                    + (f"; unknown {extra}" if extra else "")
                )
            for m, dim in self.modalities.items():
                if len(item[m]) != dim:
                    raise InputError(f"{where}modality {m!r} needs {dim} values, got {len(item[m])}")
            rows.append(np.concatenate([np.asarray(item[m], dtype=np.float32) for m in self.modalities]))
        matrix = np.stack(rows)
        if not np.isfinite(matrix).all():
            raise InputError("features must be finite numbers representable as float32")
        return matrix

    def fuse(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Meta learner on the fly: (b, d_x) raw features -> embeddings (b, d), states (b, n_states, d)."""
        self._use_torch_threads()
        with torch.no_grad():
            final, states = self.bundle.encoder.encode_items(torch.from_numpy(matrix))
        final, states = final.numpy(), states.permute(1, 0, 2).numpy()
        if not (np.isfinite(final).all() and np.isfinite(states).all()):
            raise InputError("features are too large: the fused embedding overflows float32")
        return final, states

    def _use_torch_threads(self) -> None:
        if self.torch_threads is not None:
            use_torch_threads(self.torch_threads)

    # -- applying state (called for local writes and for events from other replicas) -------------------
    def upsert(
        self, item_id: str, row: int, embedding: np.ndarray, states: np.ndarray, added_at: float | None = None
    ) -> None:
        """Add or replace an item, written online at unix time ``added_at`` (default: now). A training item
        of this artifact always keeps its training row (an id stored online against an older artifact may be
        a training item of this one)."""
        row = self._training_rows.get(item_id, row)
        if row < len(self._training_rows) and self.bundle.item_ids[row] != item_id:
            raise RowConflict(f"item {item_id!r}: row {row} is the training row of {self.bundle.item_ids[row]!r}")
        with self._lock:
            old = self.item_rows.get(item_id)
            if old is not None:
                self.index.remove(old)
                if old != row:
                    self.row_items.pop(old, None)
            self.index.add(row, embedding)
            self.item_rows[item_id] = row
            self.known_rows[item_id] = row
            self.row_items[row] = item_id
            self.online_embeddings[row] = embedding.astype(np.float32)
            self.online_states[row] = states.astype(np.float32)
            self.online_items.add(item_id)
            self.online_added[row] = time.time() if added_at is None else added_at
            self._online_changed(row)
            if row not in self.popularity:
                self.popularity[row] = 0.0
                self._rank_changed(row)

    def delete(self, item_id: str) -> bool:
        with self._lock:
            row = self.item_rows.pop(item_id, None)
            if row is None:
                return False
            self.index.remove(row)
            self.row_items.pop(row, None)
            self.online_embeddings.pop(row, None)
            self.online_states.pop(row, None)
            self.online_items.discard(item_id)
            self.online_added.pop(row, None)
            self._online_changed(row)
            # popularity is kept: an item added again gets its counts back, as a restarted replica would
            return True

    def record_interaction(self, user_id: str, item_id: str) -> None:
        with self._lock:
            row = self.known_rows.get(item_id)
            if row is None:
                return
            seen = self.online_seen.setdefault(user_id, set())
            if row not in seen:
                seen.add(row)
                self.popularity[row] = self.popularity.get(row, 0.0) + 1.0
                self._rank_changed(row)

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

    def seen_rows(self, user_id: str) -> set[int]:
        rows = set(self.online_seen.get(user_id, ()))
        user_row = self.user_rows.get(user_id)
        if user_row is not None:
            rows.update(self._seen_items[self._seen_ptr[user_row] : self._seen_ptr[user_row + 1]].tolist())
        return rows

    def _search(self, query: np.ndarray, k: int, exclude: set[int]) -> tuple[list[str], list[float]]:
        """Top-k by inner product, skipping ``exclude``; ties ordered by row, so replicas holding the same
        items answer the same list whatever order the index stored them in (see :class:`ItemIndex`)."""
        with self._lock:
            picked = self.index.search(query, k, exclude)
            return [self.row_items[r] for r, _ in picked], [s for _, s in picked]

    def _from_precomputed(self, user_row: int, k: int, exclude: set[int]) -> tuple[list[str], list[float]] | None:
        """The exact top k from the user's precomputed list and a scan of the online items, or None when the
        list runs out before k valid entries (the index answers then). Same order as the index: score, row."""
        if self.precomputed is None or k <= 0:
            return None
        rows, scores, complete = self.precomputed.best(user_row)
        with self._lock:
            if len(self._online_vectors) > self.ONLINE_SCAN_MAX:
                return None
            picked_rows, picked_scores = [], []
            for r, score in zip(rows.tolist(), scores.tolist(), strict=True):
                # deleted or replaced since the artifact (the online scan has the new vector), or seen online
                if r in self._changed_training_rows or r in exclude:
                    continue
                picked_rows.append(r)
                picked_scores.append(score)
                if len(picked_rows) == k:
                    break
            if len(picked_rows) < k and not complete:
                return None
            online_rows, vectors = self._online_vectors.arrays()
            if len(online_rows):
                query = self.bundle.user_embeddings[user_row]
                # (the user's seen rows are mostly training rows: only the online ones concern the scan)
                seen_online = {r for r in exclude if r in self._online_vectors}
                best_rows, best_scores = self._best_online(online_rows, row_scores(vectors, query), k, seen_online)
                picked_rows, picked_scores = _merge_best(picked_rows, picked_scores, best_rows, best_scores, k)
            return [self.row_items[r] for r in picked_rows], picked_scores

    @staticmethod
    def _best_online(rows: np.ndarray, scores: np.ndarray, k: int, exclude: set[int]) -> tuple[list[int], list[float]]:
        """The best k (rows, scores) of the online scan by score, then row, none of ``exclude``; in numpy, since
        many online items may tie (the same features posted again)."""
        want = k + len(exclude)  # excluded items take at most len(exclude) of the best places
        if want < len(scores):  # the best ``want``, and every item tied with the last of them
            best = np.flatnonzero(scores >= np.partition(scores, len(scores) - want)[len(scores) - want])
            rows, scores = rows[best], scores[best]
        if exclude:
            keep = ~np.isin(rows, np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
            rows, scores = rows[keep], scores[keep]
        order = np.lexsort((rows, -scores))[:k]
        return rows[order].tolist(), scores[order].tolist()

    def _online_changed(self, row: int) -> None:
        """After an upsert or delete of ``row`` (under the lock): the online scan follows ``online_embeddings``,
        and a training row's precomputed scores no longer hold."""
        if row in self.online_embeddings:
            self._online_vectors.put(row, self.online_embeddings[row])
        else:
            self._online_vectors.remove(row)
        if row < len(self._training_rows):
            self._changed_training_rows.add(row)

    def precomputed_info(self) -> dict | None:
        if self.precomputed is None:
            return None
        with self._lock:
            changed, online = len(self._changed_training_rows), len(self._online_vectors)
        return {"k": self.precomputed.k, "seconds": round(self.precomputed.seconds, 3),
                "changed_training_items": changed, "online_items": online}  # fmt: skip

    def quick_recommend(self, user_id: str, k: int) -> bool:
        """Whether ``recommend(user_id, k)`` is bounded work that can run on the event loop: a training user
        whose precomputed list is sure to answer, or an approximate index (or a small one). Others (a flat
        scan of a large catalogue, a new user's tower pass) run in a worker thread."""
        if user_id not in self.user_rows:
            return False
        return self.index.bounded_search or self._list_suffices(user_id, k)

    def _list_suffices(self, user_id: str, k: int) -> bool:
        """Whether the precomputed list answers for sure: each online interaction and each changed training
        row removes at most one entry from it, and the online items are few enough to scan."""
        if self.precomputed is None or len(self._online_vectors) > self.ONLINE_SCAN_MAX:
            return False
        rows, _, complete = self.precomputed.best(self.user_rows[user_id])
        removed = len(self.online_seen.get(user_id, ())) + len(self._changed_training_rows)
        return complete or k + removed <= len(rows)

    def recommend(self, user_id: str, k: int, fresh: int = 0, fresh_window_s: float = 86400.0) -> Recommendation:
        """The user's top ``k`` unseen items. With ``fresh`` > 0, up to that many of the k slots go to the
        best items written online in the last ``fresh_window_s`` seconds (scored like every other item: by
        the user's embedding, or by popularity for a user without history), even where they would rank
        below the k-th; the list stays ordered by score and ``fresh`` names their positions."""
        seen = self.seen_rows(user_id)
        query, rec = self._recommend(user_id, k, seen)
        if fresh <= 0:
            return rec
        return self._with_fresh(rec, query, k, min(fresh, k), seen, time.time() - fresh_window_s)

    def _recommend(self, user_id: str, k: int, seen: set[int]) -> tuple[np.ndarray | None, Recommendation]:
        """(the user's query vector, None for a popularity answer; the top k)."""
        user_row = self.user_rows.get(user_id)
        if user_row is not None:
            query = self.bundle.user_embeddings[user_row]
            found = self._from_precomputed(user_row, k, seen)
            items, scores = found or self._search(query, k, seen)
            return query, Recommendation("model", items, scores)
        with self._lock:
            live = [r for r in seen if r in self.row_items]
            states = self.item_states(live) if live else None
        if states is not None:
            self._use_torch_threads()
            with torch.no_grad():
                query = self.bundle.encoder.encode_user(torch.from_numpy(states)).numpy()
            items, scores = self._search(query, k, seen)
            return query, Recommendation("inductive", items, scores)
        return None, self.popular(k, exclude=seen)

    def _fresh_items(
        self, query: np.ndarray | None, n: int, seen: set[int], since: float
    ) -> tuple[list[str], list[float]]:
        """The best ``n`` unseen items written online at or after ``since``, by score then row."""
        with self._lock:
            rows = np.fromiter(
                (r for r, added in self.online_added.items() if added >= since and r not in seen), dtype=np.int64
            )
            if not len(rows):
                return [], []
            if query is None:
                scores = np.array([self.popularity.get(int(r), 0.0) for r in rows])
            else:
                scores = row_scores(np.stack([self.online_embeddings[int(r)] for r in rows]), query)
            order = np.lexsort((rows, -scores))[:n]
            return [self.row_items[int(r)] for r in rows[order]], scores[order].tolist()

    def _with_fresh(
        self, rec: Recommendation, query: np.ndarray | None, k: int, n: int, seen: set[int], since: float
    ) -> Recommendation:
        fresh_ids, fresh_scores = self._fresh_items(query, n, seen, since)
        if not fresh_ids:
            return rec
        picked = set(fresh_ids)
        rest = [(i, s) for i, s in zip(rec.item_ids, rec.scores, strict=True) if i not in picked][: k - len(picked)]
        # By score, the model's items first on ties (a stable sort of the two lists, each ordered already).
        merged = sorted(
            [(s, False, i) for i, s in rest] + [(s, True, i) for i, s in zip(fresh_ids, fresh_scores, strict=True)],
            key=lambda entry: (-entry[0], entry[1]),
        )
        return Recommendation(
            f"{rec.strategy}+fresh",
            [i for _, _, i in merged],
            [float(s) for s, _, _ in merged],
            [position for position, (_, is_fresh, _) in enumerate(merged) if is_fresh],
        )

    def popular(self, k: int, exclude: set[int] = frozenset()) -> Recommendation:
        """Most-interacted items (training counts plus online interactions), ties by row."""
        with self._lock:
            if self._top_rows is None or self._top_limit < k + len(exclude):
                self._rank(max(self.TOP_ROWS, 2 * (k + len(exclude))))
            while True:
                picked = []
                for r in self._top_rows:
                    if r not in exclude and r in self.row_items:
                        picked.append((self.row_items[r], self.popularity[r]))
                        if len(picked) == k:
                            break
                if len(picked) == k or self._top_complete:
                    break
                self._rank(2 * self._top_limit)  # too many of the best are deleted or excluded: keep more
        return Recommendation("popular", [p[0] for p in picked], [float(p[1]) for p in picked])

    TOP_ROWS = 4096

    def _rank(self, limit: int) -> None:
        """The best ``limit`` rows of ``popularity`` by (-count, row), with numpy (a sort of every row in
        Python took about a second per request for a million items)."""
        rows = np.fromiter(self.popularity.keys(), dtype=np.int64, count=len(self.popularity))
        counts = np.fromiter(self.popularity.values(), dtype=np.float64, count=len(self.popularity))
        if limit < len(rows):
            keep = np.argpartition(-counts, limit - 1)[:limit]
            cut = counts[keep].min()
            keep = np.flatnonzero(counts >= cut)  # every row tied with the last kept one, for the row order
            rows, counts = rows[keep], counts[keep]
        order = np.lexsort((rows, -counts))[:limit]
        self._top_rows, self._top_limit = rows[order].tolist(), limit
        self._top_complete = len(self._top_rows) == len(self.popularity)

    def _rank_changed(self, row: int) -> None:
        """Keep the ranking right after ``row``'s count grew (or a new row appeared with count 0)."""
        top = self._top_rows
        if top is None:
            return
        key = (-self.popularity[row], row)
        if row in top:
            top.remove(row)
        elif not self._top_complete and top and key > (-self.popularity[top[-1]], top[-1]):
            return  # still ranks below every kept row, as it did: not kept
        lo, hi = 0, len(top)  # insert by (-count, row)
        while lo < hi:
            mid = (lo + hi) // 2
            if (-self.popularity[top[mid]], top[mid]) < key:
                lo = mid + 1
            else:
                hi = mid
        top.insert(lo, row)
        if len(top) > self._top_limit:
            top.pop()
            self._top_complete = False

    def similar(self, item_id: str, k: int) -> tuple[list[str], list[float]]:
        with self._lock:
            row = self.item_row(item_id)
            query = self.item_embedding(row)
        return self._search(query, k, {row})
