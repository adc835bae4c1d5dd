"""Tests for the full-ranking evaluator against a brute-force reference."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from training.evaluate import EvalResult, full_rank_evaluate, topk_items

N_USERS, N_ITEMS = 50, 80


def _score_fn(scores: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    table = torch.from_numpy(scores)

    def fn(users: torch.Tensor) -> torch.Tensor:
        assert users.dtype == torch.int64 and users.ndim == 1
        return table[users]

    return fn


def _random_scores(rng: np.random.Generator, n_users: int = N_USERS, n_items: int = N_ITEMS) -> np.ndarray:
    """Tie-free scores: each row is a random permutation of 0..n_items-1 (as float32)."""
    return np.stack([rng.permutation(n_items) for _ in range(n_users)]).astype(np.float32)


def _random_splits(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train/valid/test pairs; some users get no valid/test items at all."""
    train, valid, test = [], [], []
    for u in range(N_USERS):
        items = rng.permutation(N_ITEMS)[: rng.integers(3, 40)]
        n_tr = rng.integers(1, len(items))
        rest = items[n_tr:]
        train += [(u, i) for i in items[:n_tr]]
        if u % 7 == 3:  # users without any target in either split
            continue
        cut = rng.integers(0, len(rest) + 1)
        valid += [(u, i) for i in rest[:cut]]
        test += [(u, i) for i in rest[cut:]]
    return tuple(np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in (train, valid, test))  # type: ignore[return-value]


def _reference(
    scores: np.ndarray, targets: np.ndarray, exclude: Sequence[np.ndarray], ks: Sequence[int]
) -> tuple[dict[str, float], np.ndarray, dict[str, np.ndarray]]:
    """Straightforward per-user implementation of the metrics in the module docstring."""
    tgt: dict[int, set[int]] = {}
    for u, i in targets.tolist():
        tgt.setdefault(u, set()).add(i)
    excl: dict[int, set[int]] = {}
    for pairs in exclude:
        for u, i in pairs.tolist():
            excl.setdefault(u, set()).add(i)
    users = sorted(tgt)
    per_user: dict[str, list[float]] = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg", "precision", "hit")}
    total_hits = dict.fromkeys(ks, 0.0)
    n_total = 0
    for u in users:
        allowed = [i for i in range(scores.shape[1]) if i not in excl.get(u, set())]
        ranking = sorted(allowed, key=lambda i: -scores[u, i])
        t = tgt[u]
        n_total += len(t)
        for k in ks:
            top = ranking[:k]
            hit_pos = [p for p, i in enumerate(top) if i in t]
            dcg = sum(1.0 / math.log2(p + 2) for p in hit_pos)
            idcg = sum(1.0 / math.log2(p + 2) for p in range(min(len(t), k)))
            per_user[f"recall@{k}"].append(len(hit_pos) / len(t))
            per_user[f"precision@{k}"].append(len(hit_pos) / k)
            per_user[f"ndcg@{k}"].append(dcg / idcg)
            per_user[f"hit@{k}"].append(float(len(hit_pos)))
            total_hits[k] += len(hit_pos)
    metrics = {key: float(np.mean(v)) for key, v in per_user.items() if not key.startswith("hit")}
    metrics.update({f"hit@{k}": total_hits[k] / n_total for k in ks})
    return metrics, np.asarray(users, dtype=np.int64), {k: np.asarray(v) for k, v in per_user.items()}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    scores = _random_scores(rng)
    train, valid, test = _random_splits(rng)
    return scores, train, valid, test


@pytest.mark.parametrize("batch_size", [1, 7, 16, 50, 1024])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_matches_bruteforce_reference(data: tuple[np.ndarray, ...], batch_size: int, split: str) -> None:
    scores, train, valid, test = data
    targets, exclude = (valid, [train]) if split == "valid" else (test, [train, valid])
    ks = (1, 5, 10, 20)
    res = full_rank_evaluate(_score_fn(scores), targets, exclude, N_USERS, N_ITEMS, ks=ks, batch_size=batch_size)
    ref_metrics, ref_users, ref_per_user = _reference(scores, targets, exclude, ks)

    assert len(ref_users) < N_USERS  # some users really are skipped
    np.testing.assert_array_equal(res.users, ref_users)
    assert res.users.dtype == np.int64
    assert set(res.metrics) == set(ref_metrics) == set(res.per_user)
    for key, value in ref_metrics.items():
        assert res.metrics[key] == pytest.approx(value, abs=1e-12), key
        np.testing.assert_allclose(res.per_user[key], ref_per_user[key], atol=1e-12, err_msg=key)
        assert res.per_user[key].shape == res.users.shape


def test_ks_order_and_duplicates_do_not_matter(data: tuple[np.ndarray, ...]) -> None:
    scores, train, valid, _ = data
    a = full_rank_evaluate(_score_fn(scores), valid, [train], N_USERS, N_ITEMS, ks=(20, 5, 5))
    b = full_rank_evaluate(_score_fn(scores), valid, [train], N_USERS, N_ITEMS, ks=(5, 20))
    assert a.metrics == b.metrics
    assert list(b.metrics) == [
        "recall@5", "ndcg@5", "precision@5", "hit@5", "recall@20", "ndcg@20", "precision@20", "hit@20"
    ]  # fmt: skip


