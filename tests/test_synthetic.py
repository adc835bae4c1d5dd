"""Tests for the synthetic data generator in training.synthetic."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from training.data import RecData, load_mmrec, save_mmrec
from training.synthetic import SyntheticConfig, generate_synthetic, generate_synthetic_with_truth

SMALL = SyntheticConfig(n_users=300, n_items=200, modality_dims={"visual": 16, "acoustic": 16})
# Enough items per group for held-out least squares on 32-d features.
ANALYSIS = SyntheticConfig(n_users=300, n_items=2000, modality_dims={"visual": 32, "acoustic": 32})


@pytest.fixture(scope="module")
def small() -> tuple[RecData, dict[str, np.ndarray]]:
    return generate_synthetic_with_truth(SMALL)


@pytest.fixture(scope="module")
def analysis() -> tuple[RecData, dict[str, np.ndarray]]:
    return generate_synthetic_with_truth(ANALYSIS)


def _all_pairs(d: RecData) -> np.ndarray:
    return np.concatenate([d.train, d.valid, d.test])


def test_config_defaults_and_validation():
    cfg = SyntheticConfig()
    assert (cfg.n_users, cfg.n_items, cfg.latent_dim, cfg.n_groups, cfg.seed) == (9308, 6710, 16, 4, 0)
    assert cfg.modality_dims == {"visual": 128, "acoustic": 128}
    bad = [
        {"n_users": 0},
        {"n_items": -5},
        {"interactions_per_user": 0},
        {"interactions_per_user": 2.0},  # below min_interactions_per_user
        {"min_interactions_per_user": 1},
        {"modality_dims": {"visual": 128}},
        {"modality_dims": {"visual": 0, "acoustic": 4}},
        {"modality_dims": {"a/b": 4, "c": 4}},
        {"n_groups": 5},
        {"n_groups": 0},
        {"latent_dim": 1},
        {"noise_std": -0.1},
        {"split_ratios": (0.9, 0.1, 0.0)},
        {"seed": -1},
        {"n_usres": 10},
    ]
    for kwargs in bad:
        with pytest.raises(ValidationError):
            SyntheticConfig(**kwargs)
    assert SyntheticConfig(modality_dims={"a": 4, "b": 4, "c": 4}, n_groups=5).n_groups == 5


def test_deterministic_by_seed(small):
    d1, t1 = small
    d2, t2 = generate_synthetic_with_truth(SMALL)
    for name in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(d1, name), getattr(d2, name))
    for m in d1.features:
        np.testing.assert_array_equal(d1.features[m], d2.features[m])
    for key in t1:
        np.testing.assert_array_equal(t1[key], t2[key])
    d3 = generate_synthetic(SMALL.model_copy(update={"seed": 1}))
    assert not np.array_equal(d1.features["visual"], d3.features["visual"])
    assert not np.array_equal(d1.train, d3.train)
    np.testing.assert_array_equal(generate_synthetic(SMALL).train, d1.train)


def test_shapes_follow_config(small):
    d, truth = small
    assert d.name == "synthetic"
    assert (d.n_users, d.n_items) == (300, 200)
    assert d.modality_dims == {"acoustic": 16, "visual": 16}  # sorted by name
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in d.features.values())
    assert all(a.dtype == np.int64 and a.ndim == 2 and a.shape[1] == 2 for a in (d.train, d.valid, d.test))
    assert truth["group"].shape == (200,) and truth["latent"].shape == (200, 16)
    assert np.bincount(truth["group"]).tolist() == [50, 50, 50, 50]

    cfg = SyntheticConfig(
        n_users=120,
        n_items=90,
        interactions_per_user=12,
        latent_dim=6,
        n_groups=5,
        modality_dims={"v": 8, "a": 5, "t": 3},
        name="tri",
    )
    d2, t2 = generate_synthetic_with_truth(cfg)
    assert (d2.name, d2.n_users, d2.n_items) == ("tri", 120, 90)
    assert d2.modality_dims == {"a": 5, "t": 3, "v": 8}
    assert t2["latent"].shape == (90, 6) and set(np.unique(t2["group"]).tolist()) == set(range(5))
    # the total number of interactions scales with n_users * interactions_per_user
    for data, c in ((d, SMALL), (d2, cfg)):
        total = len(_all_pairs(data))
        assert abs(total / (c.n_users * c.interactions_per_user) - 1) < 0.15
        per_user = np.bincount(_all_pairs(data)[:, 0], minlength=data.n_users)
        assert per_user.min() >= c.min_interactions_per_user


def test_split_invariants(small):
    d, _ = small
    pairs = _all_pairs(d)
    assert len(np.unique(pairs, axis=0)) == len(pairs)  # no duplicate (user, item)
    assert pairs[:, 0].min() >= 0 and pairs[:, 0].max() < d.n_users
    assert pairs[:, 1].min() >= 0 and pairs[:, 1].max() < d.n_items
    assert len(d.valid) > 0 and len(d.test) > 0
    train_users = set(d.train[:, 0].tolist())
    assert train_users == set(range(d.n_users))
    assert set(d.valid[:, 0].tolist()) <= train_users and set(d.test[:, 0].tolist()) <= train_users
    n = len(pairs)
    assert abs(len(d.train) / n - 0.8) < 0.04
    assert abs(len(d.valid) / n - 0.1) < 0.03 and abs(len(d.test) / n - 0.1) < 0.03


@pytest.mark.parametrize("seed", range(5))
def test_tiny_config_has_nonempty_splits(seed):
    d = generate_synthetic(SyntheticConfig(n_users=2, n_items=4, seed=seed, modality_dims={"a": 2, "b": 2}))
    assert len(d.train) and len(d.valid) and len(d.test)
    assert set(d.valid[:, 0].tolist()) | set(d.test[:, 0].tolist()) <= set(d.train[:, 0].tolist())


def test_round_trip_through_mmrec_files(small, tmp_path):
    d, _ = small
    save_mmrec(d, tmp_path / "syn")
    e = load_mmrec(tmp_path / "syn")
    assert (e.name, e.n_users, e.n_items) == (d.name, d.n_users, d.n_items)
    for name in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(d, name), getattr(e, name))
    for m in d.features:
        np.testing.assert_array_equal(d.features[m], e.features[m])


def _heldout_r2(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 of least squares y ~ x (with intercept), fit on the first half, scored on the second."""
    x = np.column_stack([x.astype(np.float64), np.ones(len(x))])
    y = y.astype(np.float64)
    n = len(x) // 2
    w, *_ = np.linalg.lstsq(x[:n], y[:n], rcond=None)
    resid = y[n:] - x[n:] @ w
    return float(1 - (resid**2).sum() / ((y[n:] - y[n:].mean(0)) ** 2).sum())


