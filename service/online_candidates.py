"""Per training user, the items written online that can enter its answer, kept up to date at write time.

A training user's answer is its precomputed list merged with the best online items (service/precomputed_answers.py).
An online item can enter a top k (k up to the lists' length K) only if it scores at least the K-th score of the
user's list (its floor): below it, k valid list entries already beat it, and where the list runs short the index
answers anyway. With a large catalogue few online items clear a user's floor, so each write scores its items
against every training user once (one matrix product) and files each item with the users whose floor it clears. A
request then walks two short sorted lists instead of searching the online items: its cost does not grow with
them, and the answer is exact.

The product only picks candidates: each kept pair is scored again with :func:`row_scores`, as the lists are, so
equal vectors tie exactly with listed items; pairs whose product falls short of the floor by less than the
product's rounding bound (:func:`~service.index.scores.product_error`) are scored again too. A user holds at most
``cap`` items: past that the worst (by score, then row) are left out, and the user remembers the best item left
out (its cut). Every item before the cut is held; an answer that needs an item past it (the user saw many held
items online) gets None, and the caller searches the online items instead.
"""

from __future__ import annotations

import bisect
from collections.abc import Set

import numpy as np
import torch

from service.index.scores import product_error, row_scores

# (users, rows, scores) of the pairs a write files: see OnlineCandidates.match.
Matches = tuple[np.ndarray, np.ndarray, np.ndarray]
NO_MATCHES: Matches = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

USER_BLOCK = 4096  # users and items scored per matrix product: (4096, 1024) float32 scores at a time
ITEM_BLOCK = 1024


class OnlineCandidates:
    """The online items each training user may need, in (score descending, row) order.

    Args:
        user_embeddings: (n_users, d) float32, the training users' query vectors.
        floors: (n_users,) the score an online item must reach to be held for the user: the K-th score of a
            list that holds K entries, -inf for a list that holds every unseen item, +inf to hold nothing.
        cap: items held per user at most.
    """

    def __init__(self, user_embeddings: np.ndarray, floors: np.ndarray, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, not {cap}")
        self._users = np.ascontiguousarray(user_embeddings, dtype=np.float32)
        self._user_tensor = torch.from_numpy(self._users)  # shares the memory: torch's product is the faster here
        self._floors = np.asarray(floors, dtype=np.float32)
        self._user_norms = np.linalg.norm(self._users, axis=1)
        self._cap = cap
        self._held: dict[int, list[tuple[float, int]]] = {}  # user -> [(-score, row)], sorted
        self._cut: dict[int, tuple[float, int]] = {}  # user -> (-score, row) of the best item left out
        self._holders: dict[int, set[int]] = {}  # row -> users holding it

    @property
    def pairs(self) -> int:
        """(user, item) pairs held."""
        return sum(len(held) for held in self._held.values())

    def add(self, rows: np.ndarray, vectors: np.ndarray, matches: Matches | None = None) -> None:
        """Items written online: distinct ``rows`` with ``vectors`` (b, d); a row held already is replaced.
        ``matches``: what :meth:`match` gives for them, if already computed (outside the caller's lock)."""
        matches = self.match(rows, vectors) if matches is None else matches
        for row in rows.tolist():
            self.remove(row)
        for user, row, score in zip(*(part.tolist() for part in matches), strict=True):
            self._hold(user, row, score)

    def match(self, rows: np.ndarray, vectors: np.ndarray) -> Matches:
        """The (users, rows, scores) of the pairs whose exact score reaches the user's floor: what :meth:`add`
        files. It reads only what is fixed at construction, so it may run beside requests and other writes."""
        vectors = np.asarray(vectors, dtype=np.float32)
        found = [NO_MATCHES]
        for lo in range(0, len(rows), ITEM_BLOCK):
            self._match(rows[lo : lo + ITEM_BLOCK], np.ascontiguousarray(vectors[lo : lo + ITEM_BLOCK]), found)
        return tuple(np.concatenate(part) for part in zip(*found, strict=True))

    def _match(self, rows: np.ndarray, vectors: np.ndarray, found: list[Matches]) -> None:
        margin = product_error(vectors.shape[1]) * np.linalg.norm(vectors, axis=1)
        items = torch.from_numpy(vectors)
        for lo in range(0, len(self._users), USER_BLOCK):
            hi = min(lo + USER_BLOCK, len(self._users))
            with torch.no_grad():
                product = self._user_tensor[lo:hi] @ items.T
                # Most users' floors are above every item of a write: only the users with some item near theirs are
                # looked at item by item.
                loose = torch.from_numpy(self._floors[lo:hi] - self._user_norms[lo:hi] * float(margin.max()))
                users = lo + (product.amax(dim=1) >= loose).nonzero().squeeze(1).numpy()
            if not len(users):
                continue
            near = product.numpy()[users - lo] >= self._floors[users, None] - self._user_norms[users, None] * margin
            user_at, item_at = np.nonzero(near)
            user_at = users[user_at]
            exact = row_scores(vectors[item_at][:, None, :], self._users[user_at])[:, 0]
            keep = exact >= self._floors[user_at]
            found.append(
                (user_at[keep].astype(np.int64), rows[item_at[keep]].astype(np.int64), exact[keep].astype(np.float32))
            )

    def _hold(self, user: int, row: int, score: float) -> None:
        entry = (-score, row)
        cut = self._cut.get(user)
        if cut is not None and entry > cut:
            return  # past the cut: left out, as every item after it is
        held = self._held.setdefault(user, [])
        bisect.insort(held, entry)
        self._holders.setdefault(row, set()).add(user)
        if len(held) > self._cap:
            dropped = held.pop()
            holders = self._holders[dropped[1]]
            holders.discard(user)
            if not holders:
                del self._holders[dropped[1]]
            self._cut[user] = dropped if cut is None else min(cut, dropped)

    def remove(self, row: int) -> None:
        """An item deleted, or about to be written again."""
        for user in self._holders.pop(row, ()):
            held = self._held[user]
            for position, (_, held_row) in enumerate(held):
                if held_row == row:
                    del held[position]
                    break
            if not held and user not in self._cut:
                del self._held[user]

    def best(self, user: int, k: int, exclude: Set[int]) -> tuple[list[int], list[float]] | None:
        """The user's best k online items (rows, scores) that reach its floor, none of ``exclude``, by score then
        row; None when that needs items past the user's cut."""
        rows: list[int] = []
        scores: list[float] = []
        for negative, row in self._held.get(user, ()):
            if row in exclude:
                continue
            rows.append(row)
            scores.append(-negative)
            if len(rows) == k:
                return rows, scores
        return None if user in self._cut else (rows, scores)
