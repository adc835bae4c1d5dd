"""BPR triple sampling: every training interaction once per epoch with a freshly drawn negative (or the
hardest of several, dynamic negative sampling)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


class BPRSampler:
    """Yields shuffled (users, positive items, negative items) batches; negatives are resampled every
    epoch, uniformly over the items the user has not interacted with in training.

    Args:
        train_pairs: (n, 2) int64 (user, item) pairs.
        n_items: number of items.
        batch_size: triples per batch.
        seed: seed of the generator (the sequence of epochs is reproducible).
    """

    def __init__(self, train_pairs: np.ndarray, n_items: int, batch_size: int = 3000, seed: int = 0):
        self.pairs = np.asarray(train_pairs, dtype=np.int64)
        self.n_items = n_items
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self._seen_keys = np.unique(self.pairs[:, 0] * n_items + self.pairs[:, 1])
        max_degree = np.bincount(self.pairs[:, 0]).max()
        if max_degree >= n_items:
            raise ValueError("a user has interacted with every item: no negative can be sampled")

    def __len__(self) -> int:
        return -(-len(self.pairs) // self.batch_size)

    def _is_seen(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + items
        pos = np.searchsorted(self._seen_keys, keys).clip(max=len(self._seen_keys) - 1)
        return self._seen_keys[pos] == keys

    def sample_negatives(self, users: np.ndarray) -> np.ndarray:
        negatives = self.rng.integers(0, self.n_items, size=len(users))
        redo = self._is_seen(users, negatives)
        while redo.any():  # rejection sampling; converges fast because users see few items
            negatives[redo] = self.rng.integers(0, self.n_items, size=int(redo.sum()))
            redo[redo] = self._is_seen(users[redo], negatives[redo])
        return negatives

    def epoch(
        self, candidates: int = 1, hardest: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One pass over the training interactions in shuffled batches.

        Args:
            candidates: negatives drawn per interaction; with more than one, ``hardest(users, items)`` (items
                (n, candidates)) returns the column of the one to use for each row (dynamic negative sampling:
                the candidate the model scores highest).
        """
        if candidates > 1 and hardest is None:
            raise ValueError("several negative candidates need a rule to choose among them")
        order = self.rng.permutation(len(self.pairs))
        users, positives = self.pairs[order, 0], self.pairs[order, 1]
        if candidates == 1:
            negatives = self.sample_negatives(users)
        else:
            drawn = self.sample_negatives(np.repeat(users, candidates)).reshape(len(users), candidates)
            negatives = drawn[np.arange(len(users)), hardest(users, drawn)]
        for start in range(0, len(order), self.batch_size):
            batch = slice(start, start + self.batch_size)
            yield users[batch], positives[batch], negatives[batch]