def test_latent_lives_in_group_specific_modalities(analysis):
    d, truth = analysis
    vis, aco = d.features["visual"], d.features["acoustic"]
    both = np.concatenate([vis, aco], axis=1)
    z, group = truth["latent"], truth["group"]
    r2 = {
        g: {name: _heldout_r2(x[group == g], z[group == g]) for name, x in (("v", vis), ("a", aco), ("va", both))}
        for g in range(4)
    }
    # group 0: visual only
    assert r2[0]["v"] > 0.7 and r2[0]["a"] < 0.1
    # group 1: acoustic only
    assert r2[1]["a"] > 0.7 and r2[1]["v"] < 0.1
    # group 2: split, each modality explains part, together they explain it
    assert 0.15 < r2[2]["v"] < 0.6 and 0.15 < r2[2]["a"] < 0.6 and r2[2]["va"] > 0.7
    # group 3: product, not linear in either modality nor in their concatenation ...
    assert max(r2[3].values()) < 0.1

    # ... but recoverable from the product of linear projections of the two
    def project(x: np.ndarray, target: np.ndarray) -> np.ndarray:
        x1 = np.column_stack([x, np.ones(len(x))])
        return x1 @ np.linalg.lstsq(x1, target, rcond=None)[0]

    prod = project(vis, truth["content_visual"]) * project(aco, truth["content_acoustic"])
    assert _heldout_r2(prod[group == 3], z[group == 3]) > 0.5


def test_group_identifiable_from_content(analysis):
    d, truth = analysis
    x = np.column_stack([d.item_features(), np.ones(d.n_items)])
    onehot = np.eye(4)[truth["group"]]
    n = d.n_items // 2
    w, *_ = np.linalg.lstsq(x[:n], onehot[:n], rcond=None)
    accuracy = ((x[n:] @ w).argmax(1) == truth["group"][n:]).mean()
    assert accuracy > 0.9


