"""Vectors by integer key, held as one dense array so that a query scores all of them with one product."""

from __future__ import annotations

import numpy as np


class KeyedVectors:
    """Key -> vector, appended, overwritten in place, and removed by moving the last entry into the gap: a
    change costs O(dim), and :meth:`arrays` are views of the live entries, whatever was removed before.

    Args:
        dim: vector length.
    """

    def __init__(self, dim: int) -> None:
        self._keys = np.zeros(0, dtype=np.int64)
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._pos: dict[int, int] = {}  # key -> position in the arrays

    def __len__(self) -> int:
        return len(self._pos)

    def __contains__(self, key: int) -> bool:
        return key in self._pos

    def _reserve(self, size: int) -> None:
        if size > len(self._keys):
            extra = max(size, 2 * len(self._keys), 16) - len(self._keys)
            self._keys = np.concatenate([self._keys, np.zeros(extra, np.int64)])
            self._vectors = np.concatenate([self._vectors, np.zeros((extra, self._vectors.shape[1]), np.float32)])

    def extend(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Append keys not held yet."""
        n, m = len(self._pos), len(keys)
        self._reserve(n + m)
        self._keys[n : n + m] = keys
        self._vectors[n : n + m] = vectors
        self._pos.update(zip(keys.tolist(), range(n, n + m), strict=True))

    def put(self, key: int, vector: np.ndarray) -> None:
        """Overwrite ``key``'s vector, or append it."""
        pos = self._pos.get(key)
        if pos is None:
            self.extend(np.array([key], dtype=np.int64), vector[None])
        else:
            self._vectors[pos] = vector

    def remove(self, key: int) -> None:
        pos = self._pos.pop(key, None)
        if pos is None:
            return
        last = len(self._pos)  # the entry to move into the gap (the count already excludes ``key``)
        if pos != last:
            moved = int(self._keys[last])
            self._keys[pos], self._vectors[pos] = moved, self._vectors[last]
            self._pos[moved] = pos

    def get(self, key: int) -> np.ndarray:
        """A copy of ``key``'s vector (KeyError if it is not held)."""
        return self._vectors[self._pos[key]].copy()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, vectors): views of the live entries."""
        n = len(self._pos)
        return self._keys[:n], self._vectors[:n]

    def consistent(self) -> bool:
        """Whether the position map and the arrays agree."""
        keys, _ = self.arrays()
        positions = np.fromiter(self._pos.values(), dtype=np.int64, count=len(self._pos))
        mapped = np.fromiter(self._pos.keys(), dtype=np.int64, count=len(self._pos))
        return bool(np.array_equal(keys[positions], mapped))
