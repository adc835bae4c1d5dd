"""Merge the service's online interactions into an MMRec data set, for the next training run.

``python -m service export-interactions`` writes the interactions recorded through POST /interactions as
tab-separated ``userID itemID timestamp`` rows under the service's ids: a training user or item is known by
its id in the artifact's catalog, which training.export takes from the data set (``user_ids.txt``,
``item_ids.txt``, else the row numbers). :func:`merge_online` maps those ids back to rows and appends the
interactions to the train split:

* a user id of the data joins that user's rows; any other user id becomes a new user row, its id kept in
  ``user_ids``, so the retrained artifact serves that user under the same id;
* an item id that is not an item of the data is left out: the item was posted online, and its features live
  only in the service's Redis, so training has nothing to build it from;
* a pair the data holds already (in any split), or that the file repeats, is left out.

The merged directory always states its split (x_label) and its ids, so it trains on exactly the split of the
source data even when the source split at random on loading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import INTER_SUFFIX, LABEL_COLUMN, DataError, RecData, load_mmrec, save_mmrec

log = logging.getLogger("training")

USER_COLUMN, ITEM_COLUMN = "userID", "itemID"


@dataclass(frozen=True)
class MergeResult:
    """The merged data set and what became of each online interaction."""

    data: RecData
    read: int  # interactions in the file
    merged: int  # appended to the train split
    new_users: int  # user rows added for user ids the data did not have
    unknown_items: int  # left out: item not in the data (posted online)
    duplicates: int  # left out: pair already in the data, or repeated in the file

    def summary(self, out: str | Path) -> str:
        return (
            f"merged {self.merged} of {self.read} online interactions into {out} ({self.new_users} new user(s)); "
            f"left out: {self.unknown_items} with an item not in the data (posted online), "
            f"{self.duplicates} already in the data"
        )


def read_online_interactions(path: str | Path) -> list[tuple[str, str]]:
    """(user id, item id) pairs of an ``export-interactions`` file, in file order.

    The header must name the tab-separated columns ``userID`` and ``itemID``; other columns (the timestamp)
    are ignored. Raises :class:`DataError` naming the file for anything else: a missing file, another
    header, a row with the wrong number of fields or an empty id."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read online interactions: {exc}") from exc
    header = [c.strip() for c in lines[0].split("\t")] if lines else []
    if USER_COLUMN not in header or ITEM_COLUMN not in header:
        raise DataError(
            f"{path}: expected a tab-separated header with columns {USER_COLUMN} and {ITEM_COLUMN} (as written by "
            f"python -m service export-interactions), got {header or 'an empty file'}"
        )
    u_col, i_col = header.index(USER_COLUMN), header.index(ITEM_COLUMN)
    pairs = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != len(header):
            raise DataError(f"{path}: line {number} has {len(fields)} tab-separated field(s), the header {len(header)}")
        for column, value in ((USER_COLUMN, fields[u_col]), (ITEM_COLUMN, fields[i_col])):
            if not value:
                raise DataError(f"{path}: line {number}: empty {column}")
        pairs.append((fields[u_col], fields[i_col]))
    return pairs


def merge_online(data: RecData, interactions: list[tuple[str, str]]) -> MergeResult:
    """``data`` with ``interactions`` (user id, item id) appended to its train split (rules: module docstring).

    The merged data set states its ids explicitly (``user_ids``, ``item_ids``); valid and test are unchanged."""
    user_row = {uid: row for row, uid in enumerate(data.user_id_list())}
    item_row = {iid: row for row, iid in enumerate(data.item_id_list())}
    new_user_ids: list[str] = []
    rows: list[tuple[int, int]] = []
    for user, item in interactions:
        if item not in item_row:
            continue
        if user not in user_row:  # a user the data does not know: a new row, after the existing ones
            user_row[user] = len(user_row)
            new_user_ids.append(user)
        rows.append((user_row[user], item_row[item]))
    candidates = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    added = candidates[_first_new_pairs(data, candidates)]
    merged = RecData(
        name=data.name,
        n_users=data.n_users + len(new_user_ids),
        n_items=data.n_items,
        train=np.ascontiguousarray(np.concatenate([data.train, added])),
        valid=data.valid,
        test=data.test,
        features=data.features,
        user_ids=[*data.user_id_list(), *new_user_ids],
        item_ids=data.item_id_list(),
    )
    return MergeResult(
        data=merged,
        read=len(interactions),
        merged=len(added),
        new_users=len(new_user_ids),
        unknown_items=len(interactions) - len(candidates),
        duplicates=len(candidates) - len(added),
    )


def _first_new_pairs(data: RecData, pairs: np.ndarray) -> np.ndarray:
    """Mask of the (user row, item row) ``pairs`` that are in no split of ``data`` and not repeated earlier
    in ``pairs`` itself. A new user's first pair is always kept, so every new user row has an interaction."""
    existing = np.concatenate([data.train, data.valid, data.test])
    keys = pairs[:, 0] * data.n_items + pairs[:, 1]
    first = np.zeros(len(keys), dtype=bool)
    first[np.unique(keys, return_index=True)[1]] = True
    return first & ~np.isin(keys, existing[:, 0] * data.n_items + existing[:, 1])


def check_out_dir(data_dir: Path, out: Path) -> None:
    """Refuse an output directory that would overwrite the source data or files that are not a data set:
    ``out`` must be new, empty, or a data directory (a ``*.inter`` file: e.g. an earlier merge)."""
    if out.exists() and data_dir.exists() and out.resolve() == data_dir.resolve():
        raise DataError(f"{out}: --out is the --data directory; write the merged data to another directory")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not any(p.is_file() for p in out.glob(f"*{INTER_SUFFIX}")):
        raise DataError(f"{out}: --out is neither empty nor a data directory (no *{INTER_SUFFIX} file); use a new one")


def has_split_labels(data_dir: Path) -> bool:
    """Whether the directory's .inter file states the split (an x_label column), read from its header."""
    inter = next(p for p in sorted(data_dir.glob(f"*{INTER_SUFFIX}")) if p.is_file())
    with inter.open(encoding="utf-8-sig") as fh:
        return LABEL_COLUMN in [c.strip() for c in fh.readline().split("\t")]


def merge_online_dir(
    data_dir: str | Path, interactions: str | Path, out: str | Path, *, split_seed: int = 2024
) -> MergeResult:
    """Load ``data_dir``, merge the interactions file into it and write the result to ``out``.

    Valid/test users without train interactions are kept as the source has them (merging changes no split
    but train); ``split_seed`` is the seed of the split drawn when the source has no x_label column, the
    one ``train --data data_dir`` draws with the same ``data.split_seed``."""
    data_dir, out = Path(data_dir), Path(out)
    check_out_dir(data_dir, out)
    data = load_mmrec(data_dir, split_seed=split_seed, cold_users="keep")
    if not has_split_labels(data_dir):
        log.info("%s has no %s column: its split (seed %d) is written explicitly to %s", data_dir, LABEL_COLUMN,
                 split_seed, out)  # fmt: skip
    result = merge_online(data, read_online_interactions(interactions))
    save_mmrec(result.data, out)
    return result
