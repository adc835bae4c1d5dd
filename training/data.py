"""Interaction data sets in the MMRec convention, validated on load.

A data directory holds ``<name>.inter`` (tab-separated, header ``userID itemID x_label``,
x_label 0/1/2 = train/valid/test, extra columns allowed) and one ``<modality>_feat.npy`` per
modality (row i = features of item i). Optional ``user_ids.txt`` and ``item_ids.txt`` hold one
external id per line, line r = the id of user (item) row r: the ids the exported artifact serves
them under (training.export). Without them the ids are the row numbers as strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np


class DataError(ValueError):
    """Raised for invalid input data; the message names the file and the problem."""


@dataclass(frozen=True)
class RecData:
    """A user-item interaction data set with per-item multimodal features.

    ``train``/``valid``/``test`` are int64 arrays of shape (n, 2) holding (user, item) index pairs.
    ``features`` maps modality name -> float32 array (n_items, dim), in a fixed (sorted) order.
    ``user_ids``/``item_ids`` are the external ids of the rows (entry r = id of row r), the ids the
    service knows them by; ``None`` means the row numbers as strings. Code that subsets or renumbers
    rows must subset or renumber the ids with them, so a mismatched length is an error here.
    """

    name: str
    n_users: int
    n_items: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)
    user_ids: list[str] | None = None
    item_ids: list[str] | None = None

    def __post_init__(self) -> None:
        if self.user_ids is not None:
            check_ids(self.user_ids, self.n_users, "user_ids", "user")
        if self.item_ids is not None:
            check_ids(self.item_ids, self.n_items, "item_ids", "item")

    def user_id_list(self) -> list[str]:
        """The id of each user row: ``user_ids``, or the row numbers as strings."""
        return list(self.user_ids) if self.user_ids is not None else [str(u) for u in range(self.n_users)]

    def item_id_list(self) -> list[str]:
        """The id of each item row: ``item_ids``, or the row numbers as strings."""
        return list(self.item_ids) if self.item_ids is not None else [str(i) for i in range(self.n_items)]

    @property
    def modality_dims(self) -> dict[str, int]:
        return {name: int(arr.shape[1]) for name, arr in self.features.items()}

    def item_features(self) -> np.ndarray:
        """Concatenated features x_i of all items, modalities in ``features`` order."""
        return np.concatenate([self.features[m] for m in self.features], axis=1).astype(np.float32)


def _id_fault(value: str) -> str | None:
    """Why ``value`` cannot be an external id (None: it can). An id must survive a round trip through a
    file of one id per line and through the service's tab-separated interaction export unchanged."""
    if not value:
        return "is empty"
    if value != value.strip():
        return "has whitespace at its start or end"
    if "\t" in value or len(value.splitlines()) != 1:
        return "holds a tab or a line break"
    return None


def check_ids(ids: list[str], n_rows: int, source: str, kind: str) -> None:
    """Raise :class:`DataError` (message starting with ``source``, e.g. the file name) unless ``ids`` are
    ``n_rows`` distinct usable ids of ``kind`` rows. Positions are reported as 1-based lines."""
    if len(ids) != n_rows:
        raise DataError(f"{source}: {len(ids)} id(s), expected {n_rows}: one per {kind} row, line r+1 = row r")
    for line, value in enumerate(ids, start=1):
        if not isinstance(value, str):
            raise DataError(f"{source}: line {line}: id {value!r} is not a string")
        fault = _id_fault(value)
        if fault:
            raise DataError(f"{source}: line {line}: id {value!r} {fault}")
    if len(set(ids)) != n_rows:
        first: dict[str, int] = {}
        for line, value in enumerate(ids, start=1):
            if value in first:
                raise DataError(f"{source}: id {value!r} appears twice, at lines {first[value]} and {line}")
            first[value] = line


# --------------------------------------------------------------------------------------------------
# Reading and writing the MMRec directory format
# --------------------------------------------------------------------------------------------------

INTER_SUFFIX = ".inter"
FEAT_SUFFIX = "_feat.npy"
REQUIRED_COLUMNS = ("userID", "itemID")
LABEL_COLUMN = "x_label"
SPLIT_NAMES = ("train", "valid", "test")
USER_IDS_FILE = "user_ids.txt"
ITEM_IDS_FILE = "item_ids.txt"


def _check_ratios(split_ratios: tuple[float, float, float]) -> np.ndarray:
    ratios = np.asarray(split_ratios, dtype=np.float64)
    if ratios.shape != (3,) or not np.all(np.isfinite(ratios)) or np.any(ratios < 0):
        raise ValueError(f"split_ratios must be three non-negative numbers, got {split_ratios!r}")
    if ratios[0] <= 0 or not np.isclose(ratios.sum(), 1.0):
        raise ValueError(f"split_ratios must sum to 1 with a positive train share, got {split_ratios!r}")
    return ratios


