"""Which item id sits at which row, and which user at which row of the artifact's user embeddings.

Training items keep their artifact rows, online items get the rows Redis allocates, and rows are never
reused, so a row names one item for good.
"""

from __future__ import annotations

from collections.abc import Mapping

from service.request_errors import NotFound


class RowConflict(RuntimeError):
    """Redis assigns an online item a row that is a training row of another item in this artifact."""


class Catalog:
    """Item ids and rows: the live items, every item ever served (deleted ones included) and the training
    items; and the training users' rows.

    Args:
        item_ids: the artifact's items, by row.
        user_ids: the artifact's users, by row.
    """

    def __init__(self, item_ids: list[str], user_ids: list[str]) -> None:
        self.user_rows = {u: i for i, u in enumerate(user_ids)}
        self._training_ids = item_ids
        self._training_rows = {it: i for i, it in enumerate(item_ids)}
        self.item_rows = dict(self._training_rows)  # live items
        # Row of every item ever served, deleted ones included, so that an interaction still excludes its
        # item if that item is deleted and added again later.
        self.known_rows = dict(self._training_rows)
        self.row_items: dict[int, str] = dict(enumerate(item_ids))

    def has_item(self, item_id: str) -> bool:
        return item_id in self.item_rows

    def training_row(self, item_id: str) -> int | None:
        """Row of a training item (also after it was deleted), else None."""
        return self._training_rows.get(item_id)

    def is_training_row(self, row: int) -> bool:
        return row < len(self._training_ids)

    def item_row(self, item_id: str) -> int:
        try:
            return self.item_rows[item_id]
        except KeyError:
            raise NotFound(f"unknown item {item_id!r}") from None

    def ids(self, rows: list[int]) -> list[str]:
        return [self.row_items[r] for r in rows]

    def row_for(self, item_id: str, row: int) -> int:
        """The row ``item_id`` is served at when Redis holds it at ``row``: a training item of this artifact
        always keeps its training row (an id stored online against an older artifact may be a training item
        of this one). Raises RowConflict if ``row`` is another item's training row."""
        row = self._training_rows.get(item_id, row)
        if self.is_training_row(row) and self._training_ids[row] != item_id:
            raise RowConflict(f"item {item_id!r}: row {row} is the training row of {self._training_ids[row]!r}")
        return row

    def place(self, item_id: str, row: int) -> None:
        """Serve ``item_id`` at ``row`` (instead of a row it was live at)."""
        old = self.item_rows.get(item_id)
        if old is not None and old != row:
            self.row_items.pop(old, None)
        self.item_rows[item_id] = row
        self.known_rows[item_id] = row
        self.row_items[row] = item_id

    def remove(self, item_id: str) -> int | None:
        """Stop serving ``item_id``; returns the row it was live at, None if it was not."""
        row = self.item_rows.pop(item_id, None)
        if row is not None:
            self.row_items.pop(row, None)
        return row

    def remember_online_rows(self, rows: Mapping[str, int]) -> None:
        """Rows Redis allocated to online ids (deleted ones too, for their interactions); a training item
        keeps its training row."""
        self.known_rows.update({i: r for i, r in rows.items() if i not in self._training_rows})
