"""What the engine, the consistency check and the API's ``/info`` use of an item index, whatever its kind."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np


class ItemIndex(Protocol):
    """Live items (engine rows) and their vectors, searched by inner product."""

    kind: str
    params: dict  # the kind's effective parameters, calibration's outcome included (GET /info)
    build_seconds: float

    @property
    def ntotal(self) -> int:
        """Live items."""

    @property
    def dead_slots(self) -> int:
        """Vectors of deleted or replaced items still held until the next build."""

    @property
    def bounded_search(self) -> bool:
        """Whether a search costs well under a millisecond whatever the catalogue size."""

    def __contains__(self, row: int) -> bool: ...

    def search(self, query: np.ndarray, k: int, exclude: Iterable[int] = ()) -> list[tuple[int, float]]:
        """Top-k (row, inner product) among live rows not in ``exclude``, by score then row."""

    def probe_lists(self, queries: np.ndarray) -> np.ndarray | None:
        """For a kind that scans lists (ivf): the lists a search of each query scans; None for the others."""

    def add(self, row: int, vector: np.ndarray) -> None:
        """Add ``row`` (replacing its vector if it is there)."""

    def remove(self, row: int) -> bool:
        """Remove ``row``; False if it is not there."""

    def rows(self) -> np.ndarray:
        """The row of every live vector (a row twice would be a bug)."""

    def vector(self, row: int) -> np.ndarray:
        """The vector held for ``row`` (KeyError if it is not live)."""

    def problems(self) -> list[str]:
        """Disagreements between FAISS and the index's bookkeeping (empty when consistent)."""