def random_user_split(
    users: np.ndarray, rng: np.random.Generator, split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> np.ndarray:
    """Assign each interaction a split label 0/1/2 (train/valid/test), independently per user.

    Each user's interactions are shuffled; the user's valid and test counts are ``n * ratio``
    rounded stochastically (so the expected overall shares match ``split_ratios`` even for users
    with few interactions), then reduced so that every user keeps at least one train interaction.
    The result depends only on ``users`` (in order) and the state of ``rng``.
    """
    ratios = _check_ratios(split_ratios)
    users = np.asarray(users, dtype=np.int64)
    n = users.shape[0]
    labels = np.zeros(n, dtype=np.int64)
    if n == 0:
        return labels
    # Random rank of each interaction within its user.
    order = np.lexsort((rng.random(n), users))
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    counts = np.diff(np.r_[starts, n])
    rank_sorted = np.arange(n) - np.repeat(starts, counts)
    # Per-user valid/test counts with stochastic rounding, at least one train interaction kept.
    u = rng.random((counts.shape[0], 2))
    n_valid = np.floor(counts * ratios[1] + u[:, 0]).astype(np.int64)
    n_test = np.floor(counts * ratios[2] + u[:, 1]).astype(np.int64)
    n_test = np.minimum(n_test, counts - 1)
    n_valid = np.minimum(n_valid, counts - 1 - n_test)
    # Positions [0, n_test) -> test, [n_test, n_test + n_valid) -> valid, the rest -> train.
    t = np.repeat(n_test, counts)
    v = np.repeat(n_valid, counts)
    label_sorted = np.where(rank_sorted < t, 2, np.where(rank_sorted < t + v, 1, 0))
    labels[order] = label_sorted
    return labels


def _parse_int_column(values: list[str], column: str, line_numbers: np.ndarray, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(values).astype(np.int64)
    except (ValueError, OverflowError):
        for i, value in enumerate(values):
            try:
                int(value)
            except ValueError:
                raise DataError(
                    f"{path.name}: column {column!r} has a non-integer value {value!r} at line {int(line_numbers[i])}"
                ) from None
        raise DataError(f"{path.name}: column {column!r} has values that are not 64-bit integers") from None
    return arr


def _read_inter(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Parse an .inter file into (users, items, labels or None), validating the values."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name}: cannot read interaction file: {exc}") from exc
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path.name}: empty file, expected a header line with columns userID, itemID")
    header = [c.strip() for c in lines[0].split("\t")]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path.name}: missing required column(s) {', '.join(missing)}; header has {header} "
            "(columns must be tab-separated)"
        )
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise DataError(f"{path.name}: duplicate column name(s) in header: {dupes}")
    n_cols = len(header)
    line_numbers = np.array([i + 1 for i in range(1, len(lines)) if lines[i].strip()], dtype=np.int64)
    rows = [lines[i - 1].split("\t") for i in line_numbers]
    bad = [i for i, row in enumerate(rows) if len(row) != n_cols]
    if bad:
        i = bad[0]
        raise DataError(
            f"{path.name}: {len(bad)} row(s) do not have {n_cols} tab-separated fields like the header; "
            f"first at line {int(line_numbers[i])} with {len(rows[i])} field(s)"
        )

    def column(name: str) -> np.ndarray:
        j = header.index(name)
        return _parse_int_column([row[j].strip() for row in rows], name, line_numbers, path)

    users, items = column("userID"), column("itemID")
    for name, arr in (("userID", users), ("itemID", items)):
        neg = np.flatnonzero(arr < 0)
        if neg.size:
            raise DataError(
                f"{path.name}: {neg.size} negative {name} value(s), e.g. {int(arr[neg[0]])} "
                f"at line {int(line_numbers[neg[0]])}"
            )
    labels = None
    if LABEL_COLUMN in header:
        labels = column(LABEL_COLUMN)
        bad_label = np.flatnonzero((labels < 0) | (labels > 2))
        if bad_label.size:
            raise DataError(
                f"{path.name}: {bad_label.size} x_label value(s) outside {{0, 1, 2}} (train/valid/test), "
                f"e.g. {int(labels[bad_label[0]])} at line {int(line_numbers[bad_label[0]])}"
            )
    return users, items, labels


