"""The items each user has interacted with, which recommendations leave out."""

from __future__ import annotations

import numpy as np


class SeenItems:
    """Rows each user interacted with: the artifact's interactions of its training users (train, valid and
    test of the data set) and the interactions recorded online.

    Args:
        interactions: (n, 2) the artifact's (user row, item row) pairs.
        n_users: the artifact's users.
    """

    def __init__(self, interactions: np.ndarray, n_users: int) -> None:
        order = np.argsort(interactions[:, 0], kind="stable")
        # CSR: the items of training user u are training_items[training_ptr[u] : training_ptr[u + 1]]
        self.training_items = interactions[order, 1]
        self.training_ptr = np.searchsorted(interactions[order, 0], np.arange(n_users + 1))
        self.online: dict[str, set[int]] = {}

    def rows(self, user_id: str, user_row: int | None) -> set[int]:
        """Everything ``user_id`` (a training user at ``user_row``, or None) interacted with."""
        rows = set(self.online.get(user_id, ()))
        if user_row is not None:
            rows.update(self.training_items[self.training_ptr[user_row] : self.training_ptr[user_row + 1]].tolist())
        return rows

    def record(self, user_id: str, row: int) -> bool:
        """Record an online interaction; False if the user had interacted with ``row`` online already."""
        seen = self.online.setdefault(user_id, set())
        if row in seen:
            return False
        seen.add(row)
        return True

    def online_count(self, user_id: str) -> int:
        return len(self.online.get(user_id, ()))
