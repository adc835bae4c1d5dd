"""The items written online since the artifact: their vectors and per-layer states, and when each was written;
and the vectors of any item, online or not."""

from __future__ import annotations

import numpy as np


class OnlineItems:
    """Online items by row.

    Args:
        item_embeddings: (n, d) the artifact's item embeddings, by row.
        item_states: (n_states, n, d) the artifact's per-layer item states.
    """

    def __init__(self, item_embeddings: np.ndarray, item_states: np.ndarray) -> None:
        self._artifact_embeddings = item_embeddings
        self._artifact_states = item_states
        self.ids: set[str] = set()
        self.embeddings: dict[int, np.ndarray] = {}
        self.states: dict[int, np.ndarray] = {}  # row -> (n_states, d)
        self.added: dict[int, float] = {}  # row -> unix time its item was written (fresh slots)

    def put(self, item_id: str, row: int, embedding: np.ndarray, states: np.ndarray, added_at: float) -> None:
        self.ids.add(item_id)
        self.embeddings[row] = embedding.astype(np.float32)
        self.states[row] = states.astype(np.float32)
        self.added[row] = added_at

    def drop(self, item_id: str, row: int) -> None:
        self.ids.discard(item_id)
        self.embeddings.pop(row, None)
        self.states.pop(row, None)
        self.added.pop(row, None)

    def written_since(self, since: float, exclude: set[int]) -> np.ndarray:
        """Rows of the items written at or after ``since``, none of ``exclude``."""
        return np.fromiter(
            (r for r, added in self.added.items() if added >= since and r not in exclude), dtype=np.int64
        )

    def embedding(self, row: int) -> np.ndarray:
        """The embedding of the item at ``row``: as written online, else the artifact's."""
        online = self.embeddings.get(row)
        return online if online is not None else self._artifact_embeddings[row]

    def layer_states(self, rows: list[int]) -> np.ndarray:
        """(n_states, len(rows), d) per-layer states of the items at ``rows``, for inductive users."""
        states, artifact = self.states, self._artifact_states
        return np.stack([states[r] if r in states else artifact[:, r] for r in rows], axis=1)