def _read_features(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle; we never unpickle
        if "pickle" in str(exc):  # numpy's advice to unpickle is wrong here: it may just not be a .npy file
            raise DataError(f"{path.name}: not a .npy file, or an object array (those are never unpickled)") from None
        raise DataError(f"{path.name}: not a plain numeric .npy array ({exc})") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"{path.name}: cannot read feature file: {exc}") from exc
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path.name}: expected a single .npy array, got {type(arr).__name__}")
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{path.name}: features must be numeric (int or float), got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise DataError(f"{path.name}: features must be 2-D (n_items, dim), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise DataError(f"{path.name}: features have zero columns, shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    bad_rows = ~np.isfinite(arr).all(axis=1)
    n_bad = int(bad_rows.sum())
    if n_bad:
        raise DataError(
            f"{path.name}: {n_bad} of {arr.shape[0]} row(s) contain NaN or inf "
            f"(first bad row: item {int(np.flatnonzero(bad_rows)[0])})"
        )
    return arr


def _read_ids(path: Path, n_rows: int, rows_from: str) -> list[str] | None:
    """The ids of an optional id file (None when it is absent), validated against ``n_rows`` rows;
    ``rows_from`` says where that count comes from, for the error message."""
    if not path.exists():
        return None
    try:
        ids = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name}: cannot read id file: {exc}") from exc
    kind = "user" if path.name == USER_IDS_FILE else "item"
    if len(ids) != n_rows:
        raise DataError(
            f"{path.name}: {len(ids)} line(s), expected {n_rows}: one id per {kind} row ({rows_from}); "
            "line r+1 is the id of row r"
        )
    check_ids(ids, n_rows, path.name, kind)
    return ids


def load_mmrec(
    path: str | Path,
    *,
    split_seed: int = 2024,
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    cold_users: Literal["error", "keep", "drop"] = "error",
) -> RecData:
    """Load and validate a data directory in the MMRec convention.

    The directory must hold exactly one ``<name>.inter`` file and at least one
    ``<modality>_feat.npy``; ``user_ids.txt`` and ``item_ids.txt``, when present, must hold one
    distinct id per user row (largest userID + 1 lines) and per item row (feature rows). Without
    an ``x_label`` column each user's interactions are split at random (``split_seed``,
    ``split_ratios``; see :func:`random_user_split`). Raises :class:`DataError` naming the
    offending file for any structural or value problem.

    ``cold_users`` says what to do with valid/test users that have no train interaction:
    ``"error"`` (default) raises, ``"keep"`` keeps them as they are, ``"drop"`` removes their
    valid/test rows. The published TikTok split has 5 such valid and 5 such test users (one
    interaction each), so it loads with its published counts only with ``cold_users="keep"``.
    """
    if cold_users not in ("error", "keep", "drop"):
        raise ValueError(f"cold_users must be 'error', 'keep' or 'drop', got {cold_users!r}")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: data directory does not exist or is not a directory")
    inter_files = sorted(p for p in root.glob(f"*{INTER_SUFFIX}") if p.is_file())
    if not inter_files:
        raise DataError(f"{root}: no *{INTER_SUFFIX} interaction file found")
    if len(inter_files) > 1:
        raise DataError(
            f"{root}: several {INTER_SUFFIX} files found ({', '.join(p.name for p in inter_files)}); "
            "expected exactly one"
        )
    feat_files = sorted(p for p in root.glob(f"*{FEAT_SUFFIX}") if p.is_file())
    feat_files = [p for p in feat_files if p.name[: -len(FEAT_SUFFIX)]]
    if not feat_files:
        raise DataError(f"{root}: no <modality>{FEAT_SUFFIX} feature file found")
    inter_path = inter_files[0]

    users, items, labels = _read_inter(inter_path)

    features = {p.name[: -len(FEAT_SUFFIX)]: _read_features(p) for p in feat_files}
    row_counts = {p.name: features[p.name[: -len(FEAT_SUFFIX)]].shape[0] for p in feat_files}
    if len(set(row_counts.values())) > 1:
        listing = ", ".join(f"{name}: {n}" for name, n in row_counts.items())
        raise DataError(f"{root}: feature files have different row counts ({listing})")
    n_items = next(iter(row_counts.values()))
    first_feat = feat_files[0].name

    if users.size:
        out = np.flatnonzero(items >= n_items)
        if out.size:
            raise DataError(
                f"{inter_path.name}: {out.size} itemID value(s) out of range of the feature rows "
                f"({first_feat} has {n_items} rows), e.g. item {int(items[out[0]])}"
            )
    n_users = int(users.max()) + 1 if users.size else 0
    user_rows = f"the largest userID in {inter_path.name} is {n_users - 1}" if n_users else "no interactions"
    user_ids = _read_ids(root / USER_IDS_FILE, n_users, user_rows)
    item_ids = _read_ids(root / ITEM_IDS_FILE, int(n_items), f"{first_feat} has {n_items} rows")

    # Duplicate (user, item) pairs, regardless of split.
    if users.size:
        order = np.lexsort((items, users))
        su, si = users[order], items[order]
        dup = np.flatnonzero((su[1:] == su[:-1]) & (si[1:] == si[:-1]))
        if dup.size:
            raise DataError(
                f"{inter_path.name}: {dup.size} duplicate (userID, itemID) row(s), "
                f"e.g. user {int(su[dup[0]])} item {int(si[dup[0]])}"
            )

    if labels is None:
        labels = random_user_split(users, np.random.default_rng(split_seed), split_ratios)
    pairs = np.stack([users, items], axis=1).astype(np.int64)
    splits = {name: np.ascontiguousarray(pairs[labels == k]) for k, name in enumerate(SPLIT_NAMES)}
    train_users = np.unique(splits["train"][:, 0])
    if cold_users != "keep":
        for name in ("valid", "test"):
            cold = np.setdiff1d(np.unique(splits[name][:, 0]), train_users, assume_unique=True)
            if cold.size and cold_users == "error":
                raise DataError(
                    f"{inter_path.name}: {cold.size} {name} user(s) have no train interactions, "
                    f"e.g. user {int(cold[0])}: accept them with --set data.cold_users=keep (kept in the "
                    "evaluation) or --set data.cold_users=drop (left out), or data.cold_users in the run config "
                    "(load_mmrec(cold_users=...) in Python)"
                )
            if cold.size:
                splits[name] = np.ascontiguousarray(splits[name][~np.isin(splits[name][:, 0], cold)])
    for name, arr in splits.items():
        if arr.shape[0] == 0:
            raise DataError(f"{inter_path.name}: the {name} split is empty")

    return RecData(
        name=inter_path.stem,
        n_users=n_users,
        n_items=int(n_items),
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        features=dict(sorted(features.items())),
        user_ids=user_ids,
        item_ids=item_ids,
    )