def test_duplicate_target_pairs_are_ignored(data: tuple[np.ndarray, ...]) -> None:
    scores, train, valid, _ = data
    a = full_rank_evaluate(_score_fn(scores), valid, [train], N_USERS, N_ITEMS)
    b = full_rank_evaluate(_score_fn(scores), np.concatenate([valid, valid[::3]]), [train], N_USERS, N_ITEMS)
    assert a.metrics == b.metrics


def test_hand_computed_single_user() -> None:
    n_items = 10
    # ranking for user 0: 7, 0, 1, 2, 3, 4, ... -> item 7 at position 0, item 3 at position 4
    order = [7, 0, 1, 2, 3, 4, 5, 6, 8, 9]
    scores = np.zeros((1, n_items), dtype=np.float32)
    scores[0, order] = np.arange(n_items, 0, -1, dtype=np.float32)
    targets = np.array([[0, 3], [0, 7]], dtype=np.int64)
    res = full_rank_evaluate(_score_fn(scores), targets, [], 1, n_items, ks=(1, 4, 5))

    assert res.metrics["recall@5"] == pytest.approx(1.0)
    assert res.metrics["precision@5"] == pytest.approx(0.4)
    expected_ndcg = (1 / math.log2(2) + 1 / math.log2(6)) / (1 + 1 / math.log2(3))
    assert res.metrics["ndcg@5"] == pytest.approx(expected_ndcg)
    assert res.metrics["hit@5"] == pytest.approx(1.0)
    assert res.per_user["hit@5"].tolist() == [2.0]

    assert res.metrics["recall@4"] == pytest.approx(0.5)
    assert res.metrics["precision@4"] == pytest.approx(0.25)
    assert res.metrics["ndcg@4"] == pytest.approx(1.0 / (1 + 1 / math.log2(3)))
    assert res.metrics["ndcg@1"] == pytest.approx(1.0)  # IDCG@1 uses min(|T|, 1) = 1 position
    assert res.metrics["recall@1"] == pytest.approx(0.5)

    # excluding item 7 shifts everything up by one: 3 moves to position 3
    res2 = full_rank_evaluate(_score_fn(scores), targets, [np.array([[0, 7]])], 1, n_items, ks=(5,))
    assert res2.metrics["recall@5"] == pytest.approx(0.5)  # 7 is excluded, so can't be hit
    assert res2.metrics["ndcg@5"] == pytest.approx((1 / math.log2(5)) / (1 + 1 / math.log2(3)))


def test_hit_ratio_is_pooled_over_interactions() -> None:
    n_items = 6
    scores = np.tile(np.arange(n_items, 0, -1, dtype=np.float32), (2, 1))  # ranking 0, 1, 2, ...
    # user 0: 1 target, hit at @2; user 1: 4 targets, 1 hit at @2
    targets = np.array([[0, 0], [1, 1], [1, 3], [1, 4], [1, 5]], dtype=np.int64)
    res = full_rank_evaluate(_score_fn(scores), targets, [], 2, n_items, ks=(2,))
    assert res.per_user["hit@2"].tolist() == [1.0, 1.0]
    assert res.metrics["hit@2"] == pytest.approx(2 / 5)  # not the per-user mean of 1.0
    assert res.metrics["recall@2"] == pytest.approx((1.0 + 0.25) / 2)


def test_perfect_scorer(data: tuple[np.ndarray, ...]) -> None:
    _, train, valid, test = data
    scores = np.zeros((N_USERS, N_ITEMS), dtype=np.float32)
    scores[test[:, 0], test[:, 1]] = 1.0
    res = full_rank_evaluate(_score_fn(scores), test, [train, valid], N_USERS, N_ITEMS, ks=(5, 20))
    n_t = np.bincount(test[:, 0], minlength=N_USERS)[res.users]
    for k in (5, 20):
        small = n_t <= k
        assert small.any()
        np.testing.assert_allclose(res.per_user[f"recall@{k}"][small], 1.0)
        np.testing.assert_allclose(res.per_user[f"recall@{k}"][~small], k / n_t[~small])
        np.testing.assert_allclose(res.per_user[f"ndcg@{k}"], 1.0)
        np.testing.assert_allclose(res.per_user[f"hit@{k}"], np.minimum(n_t, k))


def test_target_that_is_also_excluded_cannot_be_hit() -> None:
    n_items = 5
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
    targets = np.array([[0, 0], [0, 4]], dtype=np.int64)
    exclude = [np.array([[0, 0], [0, 1], [0, 2], [0, 3]], dtype=np.int64)]
    # k=5 > number of allowed items (1): masked items fill the tail of topk but must not count
    res = full_rank_evaluate(_score_fn(scores), targets, exclude, 1, n_items, ks=(1, 5, 9))
    assert res.per_user["hit@5"].tolist() == [1.0]  # only item 4
    assert res.metrics["recall@5"] == pytest.approx(0.5)
    assert res.metrics["hit@1"] == pytest.approx(0.5)
    assert res.metrics["precision@9"] == pytest.approx(1 / 9)  # K larger than n_items


