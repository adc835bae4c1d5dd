"""In-process recommendation engine: the trained embeddings, a FAISS index that also holds items added
online, per-user exclusions, and the meta learner that fuses new items on the fly.

The engine is pure in-memory state; :mod:`service.state` makes it durable and shared. All mutations and
searches hold one lock, since FAISS allows concurrent searches but not searches during add/remove.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from models.artifacts import Bundle


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
    strategy: str  # "model", "inductive" or "popular"
    item_ids: list[str]
    scores: list[float]


class Engine:
    """Serves one artifact version plus the online items and interactions applied to it."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.artifact_id = bundle.artifact_id
        # Tags the events of writes this engine applied itself (its follower skips them); a new engine
        # after a reload has a new origin, so it re-applies what was written through the old one.
        self.origin = uuid.uuid4().hex
        self.loaded_at = time.time()
        self.dim = bundle.item_embeddings.shape[1]
        self.n_states = bundle.item_states.shape[0]
        self.modalities = bundle.modalities  # name -> dim, in feature concatenation order
        self._lock = threading.RLock()
        self.index = faiss.clone_index(bundle.index)
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
        self.popularity: dict[int, float] = dict(enumerate(bundle.item_popularity.tolist()))
        # Items each training user already interacted with (train, valid and test of the data set).
        inter = bundle.interactions
        order = np.argsort(inter[:, 0], kind="stable")
        self._seen_items = inter[order, 1]
        self._seen_ptr = np.searchsorted(inter[order, 0], np.arange(len(bundle.user_ids) + 1))
        self.online_seen: dict[str, set[int]] = {}

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
        with torch.no_grad():
            final, states = self.bundle.encoder.encode_items(torch.from_numpy(matrix))
        final, states = final.numpy(), states.permute(1, 0, 2).numpy()
        if not (np.isfinite(final).all() and np.isfinite(states).all()):
            raise InputError("features are too large: the fused embedding overflows float32")
        return final, states

    # -- applying state (called for local writes and for events from other replicas) -------------------
    def upsert(self, item_id: str, row: int, embedding: np.ndarray, states: np.ndarray) -> None:
        """Add or replace an item. A training item of this artifact always keeps its training row (an id
        stored online against an older artifact may be a training item of this one)."""
        row = self._training_rows.get(item_id, row)
        if row < len(self._training_rows) and self.bundle.item_ids[row] != item_id:
            raise RowConflict(f"item {item_id!r}: row {row} is the training row of {self.bundle.item_ids[row]!r}")
        with self._lock:
            old = self.item_rows.get(item_id)
            if old is not None:
                self.index.remove_ids(np.array([old], dtype=np.int64))
                if old != row:
                    self.row_items.pop(old, None)
            self.index.add_with_ids(embedding.reshape(1, -1).astype(np.float32), np.array([row], dtype=np.int64))
            self.item_rows[item_id] = row
            self.known_rows[item_id] = row
            self.row_items[row] = item_id
            self.online_embeddings[row] = embedding.astype(np.float32)
            self.online_states[row] = states.astype(np.float32)
            self.online_items.add(item_id)
            self.popularity.setdefault(row, 0.0)

    def delete(self, item_id: str) -> bool:
        with self._lock:
            row = self.item_rows.pop(item_id, None)
            if row is None:
                return False
            self.index.remove_ids(np.array([row], dtype=np.int64))
            self.row_items.pop(row, None)
            self.online_embeddings.pop(row, None)
            self.online_states.pop(row, None)
            self.online_items.discard(item_id)
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

    # -- reading --------------------------------------------------------------------------------------
    def index_ids(self) -> np.ndarray:
        """Ids (rows) of every vector in the FAISS index, duplicates included (there should be none)."""
        with self._lock:
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def index_vector(self, row: int) -> np.ndarray:
        with self._lock:
            return self.index.reconstruct(int(row))

    def seen_rows(self, user_id: str) -> set[int]:
        rows = set(self.online_seen.get(user_id, ()))
        user_row = self.user_rows.get(user_id)
        if user_row is not None:
            rows.update(self._seen_items[self._seen_ptr[user_row] : self._seen_ptr[user_row + 1]].tolist())
        return rows

    def _search(self, query: np.ndarray, k: int, exclude: set[int]) -> tuple[list[str], list[float]]:
        """Top-k by inner product, skipping ``exclude`` and FAISS's -1 padding; widens the search when
        exclusions eat into the first k, or when a tie straddles the k-th place. Ties are ordered by row,
        so replicas holding the same items answer the same list whatever order FAISS stored them in."""
        with self._lock:
            total = self.n_items
            want = min(k + len(exclude) + 1, total)
            while True:
                scores, rows = self.index.search(query.reshape(1, -1).astype(np.float32), max(want, 1))
                picked = [
                    (r, float(s))
                    for r, s in zip(rows[0].tolist(), scores[0].tolist(), strict=True)
                    if r >= 0 and r not in exclude and r in self.row_items
                ]
                complete = want >= total or (len(picked) > k and picked[-1][1] < picked[k - 1][1])
                if complete:
                    picked.sort(key=lambda p: (-p[1], p[0]))
                    picked = picked[:k]
                    return [self.row_items[r] for r, _ in picked], [s for _, s in picked]
                want = min(2 * want, total)

    def recommend(self, user_id: str, k: int) -> Recommendation:
        seen = self.seen_rows(user_id)
        user_row = self.user_rows.get(user_id)
        if user_row is not None:
            items, scores = self._search(self.bundle.user_embeddings[user_row], k, seen)
            return Recommendation("model", items, scores)
        with self._lock:
            live = [r for r in seen if r in self.row_items]
            states = self.item_states(live) if live else None
        if states is not None:
            with torch.no_grad():
                query = self.bundle.encoder.encode_user(torch.from_numpy(states)).numpy()
            items, scores = self._search(query, k, seen)
            return Recommendation("inductive", items, scores)
        return self.popular(k, exclude=seen)

    def popular(self, k: int, exclude: set[int] = frozenset()) -> Recommendation:
        """Most-interacted items (training counts plus online interactions), ties by row."""
        with self._lock:
            ranked = sorted(self.popularity.items(), key=lambda kv: (-kv[1], kv[0]))
            picked = [(self.row_items[r], c) for r, c in ranked if r not in exclude and r in self.row_items][:k]
        return Recommendation("popular", [p[0] for p in picked], [float(p[1]) for p in picked])

    def similar(self, item_id: str, k: int) -> tuple[list[str], list[float]]:
        with self._lock:
            row = self.item_row(item_id)
            query = self.item_embedding(row)
        return self._search(query, k, {row})