def test_interactions_follow_preferences_and_popularity(analysis):
    d, truth = analysis
    pairs = _all_pairs(d)
    affinity = (truth["user_latent"][pairs[:, 0]] * truth["latent"][pairs[:, 1]]).sum(1)
    rng = np.random.default_rng(0)
    random_items = rng.integers(0, d.n_items, len(pairs))
    random_affinity = (truth["user_latent"][pairs[:, 0]] * truth["latent"][random_items]).sum(1)
    assert affinity.mean() > random_affinity.mean() + 2.0
    # every group is chosen about equally often (no group dominates through larger scores)
    share = np.bincount(truth["group"][pairs[:, 1]], minlength=4) / len(pairs)
    assert np.all(np.abs(share - 0.25) < 0.05)
    # long-tailed popularity: the top 20% of items get far more than 20% of interactions
    counts = np.sort(np.bincount(pairs[:, 1], minlength=d.n_items))[::-1]
    assert counts[: d.n_items // 5].sum() / counts.sum() > 0.4
    assert np.corrcoef(np.bincount(pairs[:, 1], minlength=d.n_items), truth["popularity"])[0, 1] > 0.3


def test_default_size_builds():
    d = generate_synthetic()
    assert (d.n_users, d.n_items) == (9308, 6710)
    assert d.modality_dims == {"acoustic": 128, "visual": 128}
    total = len(_all_pairs(d))
    assert 60_000 < total < 78_000
    assert set(d.test[:, 0].tolist()) <= set(d.train[:, 0].tolist())


def test_hit_rate_by_group_counts_test_interactions_in_the_top_k() -> None:
    """Three users, four held-out items in two groups; user 0's validation item is masked before ranking."""
    from types import SimpleNamespace

    from training.cold_groups import hit_rate_by_group

    scores = np.array([[9.0, 1.0, 2.0, 3.0], [0.0, 5.0, 4.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    split = SimpleNamespace(valid=np.array([[0, 0]]), test=np.array([[0, 1], [0, 3], [1, 2], [2, 0], [2, 3]]))
    # Ranks once user 0's item 0 is masked: user 0 item 1 3rd, item 3 1st; user 1 item 2 2nd; user 2 item 0 4th,
    # item 3 1st. Group 0 (items 0, 1): 2 interactions, none in a top 2; group 1 (items 2, 3): 3, all in it.
    groups = np.array([0, 0, 1, 1])
    assert hit_rate_by_group(scores.copy(), split, groups, 2, k=2) == [0.0, 1.0]
    assert hit_rate_by_group(scores.copy(), split, groups, 3, k=4)[:2] == [1.0, 1.0]
    assert np.isnan(hit_rate_by_group(scores.copy(), split, groups, 3, k=4)[2])  # a group without interactions


def test_cold_groups_command_prints_a_row_per_model(capsys) -> None:
    from training.cli import main

    argv = ["cold-groups", "--config", "configs/synthetic.yaml", "--set", "data.synthetic.n_users=300",
            "--set", "data.synthetic.n_items=200", "--set", "train.epochs=2", "--set", "model.content_neighbors=5",
            "--seeds", "1", "--models", "metammf_lightgcn,late_fusion_lightgcn"]  # fmt: skip
    assert main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = "| model | visual only | acoustic only | split across all | product of visual and acoustic |"
    assert rows[0] == header and rows[3] == header  # hit rates, then the embedding probe
    assert [r.split("|")[1].strip() for r in rows[1:3] + rows[4:]] == ["metammf_lightgcn", "late_fusion_lightgcn"] * 2
    assert main([*argv[:-2], "--models", "nope"]) == 2
    assert main(["cold-groups", "--set", "data.path=somewhere", "--models", "metammf_lightgcn"]) == 2
    assert "needs the built-in synthetic data" in capsys.readouterr().err


def test_embedding_probe_measures_how_much_of_the_latent_factor_each_group_keeps() -> None:
    """Group 0's embeddings are a linear map of its latent factor, group 1's are unrelated noise."""
    from training.cold_groups import embedding_probe

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((400, 4))
    group = np.repeat([0, 1], 200)
    embeddings = np.concatenate([latent[:200] @ rng.standard_normal((4, 6)), rng.standard_normal((200, 6))])
    r2 = embedding_probe(embeddings, latent, group, 3)
    assert r2[0] > 0.6 and r2[1] < 0.1 and np.isnan(r2[2])


def test_cold_groups_learnability_ranks_predicted_factors_with_the_true_users(capsys) -> None:
    """No recommender is trained; the true factors rank held-out items far above chance (5 of 40 at k=5)."""
    from training.cli import main

    argv = ["cold-groups", "--config", "configs/synthetic.yaml", "--set", "data.synthetic.n_users=300",
            "--set", "data.synthetic.n_items=200", "--seeds", "1", "--k", "5", "--learnability"]  # fmt: skip
    assert main(argv) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == [
        "true latent factor", "ridge regression", "MetaMMF fusion network, d_s 5, rank 16",
        "MetaMMF fusion network, d_s 16, rank 32", "MLP (2 x 256, ReLU)"]  # fmt: skip
    true_factor = [float(cell.split("±")[0]) for cell in rows[1][1:]]
    assert min(true_factor) > 0.5
    assert main(["cold-groups", "--set", "data.path=somewhere", "--learnability"]) == 2
    assert "needs the built-in synthetic data" in capsys.readouterr().err
