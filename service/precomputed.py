"""Exact top-K lists of every training user, computed once per artifact when the engine is built.

A recommendation for a training user is then the first k entries of its list that are still valid (not
seen online, not deleted, not replaced since the artifact), merged with the best of the items that came online
after it (filed with the user at write time, service/online_candidates.py, or a search of their own index,
service/precomputed_answers.py): O(k) work instead of a search of the whole catalogue,
and exact for the artifact's items, where the approximate index is calibrated to a recall below 1
(MMF_ANN_TARGET_RECALL). The engine falls back to the index when the list runs out (a user with many online
interactions, many deleted items).

Lists are ordered by score, then row (the index's order), and hold exactly the best K by that order: when
the K-th and the (K+1)-th score tie, the tied group is cut off (the list gets shorter), so that an item
outside a list never ranks before an item inside it. A matrix product does not give identical rows identical
scores (BLAS kernels treat a block's last rows differently), so it only picks candidates; their scores come
from :func:`row_scores`, the same for the same vector wherever it is stored, and the online items' answers use it
too.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import numpy as np
import torch

from service.index.scores import product_error, row_scores

USER_BLOCK = 256  # users scored per matrix product: (256, items) float32 scores at a time
MARGIN = 16  # candidates per user beyond k, so that the rounding of the product cannot hide one


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class PrecomputedTopK:
    """Per training user, the best ``k`` artifact items (inner product) not among its known interactions.

    Args:
        user_embeddings: (n_users, d) float32.
        item_embeddings: (n_items, d) float32: the artifact's items; row = index row.
        seen_ptr, seen_items: CSR of each user's known interactions (rows of ``seen_items`` per user).
        k: list length (at most ``n_items``).
        threads: torch threads for the computation.
    """

    def __init__(
        self,
        user_embeddings: np.ndarray,
        item_embeddings: np.ndarray,
        seen_ptr: np.ndarray,
        seen_items: np.ndarray,
        k: int,
        threads: int = 1,
    ) -> None:
        start = time.perf_counter()
        n_users, n_items = len(user_embeddings), len(item_embeddings)
        self.k = min(k, n_items)
        self.rows = np.full((n_users, self.k), -1, dtype=np.int64)
        self.scores = np.zeros((n_users, self.k), dtype=np.float32)
        self.lengths = np.zeros(n_users, dtype=np.int64)
        # complete: the list holds every unseen item, so a short answer is the whole answer
        self.complete = np.zeros(n_users, dtype=bool)
        items = torch.from_numpy(np.ascontiguousarray(item_embeddings, dtype=np.float32))
        users = torch.from_numpy(np.ascontiguousarray(user_embeddings, dtype=np.float32))
        ptr, seen = torch.from_numpy(seen_ptr.astype(np.int64)), torch.from_numpy(seen_items.astype(np.int64))
        take = min(self.k + MARGIN, n_items)
        item_array = items.numpy()
        error = product_error(item_embeddings.shape[1]) * float(np.linalg.norm(item_array, axis=1).max(initial=0))
        with _torch_threads(threads), torch.no_grad():
            for lo in range(0, n_users, USER_BLOCK):
                hi = min(lo + USER_BLOCK, n_users)
                scores = users[lo:hi] @ items.T
                counts = ptr[lo + 1 : hi + 1] - ptr[lo:hi]
                block_rows = torch.repeat_interleave(torch.arange(hi - lo), counts)
                scores[block_rows, seen[ptr[lo] : ptr[hi]]] = -math.inf
                product, rows = (t.numpy() for t in torch.topk(scores, take, dim=1))
                query = users[lo:hi].numpy()
                exact = np.where(np.isfinite(product), row_scores(item_array[rows], query), -np.inf)
                # Items outside the candidates score at most the last candidate's product, plus its error.
                bound = product[:, -1] + error * np.linalg.norm(query, axis=1)
                self._store(lo, exact.astype(np.float32), rows, bound, all_listed=take == n_items)
        self.seconds = time.perf_counter() - start

    def _store(self, lo: int, scores: np.ndarray, rows: np.ndarray, bound: np.ndarray, all_listed: bool) -> None:
        """Keep, per user, the candidates sure to beat every item outside them (all of them if every item is
        a candidate), best first, at most k, a tie across the k-th place cut off."""
        order = np.lexsort((rows, -scores), axis=1)  # by score, then row
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        for i in range(len(rows)):
            unseen = int(np.isfinite(scores[i]).sum())  # -inf: a known interaction
            sure = unseen if all_listed or not np.isfinite(bound[i]) else int((scores[i] > bound[i]).sum())
            length = min(sure, self.k)
            if length < sure and scores[i, length] == scores[i, length - 1]:  # a tie across the cut: drop it
                length = int(np.searchsorted(-scores[i, :length], -scores[i, length - 1], side="left"))
            self.rows[lo + i, :length] = rows[i, :length]
            self.scores[lo + i, :length] = scores[i, :length]
            # complete: every unseen item is in the list
            self.lengths[lo + i], self.complete[lo + i] = (
                length,
                length == unseen and (all_listed or unseen < len(rows[i])),
            )

    def floors(self) -> np.ndarray:
        """(n_users,) the lowest score an item outside a user's list may need to reach its answers: its list's
        last score; -inf for a list that holds every unseen item, +inf for an empty list that does not."""
        last = self.scores[np.arange(len(self.lengths)), np.maximum(self.lengths - 1, 0)]
        floors = np.where(self.lengths > 0, last, np.float32(np.inf)).astype(np.float32)
        floors[self.complete] = -np.inf
        return floors

    def best(self, user_row: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(rows, scores, complete) of a user's list, best first."""
        n = self.lengths[user_row]
        return self.rows[user_row, :n], self.scores[user_row, :n], bool(self.complete[user_row])