def test_topk_items_masking_and_order(data: tuple[np.ndarray, ...]) -> None:
    scores, train, valid, _ = data
    users = np.array([4, 0, 4, 49, 17], dtype=np.int64)  # arbitrary order, repeats allowed
    k = 15
    for bs in (1, 2, 1024):
        items, vals = topk_items(_score_fn(scores), users, [train, valid], N_USERS, N_ITEMS, k, batch_size=bs)
        assert items.shape == vals.shape == (len(users), k)
        assert items.dtype == np.int64 and vals.dtype == np.float32
        for row, u in enumerate(users):
            banned = set(train[train[:, 0] == u, 1]) | set(valid[valid[:, 0] == u, 1])
            assert not banned & set(items[row].tolist())
            allowed = np.array([i for i in range(N_ITEMS) if i not in banned])
            expected = allowed[np.argsort(-scores[u, allowed], kind="stable")][:k]
            np.testing.assert_array_equal(items[row], expected)
            np.testing.assert_array_equal(vals[row], scores[u, expected])


def test_topk_items_pads_when_too_few_allowed_items() -> None:
    scores = np.array([[1.0, 3.0, 2.0, 0.5]], dtype=np.float32)
    exclude = [np.array([[0, 1], [0, 3]], dtype=np.int64)]
    items, vals = topk_items(_score_fn(scores), np.array([0]), exclude, 1, 4, k=6)
    assert items.tolist() == [[2, 0, -1, -1, -1, -1]]
    assert vals[0, :2].tolist() == [2.0, 1.0]
    assert np.all(np.isneginf(vals[0, 2:]))


def test_save_per_user_roundtrip(data: tuple[np.ndarray, ...], tmp_path: Path) -> None:
    scores, train, valid, _ = data
    res = full_rank_evaluate(_score_fn(scores), valid, [train], N_USERS, N_ITEMS, ks=(10,))
    path = tmp_path / "per_user.npz"
    res.save_per_user(path)
    with np.load(path, allow_pickle=False) as f:
        assert set(f.files) == {"users", *res.per_user}
        np.testing.assert_array_equal(f["users"], res.users)
        assert f["users"].dtype == np.int64
        for key, arr in res.per_user.items():
            np.testing.assert_array_equal(f[key], arr)


def test_no_targets_and_bad_inputs() -> None:
    scores = np.zeros((3, 4), dtype=np.float32)
    empty = np.zeros((0, 2), dtype=np.int64)
    res = full_rank_evaluate(_score_fn(scores), empty, [], 3, 4, ks=(2,))
    assert isinstance(res, EvalResult)
    assert res.users.shape == (0,) and res.per_user["recall@2"].shape == (0,)
    assert all(v == 0.0 for v in res.metrics.values())

    with pytest.raises(ValueError, match="item index"):
        full_rank_evaluate(_score_fn(scores), np.array([[0, 4]]), [], 3, 4)
    with pytest.raises(ValueError, match="user index"):
        full_rank_evaluate(_score_fn(scores), np.array([[0, 1]]), [np.array([[3, 0]])], 3, 4)
    with pytest.raises(ValueError, match="ks"):
        full_rank_evaluate(_score_fn(scores), np.array([[0, 1]]), [], 3, 4, ks=(0,))
    with pytest.raises(ValueError, match="score_fn"):
        full_rank_evaluate(lambda u: torch.zeros(len(u), 5), np.array([[0, 1]]), [], 3, 4)


def test_untrained_slice_scores_only_items_without_training_interactions() -> None:
    from functools import partial

    from training.evaluate import add_untrained_slice

    rng = np.random.default_rng(0)
    n_users, n_items = 30, 40
    train = np.stack([rng.integers(0, n_users, 200), rng.integers(0, 30, 200)], axis=1)  # items 30.. untrained
    targets = np.stack([rng.integers(0, n_users, 80), rng.integers(0, n_items, 80)], axis=1)
    scores = torch.from_numpy(rng.normal(size=(n_users, n_items)).astype(np.float32))
    evaluate = partial(
        full_rank_evaluate, lambda u: scores[u], exclude=[train], n_users=n_users, n_items=n_items, ks=[5]
    )
    result = evaluate(targets=targets)
    add_untrained_slice(result, evaluate, targets, train, n_items)
    expected = evaluate(targets=targets[targets[:, 1] >= 30]).metrics
    assert expected["recall@5"] > 0
    assert {k: result.metrics[f"untrained_{k}"] for k in expected} == expected
    # No target on an untrained item: nothing added.
    warm_only = evaluate(targets=targets[targets[:, 1] < 30])
    before = dict(warm_only.metrics)
    add_untrained_slice(warm_only, evaluate, targets[targets[:, 1] < 30], train, n_items)
    assert warm_only.metrics == before
