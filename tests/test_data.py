"""Tests for the MMRec loader/saver in training.data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import DataError, RecData, load_mmrec, random_user_split, save_mmrec

TIKTOK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiktok"


def write_dir(
    root: Path,
    rows: list[tuple] | str,
    header: str = "userID\titemID\tx_label",
    feats: dict[str, np.ndarray] | None = None,
    name: str = "toy",
) -> Path:
    """Write a small MMRec directory; ``rows`` are tuples (joined by tabs) or raw body text."""
    root.mkdir(parents=True, exist_ok=True)
    body = rows if isinstance(rows, str) else "".join("\t".join(map(str, r)) + "\n" for r in rows)
    (root / f"{name}.inter").write_text(header + "\n" + body)
    if feats is None:
        feats = {"image": np.arange(20, dtype=np.float32).reshape(5, 4)}
    for modality, arr in feats.items():
        np.save(root / f"{modality}_feat.npy", arr)
    return root


# Two users, five items: user 0 and 1 each have train, valid and test interactions.
GOOD_ROWS = [(0, 0, 0), (0, 1, 0), (0, 2, 1), (0, 3, 2), (1, 1, 0), (1, 4, 0), (1, 0, 1), (1, 2, 2)]


def test_load_small_directory(tmp_path):
    d = load_mmrec(
        write_dir(
            tmp_path / "ok",
            GOOD_ROWS,
            feats={
                "text": np.ones((5, 3), dtype=np.float64),
                "image": np.zeros((5, 2), dtype=np.float16),
            },
        )
    )
    assert d.name == "toy"
    assert (d.n_users, d.n_items) == (2, 5)
    assert d.train.tolist() == [[0, 0], [0, 1], [1, 1], [1, 4]]
    assert d.valid.tolist() == [[0, 2], [1, 0]]
    assert d.test.tolist() == [[0, 3], [1, 2]]
    assert all(a.dtype == np.int64 and a.shape[1] == 2 for a in (d.train, d.valid, d.test))
    assert list(d.features) == ["image", "text"]
    assert all(a.dtype == np.float32 for a in d.features.values())
    assert d.modality_dims == {"image": 2, "text": 3}


def test_extra_columns_and_crlf_are_accepted(tmp_path):
    body = "".join(f"{u}\t{i}\t4.5\t{lab}\t1600000000\r\n" for u, i, lab in GOOD_ROWS)
    d = load_mmrec(write_dir(tmp_path / "x", body, header="userID\titemID\trating\tx_label\ttimestamp"))
    assert len(d.train) == 4 and len(d.valid) == 2 and len(d.test) == 2


def test_tiktok_loads_with_published_counts():
    if not TIKTOK.is_dir():
        pytest.skip(f"{TIKTOK} not available")
    d = load_mmrec(TIKTOK, cold_users="keep")
    assert d.name == "tiktok"
    assert (d.n_users, d.n_items) == (9308, 6710)
    assert (len(d.train), len(d.valid), len(d.test)) == (59541, 3051, 6130)
    assert d.modality_dims == {"audio": 128, "image": 128}
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in d.features.values())
    pairs = np.concatenate([d.train, d.valid, d.test])
    assert len(np.unique(pairs, axis=0)) == len(pairs)


def test_tiktok_cold_users_error_by_default_and_drop():
    """The published split has 5 valid and 5 test users with no train interaction."""
    if not TIKTOK.is_dir():
        pytest.skip(f"{TIKTOK} not available")
    with pytest.raises(DataError, match=r"tiktok\.inter: 5 valid user\(s\) have no train.*user 288"):
        load_mmrec(TIKTOK)
    d = load_mmrec(TIKTOK, cold_users="drop")
    assert (len(d.train), len(d.valid), len(d.test)) == (59541, 3046, 6125)
    train_users = set(d.train[:, 0].tolist())
    assert set(d.valid[:, 0].tolist()) <= train_users and set(d.test[:, 0].tolist()) <= train_users


# ----------------------------------------------------------------------------------------- errors


def _expect(path: Path, *fragments: str) -> None:
    with pytest.raises(DataError) as info:
        load_mmrec(path)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_missing_directory(tmp_path):
    _expect(tmp_path / "nope", "nope", "does not exist")


def test_no_inter_file(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    np.save(root / "image_feat.npy", np.zeros((3, 2), np.float32))
    _expect(root, "empty", "no *.inter")


def test_several_inter_files(tmp_path):
    root = write_dir(tmp_path / "two", GOOD_ROWS)
    (root / "other.inter").write_text("userID\titemID\n0\t0\n")
    _expect(root, "several", "other.inter", "toy.inter")


def test_no_feature_files(tmp_path):
    _expect(write_dir(tmp_path / "nofeat", GOOD_ROWS, feats={}), "nofeat", "no <modality>_feat.npy")


def test_empty_inter_file(tmp_path):
    root = write_dir(tmp_path / "e", GOOD_ROWS)
    (root / "toy.inter").write_text("")
    _expect(root, "toy.inter", "empty file")


def test_missing_required_column(tmp_path):
    _expect(write_dir(tmp_path / "m", [(0, 0), (1, 1)], header="userID\titem"), "toy.inter", "itemID")


def test_space_separated_header_is_reported(tmp_path):
    _expect(write_dir(tmp_path / "s", "0 0 0\n", header="userID itemID x_label"), "toy.inter", "userID")


@pytest.mark.parametrize("bad", ["1.5", "abc", ""])
def test_non_integer_id(tmp_path, bad):
    rows = [*GOOD_ROWS, (1, bad, 0)]
    _expect(write_dir(tmp_path / "n", rows), "toy.inter", "non-integer", "itemID", "line 10")


def test_negative_id(tmp_path):
    rows = [*GOOD_ROWS, (-3, 0, 0)]
    _expect(write_dir(tmp_path / "neg", rows), "toy.inter", "negative userID", "-3")


def test_ragged_row(tmp_path):
    body = "0\t0\t0\n0\t1\n"
    _expect(write_dir(tmp_path / "r", body), "toy.inter", "line 3")


def test_bad_x_label(tmp_path):
    rows = [*GOOD_ROWS, (1, 3, 3), (0, 4, -1)]
    _expect(write_dir(tmp_path / "lab", rows), "toy.inter", "2 x_label value(s) outside", "e.g. 3")


def test_item_id_out_of_range(tmp_path):
    rows = [*GOOD_ROWS, (1, 7, 0)]
    _expect(write_dir(tmp_path / "oor", rows), "toy.inter", "out of range", "item 7", "5 rows")


def test_feature_row_count_mismatch(tmp_path):
    feats = {"image": np.zeros((5, 2), np.float32), "audio": np.zeros((6, 2), np.float32)}
    _expect(write_dir(tmp_path / "rc", GOOD_ROWS, feats=feats), "audio_feat.npy: 6", "image_feat.npy: 5")


def test_feature_not_2d(tmp_path):
    feats = {"image": np.zeros(5, np.float32)}
    _expect(write_dir(tmp_path / "1d", GOOD_ROWS, feats=feats), "image_feat.npy", "2-D", "(5,)")


def test_feature_not_numeric(tmp_path):
    feats = {"image": np.array([["a", "b"]] * 5)}
    _expect(write_dir(tmp_path / "str", GOOD_ROWS, feats=feats), "image_feat.npy", "numeric")


def test_feature_object_array_is_not_unpickled(tmp_path):
    root = write_dir(tmp_path / "obj", GOOD_ROWS)
    np.save(root / "image_feat.npy", np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True)
    _expect(root, "image_feat.npy")


def test_feature_not_npy(tmp_path):
    root = write_dir(tmp_path / "junk", GOOD_ROWS)
    (root / "image_feat.npy").write_bytes(b"not an npy file")
    _expect(root, "image_feat.npy")


def test_feature_nan_inf(tmp_path):
    arr = np.ones((5, 3), np.float32)
    arr[1, 2] = np.nan
    arr[3, 0] = np.inf
    arr[3, 1] = np.nan
    _expect(write_dir(tmp_path / "nan", GOOD_ROWS, feats={"image": arr}), "image_feat.npy", "2 of 5 row(s)")


def test_duplicate_pairs(tmp_path):
    rows = [*GOOD_ROWS, (1, 4, 2), (0, 0, 1)]
    _expect(write_dir(tmp_path / "dup", rows), "toy.inter", "2 duplicate", "user 0 item 0")


@pytest.mark.parametrize("label,split", [(0, "train"), (1, "valid"), (2, "test")])
def test_empty_split(tmp_path, label, split):
    rows = [r for r in GOOD_ROWS if r[2] != label]
    if label == 0:
        _expect(write_dir(tmp_path / "e", rows), "toy.inter", "valid user(s) have no train")
        with pytest.raises(DataError, match=r"toy\.inter: the train split is empty"):
            load_mmrec(tmp_path / "e", cold_users="keep")
    else:
        _expect(write_dir(tmp_path / "e", rows), "toy.inter", f"the {split} split is empty")


def test_cold_users(tmp_path):
    rows = [*GOOD_ROWS, (2, 3, 2), (3, 4, 2), (3, 0, 1)]
    root = write_dir(tmp_path / "cold", rows)
    with pytest.raises(DataError, match=r"toy\.inter: 1 valid user\(s\) have no train.*user 3"):
        load_mmrec(root)
    kept = load_mmrec(root, cold_users="keep")
    assert (kept.n_users, len(kept.valid), len(kept.test)) == (4, 3, 4)
    dropped = load_mmrec(root, cold_users="drop")
    assert (dropped.n_users, len(dropped.valid), len(dropped.test)) == (4, 2, 2)
    with pytest.raises(ValueError, match="cold_users"):
        load_mmrec(root, cold_users="ignore")  # type: ignore[arg-type]


def test_cold_users_test_only(tmp_path):
    rows = [*GOOD_ROWS, (2, 3, 2), (3, 4, 2)]
    _expect(write_dir(tmp_path / "cold", rows), "toy.inter", "2 test user(s)", "user 2")


# ----------------------------------------------------------------------------------- random split


def _random_rows(n_users: int = 300, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(n_users):
        n = 1 if u % 50 == 0 else int(rng.integers(2, 40))
        for i in rng.choice(400, size=n, replace=False):
            lines.append(f"{u}\t{i}\t5\t{rng.integers(10**9)}\n")
    return "".join(lines)


def test_random_split_without_x_label(tmp_path):
    feats = {"image": np.zeros((400, 2), np.float32)}
    root = write_dir(tmp_path / "r", _random_rows(), header="userID\titemID\trating\ttimestamp", feats=feats)
    a = load_mmrec(root)
    b = load_mmrec(root)
    c = load_mmrec(root, split_seed=7)
    for name in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.test, c.test)

    total = len(a.train) + len(a.valid) + len(a.test)
    assert abs(len(a.train) / total - 0.8) < 0.03
    assert abs(len(a.valid) / total - 0.1) < 0.02
    assert abs(len(a.test) / total - 0.1) < 0.02
    train_users = set(a.train[:, 0].tolist())
    assert train_users == set(range(300))  # every user keeps a train interaction
    assert set(a.valid[:, 0].tolist()) <= train_users and set(a.test[:, 0].tolist()) <= train_users
    pairs = np.concatenate([a.train, a.valid, a.test])
    assert len(np.unique(pairs, axis=0)) == len(pairs)
    # single-interaction users stay in train
    assert all(u in train_users and u not in set(a.test[:, 0].tolist()) for u in range(0, 300, 50))

    d = load_mmrec(root, split_ratios=(0.6, 0.2, 0.2))
    assert abs(len(d.test) / total - 0.2) < 0.03
    with pytest.raises(ValueError, match="split_ratios"):
        load_mmrec(root, split_ratios=(0.5, 0.2, 0.2))


def test_random_user_split_small_users():
    users = np.repeat(np.arange(1000), 2)
    labels = random_user_split(users, np.random.default_rng(0))
    per_user_train = np.bincount(users[labels == 0], minlength=1000)
    assert per_user_train.min() >= 1
    assert 0.05 < (labels == 2).mean() < 0.15  # stochastic rounding keeps the expected share


# ------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    feats = {
        "image": np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32),
        "audio": np.random.default_rng(1).standard_normal((5, 2)).astype(np.float32),
    }
    d = load_mmrec(write_dir(tmp_path / "src", GOOD_ROWS, feats=feats))
    save_mmrec(d, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "audio_feat.npy",
        "image_feat.npy",
        "toy.inter",
    ]
    assert (tmp_path / "out" / "toy.inter").read_text().splitlines()[0] == "userID\titemID\tx_label"
    e = load_mmrec(tmp_path / "out")
    _assert_same(d, e)
    save_mmrec(e, tmp_path / "out")  # overwriting its own files is fine
    _assert_same(d, load_mmrec(tmp_path / "out"))


def test_save_refuses_directory_with_other_data(tmp_path):
    d = load_mmrec(write_dir(tmp_path / "src", GOOD_ROWS))
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "other.inter").write_text("userID\titemID\n")
    with pytest.raises(DataError, match=r"other\.inter"):
        save_mmrec(d, tmp_path / "dst")


def _assert_same(a: RecData, b: RecData) -> None:
    assert (a.name, a.n_users, a.n_items) == (b.name, b.n_users, b.n_items)
    for name in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.user_ids, a.item_ids) == (b.user_ids, b.item_ids)
    assert list(a.features) == list(b.features)
    for m in a.features:
        np.testing.assert_array_equal(a.features[m], b.features[m])
        assert b.features[m].dtype == np.float32


# ----------------------------------------------------------------------------------------- id files

USER_IDS = ["alice", "1"]
ITEM_IDS = ["i0", "i1", "i2", "i3", "i4"]


def write_ids(root: Path, name: str, ids: list[str] | str) -> Path:
    """Write an id file: a list one id per line, or raw text."""
    (root / name).write_text(ids if isinstance(ids, str) else "".join(f"{i}\n" for i in ids))
    return root


def test_without_id_files_the_ids_are_the_row_numbers(tmp_path):
    d = load_mmrec(write_dir(tmp_path / "d", GOOD_ROWS))
    assert (d.user_ids, d.item_ids) == (None, None)
    assert d.user_id_list() == ["0", "1"]
    assert d.item_id_list() == ["0", "1", "2", "3", "4"]


def test_id_files_are_read_row_by_row(tmp_path):
    root = write_ids(write_ids(write_dir(tmp_path / "d", GOOD_ROWS), "user_ids.txt", "alice\r\n1\r\n"),
                     "item_ids.txt", ITEM_IDS)  # fmt: skip
    d = load_mmrec(root)
    assert (d.user_ids, d.item_ids) == (USER_IDS, ITEM_IDS)
    assert d.user_id_list() == USER_IDS


def test_only_one_id_file_is_fine(tmp_path):
    d = load_mmrec(write_ids(write_dir(tmp_path / "d", GOOD_ROWS), "item_ids.txt", ITEM_IDS))
    assert (d.user_ids, d.item_ids) == (None, ITEM_IDS)
    assert d.user_id_list() == ["0", "1"]


def test_id_files_round_trip(tmp_path):
    d = load_mmrec(write_dir(tmp_path / "src", GOOD_ROWS))
    with_ids = RecData(d.name, d.n_users, d.n_items, d.train, d.valid, d.test, d.features, USER_IDS, ITEM_IDS)
    save_mmrec(with_ids, tmp_path / "out")
    assert (tmp_path / "out" / "user_ids.txt").read_text() == "alice\n1\n"
    assert (tmp_path / "out" / "item_ids.txt").read_text().splitlines() == ITEM_IDS
    _assert_same(with_ids, load_mmrec(tmp_path / "out"))


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("user_ids.txt", "alice\n", "1 line(s), expected 2: one id per user row (the largest userID in toy.inter"),
        ("user_ids.txt", "alice\n1\n\n", "3 line(s), expected 2"),
        ("item_ids.txt", "i0\ni1\n", "2 line(s), expected 5: one id per item row (image_feat.npy has 5 rows)"),
        ("user_ids.txt", "alice\n\n", "line 2: id '' is empty"),
        ("user_ids.txt", "alice\n bob\n", "line 2: id ' bob' has whitespace at its start or end"),
        ("user_ids.txt", "a\tb\nc\n", "line 1: id 'a\\tb' holds a tab or a line break"),
        ("item_ids.txt", "i0\ni1\ni2\ni1\ni4\n", "id 'i1' appears twice, at lines 2 and 4"),
    ],
)
def test_bad_id_files_are_rejected_naming_the_file(tmp_path, name, text, problem):
    root = write_ids(write_dir(tmp_path / "d", GOOD_ROWS), name, text)
    _expect(root, f"{name}: {problem}")


def test_rec_data_refuses_ids_that_do_not_fit_its_rows(tmp_path):
    d = load_mmrec(write_dir(tmp_path / "d", GOOD_ROWS))
    with pytest.raises(DataError, match=r"item_ids: 4 id\(s\), expected 5"):
        RecData(d.name, d.n_users, d.n_items, d.train, d.valid, d.test, d.features, item_ids=ITEM_IDS[:4])
    with pytest.raises(DataError, match=r"user_ids: id 'x' appears twice, at lines 1 and 2"):
        RecData(d.name, d.n_users, d.n_items, d.train, d.valid, d.test, d.features, user_ids=["x", "x"])


def test_save_refuses_an_id_file_the_data_does_not_have(tmp_path):
    """A user_ids.txt left in the directory would give the saved data other ids on loading."""
    d = load_mmrec(write_dir(tmp_path / "src", GOOD_ROWS))
    out = tmp_path / "out"
    out.mkdir()
    write_ids(out, "user_ids.txt", USER_IDS)
    with pytest.raises(DataError, match=r"already holds other data files \(user_ids\.txt\)"):
        save_mmrec(d, out)


def test_save_refuses_user_ids_with_trailing_users_without_interactions(tmp_path):
    """The loader counts user rows up to the largest userID, so the id file would not fit on loading."""
    d = load_mmrec(write_dir(tmp_path / "src", GOOD_ROWS))
    three = RecData(d.name, 3, d.n_items, d.train, d.valid, d.test, d.features, [*USER_IDS, "carol"])
    with pytest.raises(DataError, match="3 user rows but the last user with an interaction is row 1"):
        save_mmrec(three, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cold_item_split_keeps_the_ids_of_its_rows(tiny_data: RecData):
    from training.coldstart import cold_item_split

    users, items = [f"u{u}" for u in range(tiny_data.n_users)], [f"i{i}" for i in range(tiny_data.n_items)]
    d = RecData(*(getattr(tiny_data, f) for f in ("name", "n_users", "n_items", "train", "valid", "test", "features")),
                user_ids=users, item_ids=items)  # fmt: skip
    split = cold_item_split(d, ratio=0.2, seed=0)
    assert split.warm.user_ids == users
    assert split.warm.item_ids == [items[i] for i in split.warm_items]
