"""``python -m training merge-online``: the service's online interactions merged into a data set for retraining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.cli import main
from training.data import DataError, RecData, load_mmrec, save_mmrec
from training.merge_online import merge_online, merge_online_dir, read_online_interactions
from training.synthetic import SyntheticConfig, generate_synthetic

TINY = SyntheticConfig(n_users=60, n_items=40, modality_dims={"visual": 8, "acoustic": 8})
HEADER = "userID\titemID\ttimestamp\n"
FEATURES = {"image": np.arange(20, dtype=np.float32).reshape(5, 4)}
# Three users, five items: each user has a train, a valid and a test interaction.
TRAIN, VALID, TEST = [[0, 0], [1, 1], [2, 2]], [[0, 1], [1, 2], [2, 3]], [[0, 2], [1, 3], [2, 4]]


def small_data(user_ids: list[str] | None = None) -> RecData:
    splits = (np.array(s, dtype=np.int64) for s in (TRAIN, VALID, TEST))
    return RecData("toy", 3, 5, *splits, features=FEATURES, user_ids=user_ids)


def write_online(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """An export-interactions file: header, then one (user, item, timestamp) row per pair."""
    path.write_text(HEADER + "".join(f"{u}\t{i}\t{1700000000 + n}.000\n" for n, (u, i) in enumerate(pairs)))
    return path


# Each reason once: merged, new user, duplicates (train, test, repeated in the file), items posted online.
ONLINE = [
    ("0", "3"),  # catalog user, catalog item, a new pair: merged
    ("0", "0"),  # in train: left out
    ("1", "3"),  # in test: left out
    ("alice", "4"),  # a user the data does not know: a new user row
    ("alice", "4"),  # repeated in the file: left out
    ("alice", "1"),  # the new user's second item: merged
    ("bob", "posted-online"),  # item only in Redis: left out, and bob gets no row
    ("2", "posted-online"),
]


def test_merge_counts_each_reason() -> None:
    result = merge_online(small_data(), ONLINE)
    assert (result.read, result.merged, result.new_users, result.unknown_items, result.duplicates) == (8, 3, 1, 2, 3)
    merged = result.data
    assert merged.n_users == 4 and merged.user_ids == ["0", "1", "2", "alice"]
    assert merged.item_ids == ["0", "1", "2", "3", "4"]
    assert merged.train.tolist() == [*TRAIN, [0, 3], [3, 4], [3, 1]]
    assert (merged.valid.tolist(), merged.test.tolist()) == (VALID, TEST)
    assert result.summary("NEW") == (
        "merged 3 of 8 online interactions into NEW (1 new user(s)); "
        "left out: 2 with an item not in the data (posted online), 3 already in the data"
    )


def test_online_ids_are_the_data_ids() -> None:
    """With user_ids.txt the service knew user row 1 as "bob": an online "bob" joins that row, an online "1"
    is somebody else."""
    result = merge_online(small_data(["ann", "bob", "cy"]), [("bob", "4"), ("1", "4")])
    assert result.data.user_ids == ["ann", "bob", "cy", "1"]
    assert result.data.train.tolist()[-2:] == [[1, 4], [3, 4]]


def test_export_format_is_read(tmp_path: Path) -> None:
    path = tmp_path / "online.tsv"
    path.write_text("userID\titemID\ttimestamp\r\nalice\t3\t1.5\r\n\r\n u7 \t item-9\t2\r\n")
    assert read_online_interactions(path) == [("alice", "3"), ("u7", "item-9")]


def test_merged_dir_keeps_a_random_split_and_the_new_users(tmp_path: Path) -> None:
    """A source without x_label splits at random on loading; the merged directory states that split, so
    retraining sees the source's split plus the online train rows."""
    source = tmp_path / "src"
    save_mmrec(generate_synthetic(TINY), source)
    inter = source / "synthetic.inter"
    rows = inter.read_text().splitlines()[1:]
    inter.write_text("userID\titemID\n" + "".join(row.rsplit("\t", 1)[0] + "\n" for row in rows))
    before = load_mmrec(source)
    online = write_online(tmp_path / "online.tsv", [("alice", "4"), ("alice", "1"), ("7", "posted-online")])
    result = merge_online_dir(source, online, tmp_path / "out")
    after = load_mmrec(tmp_path / "out")
    assert (tmp_path / "out" / "synthetic.inter").read_text().startswith("userID\titemID\tx_label\n")
    np.testing.assert_array_equal(after.train[: len(before.train)], before.train)
    assert after.train[len(before.train) :].tolist() == [[TINY.n_users, 4], [TINY.n_users, 1]]
    np.testing.assert_array_equal(after.valid, before.valid)
    np.testing.assert_array_equal(after.test, before.test)
    assert after.user_ids == [*before.user_id_list(), "alice"] and result.new_users == 1
    # Merging again into the same output (an earlier merge's directory) rewrites it.
    merge_online_dir(source, online, tmp_path / "out")
    assert load_mmrec(tmp_path / "out").user_ids == after.user_ids


