"""A training user's top k from its precomputed list (service/precomputed.py) merged with the best of the items
written online, in the index's order (score, then row); None where the index must answer."""

from __future__ import annotations

from collections.abc import Callable, Set

import numpy as np

from service.index.base import SlottedIndex
from service.index.scores import row_scores
from service.keyed_vectors import KeyedVectors
from service.online_candidates import Matches, OnlineCandidates
from service.precomputed import PrecomputedTopK


class PrecomputedAnswers:
    """Answers from the precomputed lists, which hold until a training row changes or an item comes online.

    The items written online (new rows, and training rows written again) are scanned exactly while they are
    few (up to ``ONLINE_SCAN_MAX``); past that they move into an index of their own, of the served kind
    (``new_online_index``: :meth:`SlottedIndex.empty_like` of the item index), searched as the served index is:
    exactly for flat, approximately for hnsw and ivf, with the same search width. A request then costs one list
    walk and one search of the online items, however many items the artifact has. For ivf the lists each
    training user's search scans are chosen once (``user_probes``), not at every request: a search then only
    scans them. With ``candidate_cap`` > 0 each write also files its items with the training users whose list
    floor they reach (:class:`~service.online_candidates.OnlineCandidates`), and a request reads them there,
    exactly and whatever the number of online items; the search remains for a user who needs more of them.

    Args:
        lists: the training users' precomputed lists.
        user_embeddings: (n_users, d) the training users' query vectors.
        new_online_index: makes the empty index the online items move into.
        n_training_items: the artifact's items; rows below it are training rows.
        user_probes: (n_users, width) the training users' :meth:`SlottedIndex.probe_lists` of the item index
            (whose lists the online index shares), or None.
        candidate_cap: online items filed per training user at most; 0: none filed (every request searches).
    """

    # Up to this many online items a scan of them all costs less than a search of their index (docs/performance.md,
    # "Items streaming in").
    ONLINE_SCAN_MAX = 8_000

    def __init__(
        self,
        lists: PrecomputedTopK,
        user_embeddings: np.ndarray,
        new_online_index: Callable[[], SlottedIndex],
        n_training_items: int,
        user_probes: np.ndarray | None = None,
        candidate_cap: int = 0,
    ) -> None:
        self.lists = lists
        self._users = user_embeddings
        self._user_probes = user_probes
        self._new_online_index = new_online_index
        self._scanned: KeyedVectors | None = KeyedVectors(user_embeddings.shape[1])
        self.online_index: SlottedIndex | None = None
        self._n_training_items = n_training_items
        # Training rows deleted or replaced since the artifact: their listed scores no longer hold.
        self.changed_training_rows: set[int] = set()
        self.candidates = OnlineCandidates(user_embeddings, lists.floors(), candidate_cap) if candidate_cap else None

    @property
    def online_count(self) -> int:
        return self.online_index.ntotal if self.online_index is not None else len(self._scanned)

    def match_written(self, rows: np.ndarray, vectors: np.ndarray) -> Matches | None:
        """What :meth:`items_written` files for these items (:meth:`OnlineCandidates.match`), computed beforehand
        and outside the caller's lock; None when nothing is filed."""
        return self.candidates.match(rows, vectors) if self.candidates is not None else None

    def items_written(self, rows: np.ndarray, vectors: np.ndarray, matches: Matches | None = None) -> None:
        """After an upsert of distinct ``rows`` with ``vectors``; ``matches``: :meth:`match_written`'s result for
        them, if computed."""
        if self.online_index is None and len(self._scanned) + len(rows) > self.ONLINE_SCAN_MAX:
            self.online_index = self._new_online_index()
            scanned_rows, scanned_vectors = self._scanned.arrays()
            self.online_index.add_many(scanned_rows.copy(), scanned_vectors.copy())
            self._scanned = None
        if self.online_index is not None:
            self.online_index.add_many(rows, vectors)
        else:
            for row, vector in zip(rows.tolist(), vectors, strict=True):
                self._scanned.put(row, vector)
        self.changed_training_rows.update(r for r in rows.tolist() if r < self._n_training_items)
        if self.candidates is not None:
            self.candidates.add(rows, vectors, matches)

    def item_removed(self, row: int) -> None:
        """After a delete of ``row``."""
        if self.online_index is not None:
            self.online_index.remove(row)
        else:
            self._scanned.remove(row)
        if row < self._n_training_items:
            self.changed_training_rows.add(row)
        if self.candidates is not None:
            self.candidates.remove(row)

    def online_rows(self) -> np.ndarray:
        """Rows of the online items as held for the answers."""
        return self.online_index.rows() if self.online_index is not None else self._scanned.arrays()[0].copy()

    def online_problems(self) -> list[str]:
        """Disagreements inside what holds the online items."""
        if self.online_index is not None:
            return self.online_index.problems()
        return [] if self._scanned.consistent() else ["the online scan's position map disagrees with its keys"]

    def _best_online(
        self, user_row: int, k: int, exclude: Set[int], floor: float = -np.inf
    ) -> tuple[list[int], list[float]]:
        """The user's best k online items (rows, scores) by score then row, none of ``exclude``, scored as the
        lists are (row_scores: equal vectors tie across the two); the index may leave out those scoring below
        ``floor``, the k-th score of the user's list. An approximate index search that finds fewer than k is
        not done again exactly: the list holds the rest."""
        if self.candidates is not None:
            found = self.candidates.best(user_row, k, exclude)
            if found is not None:
                return found
        query = self._users[user_row]
        if self.online_index is not None:
            probes = self._user_probes[user_row] if self._user_probes is not None else None
            found = self.online_index.search(query, k, exclude, complete=False, probes=probes, floor=floor)
            return [r for r, _ in found], [s for _, s in found]
        rows, vectors = self._scanned.arrays()
        # (the user's seen rows are mostly training rows: only the online ones concern the scan)
        seen_online = {r for r in exclude if r in self._scanned}
        return best_online(rows, row_scores(vectors, query), k, seen_online)

    def answer(self, user_row: int, k: int, exclude: Set[int]) -> tuple[list[int], list[float]] | None:
        """The top k (rows, scores) of the user, none of ``exclude``, or None when the list runs out before k
        valid entries."""
        if k <= 0:
            return None
        rows, scores, complete = self.lists.best(user_row)
        picked_rows, picked_scores = [], []
        for r, score in zip(rows.tolist(), scores.tolist(), strict=True):
            # deleted or replaced since the artifact (the online index has the new vector), or seen online
            if r in self.changed_training_rows or r in exclude:
                continue
            picked_rows.append(r)
            picked_scores.append(score)
            if len(picked_rows) == k:
                break
        if len(picked_rows) < k and not complete:
            return None
        if self.online_count:
            floor = picked_scores[-1] if len(picked_rows) == k else -np.inf
            online_rows, online_scores = self._best_online(user_row, k, exclude, floor)
            picked_rows, picked_scores = merge_best(picked_rows, picked_scores, online_rows, online_scores, k)
        return picked_rows, picked_scores

    def suffices(self, user_row: int, k: int, online_interactions: int) -> bool:
        """Whether :meth:`answer` answers for sure: each of the user's online interactions and each changed
        training row removes at most one entry from the list."""
        rows, _, complete = self.lists.best(user_row)
        return complete or k + online_interactions + len(self.changed_training_rows) <= len(rows)

    def info(self) -> dict:
        return {
            "k": self.lists.k,
            "seconds": round(self.lists.seconds, 3),
            "changed_training_items": len(self.changed_training_rows),
            "online_items": self.online_count,
            "online_search": "scan" if self.online_index is None else self.online_index.kind,
            "online_candidates": None if self.candidates is None else self.candidates.pairs,
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