def save_mmrec(data: RecData, path: str | Path) -> None:
    """Write ``data`` as an MMRec directory (``<name>.inter`` with x_label, ``<modality>_feat.npy``,
    and ``user_ids.txt``/``item_ids.txt`` for the ids that are set).

    The directory is created if needed. Files of the same names are overwritten; other ``.inter``
    or ``*_feat.npy`` files already there, or an id file for ids that ``data`` does not set, would
    change what :func:`load_mmrec` reads back, so their presence is an error. So is a user row
    after the last user with an interaction when ``user_ids`` is set: the loader counts user rows
    up to the largest userID, and the id file would not fit.
    """
    root = Path(path)
    if not data.name or "/" in data.name or "\\" in data.name:
        raise DataError(f"cannot save data set with name {data.name!r}: not usable as a file name")
    for modality in data.features:
        if not modality or "/" in modality or "\\" in modality:
            raise DataError(f"cannot save modality {modality!r}: not usable as a file name")
    if not data.features:
        raise DataError(f"cannot save data set {data.name!r}: it has no feature modalities")

    parts = []
    for k, name in enumerate(SPLIT_NAMES):
        arr = np.asarray(getattr(data, name), dtype=np.int64).reshape(-1, 2)
        parts.append(np.column_stack([arr, np.full(arr.shape[0], k, dtype=np.int64)]))
    table = np.concatenate(parts, axis=0)
    last_user = int(table[:, 0].max()) if table.shape[0] else -1
    if data.user_ids is not None and last_user + 1 != data.n_users:
        raise DataError(
            f"cannot save data set {data.name!r} with user_ids: it has {data.n_users} user rows but the last "
            f"user with an interaction is row {last_user}, so {USER_IDS_FILE} would not fit on loading"
        )

    root.mkdir(parents=True, exist_ok=True)
    inter_name = f"{data.name}{INTER_SUFFIX}"
    feat_names = {f"{m}{FEAT_SUFFIX}" for m in data.features}
    ids = {USER_IDS_FILE: data.user_ids, ITEM_IDS_FILE: data.item_ids}
    stray = sorted(
        p.name
        for p in list(root.glob(f"*{INTER_SUFFIX}")) + list(root.glob(f"*{FEAT_SUFFIX}"))
        if p.name != inter_name and p.name not in feat_names
    )
    stray += [name for name, values in ids.items() if values is None and (root / name).exists()]
    if stray:
        raise DataError(f"{root}: already holds other data files ({', '.join(stray)}); use an empty directory")
    with open(root / inter_name, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("userID\titemID\tx_label\n")
        if table.shape[0]:
            np.savetxt(fh, table, fmt="%d", delimiter="\t")
    for modality, arr in data.features.items():
        np.save(root / f"{modality}{FEAT_SUFFIX}", np.asarray(arr, dtype=np.float32), allow_pickle=False)
    for name, values in ids.items():
        if values is not None:
            (root / name).write_text("".join(f"{v}\n" for v in values), encoding="utf-8", newline="\n")
