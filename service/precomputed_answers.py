"""A training user's exact top k from its precomputed list (service/precomputed.py) merged with an exact scan of
the items written online, in the index's order (score, then row); None where the index must answer."""

from __future__ import annotations

from collections.abc import Set

import numpy as np

from service.keyed_vectors import KeyedVectors
from service.precomputed import PrecomputedTopK, row_scores


class PrecomputedAnswers:
    """Answers from the precomputed lists, which hold until a training row changes or an item comes online.

    Args:
        lists: the training users' precomputed lists.
        user_embeddings: (n_users, d) the training users' query vectors.
        online_vectors: the embeddings of the items written online, by row (kept current by their owner).
        n_training_items: the artifact's items; rows below it are training rows.
    """

    # Above this many online items their exact scan costs about what an index search does, so the index
    # answers (docs/performance.md, "Precomputed exact top-k lists").
    ONLINE_SCAN_MAX = 10_000

    def __init__(
        self,
        lists: PrecomputedTopK,
        user_embeddings: np.ndarray,
        online_vectors: KeyedVectors,
        n_training_items: int,
    ) -> None:
        self.lists = lists
        self._users = user_embeddings
        self._online = online_vectors
        self._n_training_items = n_training_items
        # Training rows deleted or replaced since the artifact: their listed scores no longer hold.
        self.changed_training_rows: set[int] = set()

    def item_changed(self, row: int) -> None:
        """After an upsert or delete of ``row``."""
        if row < self._n_training_items:
            self.changed_training_rows.add(row)

    def answer(self, user_row: int, k: int, exclude: Set[int]) -> tuple[list[int], list[float]] | None:
        """The exact top k (rows, scores) of the user, none of ``exclude``, or None when the list runs out
        before k valid entries or the online items are too many to scan."""
        if k <= 0 or len(self._online) > self.ONLINE_SCAN_MAX:
            return None
        rows, scores, complete = self.lists.best(user_row)
        picked_rows, picked_scores = [], []
        for r, score in zip(rows.tolist(), scores.tolist(), strict=True):
            # deleted or replaced since the artifact (the online scan has the new vector), or seen online
            if r in self.changed_training_rows or r in exclude:
                continue
            picked_rows.append(r)
            picked_scores.append(score)
            if len(picked_rows) == k:
                break
        if len(picked_rows) < k and not complete:
            return None
        online_rows, vectors = self._online.arrays()
        if len(online_rows):
            query = self._users[user_row]
            # (the user's seen rows are mostly training rows: only the online ones concern the scan)
            seen_online = {r for r in exclude if r in self._online}
            best_rows, best_scores = best_online(online_rows, row_scores(vectors, query), k, seen_online)
            picked_rows, picked_scores = merge_best(picked_rows, picked_scores, best_rows, best_scores, k)
        return picked_rows, picked_scores

    def suffices(self, user_row: int, k: int, online_interactions: int) -> bool:
        """Whether :meth:`answer` answers for sure: each of the user's online interactions and each changed
        training row removes at most one entry from the list, and the online items are few enough to scan."""
        if len(self._online) > self.ONLINE_SCAN_MAX:
            return False
        rows, _, complete = self.lists.best(user_row)
        return complete or k + online_interactions + len(self.changed_training_rows) <= len(rows)

    def info(self) -> dict:
        return {
            "k": self.lists.k,
            "seconds": round(self.lists.seconds, 3),
            "changed_training_items": len(self.changed_training_rows),
            "online_items": len(self._online),
        }


def best_online(rows: np.ndarray, scores: np.ndarray, k: int, exclude: set[int]) -> tuple[list[int], list[float]]:
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


def merge_best(
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
