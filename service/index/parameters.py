"""FAISS ``SearchParameters`` made once per combination of values, not once per query."""

from __future__ import annotations

import faiss


class SearchParameterCache:
    """SearchParameters by (class, filtered, values); a filtered one carries the current live-slot selector."""

    KEPT = 64  # combinations kept before the cache starts again

    def __init__(self) -> None:
        self._made: dict[tuple, faiss.SearchParameters] = {}
        self._selector: faiss.IDSelectorBitmap | None = None

    def use_selector(self, selector: faiss.IDSelectorBitmap) -> None:
        """Filter with ``selector`` from now on (parameters holding another one are dropped)."""
        if selector is not self._selector:
            self._selector = selector
            self.clear()

    def get(self, kind: type[faiss.SearchParameters], values: dict, filtered: bool) -> faiss.SearchParameters:
        key = (kind, filtered, *values.values())
        params = self._made.get(key)
        if params is None:
            params = kind(**values)
            if filtered:
                params.sel = self._selector
            if len(self._made) > self.KEPT:
                self._made.clear()
            self._made[key] = params
        return params

    def clear(self) -> None:
        self._made = {}