def test_cli_merges_and_the_result_trains_and_serves_the_new_user(tmp_path: Path, capsys) -> None:
    save_mmrec(generate_synthetic(TINY), tmp_path / "data")
    online = write_online(tmp_path / "online.tsv", [("alice", "3"), ("alice", "7"), ("5", "item-posted-online")])
    assert main(["merge-online", "--data", str(tmp_path / "data"), "--interactions", str(online),
                 "--out", str(tmp_path / "merged")]) == 0  # fmt: skip
    line = capsys.readouterr().out.strip()
    assert line == (
        f"merged 2 of 3 online interactions into {tmp_path / 'merged'} (1 new user(s)); "
        "left out: 1 with an item not in the data (posted online), 0 already in the data"
    )
    art = tmp_path / "art"
    assert main([
        "train", "--data", str(tmp_path / "merged"), "--out", str(art), "--no-progress", "--model", "metammf_mf",
        "--set", "train.epochs=1", "--set", "train.batch_size=256",
        "--set", "model.fused_dim=8", "--set", "model.id_dim=8", "--set", "model.rank=4",
        "--set", "model.extractor_hidden=8",
    ]) == 0  # fmt: skip
    catalog = json.loads((art / "catalog.json").read_text())
    assert catalog["users"] == [*(str(u) for u in range(60)), "alice"]
    assert catalog["items"] == [str(i) for i in range(40)]


# ------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def source(tmp_path: Path) -> Path:
    save_mmrec(small_data(), tmp_path / "src")
    return tmp_path / "src"


def run_merge(capsys, data: Path, interactions: Path, out: Path) -> tuple[int, str]:
    code = main(["merge-online", "--data", str(data), "--interactions", str(interactions), "--out", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "cannot read online interactions"),
        ("", "expected a tab-separated header with columns userID and itemID"),
        ("user\titem\n0\t1\n", "got ['user', 'item']"),
        ("userID itemID timestamp\n0 1 2\n", "expected a tab-separated header"),
        (HEADER + "0\t1\n", "line 2 has 2 tab-separated field(s), the header 3"),
        (HEADER + "0\t1\t2\n\t3\t4\n", "line 3: empty userID"),
        (HEADER + "0\t \t4\n", "line 2: empty itemID"),
    ],
)
def test_bad_interactions_file_exits_2_naming_it(tmp_path: Path, capsys, source: Path, text, problem) -> None:
    online = tmp_path / "online.tsv"
    if text is not None:
        online.write_text(text)
    code, err = run_merge(capsys, source, online, tmp_path / "out")
    assert code == 2
    assert f"error: {online}: " in err and problem in err
    assert not (tmp_path / "out").exists()


def test_out_must_not_be_the_data_or_other_files(tmp_path: Path, capsys, source: Path) -> None:
    online = write_online(tmp_path / "online.tsv", ONLINE)
    code, err = run_merge(capsys, source, online, source)
    assert code == 2 and f"{source}: --out is the --data directory" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, err = run_merge(capsys, source, online, other)
    assert code == 2 and f"{other}: --out is neither empty nor a data directory" in err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_missing_data_dir_exits_2(tmp_path: Path, capsys) -> None:
    online = write_online(tmp_path / "online.tsv", ONLINE)
    code, err = run_merge(capsys, tmp_path / "nope", online, tmp_path / "out")
    assert code == 2 and f"{tmp_path / 'nope'}: data directory does not exist" in err


def test_merge_refuses_a_data_dir_that_fails_to_load(tmp_path: Path, source: Path) -> None:
    (source / "user_ids.txt").write_text("a\na\nb\n")
    with pytest.raises(DataError, match=r"user_ids\.txt: id 'a' appears twice"):
        merge_online_dir(source, write_online(tmp_path / "online.tsv", ONLINE), tmp_path / "out")
