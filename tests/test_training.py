"""BPR sampling, the training loop (reproducibility, early stopping, best-weight restore) and run configs."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training_support import random_ranker_recall
from training.config import ConfigError, RunConfig, TrainConfig, apply_override, load_run_config
from training.data import RecData
from training.evaluate import full_rank_evaluate
from training.sampling import BPRSampler
from training.synthetic import SyntheticConfig, generate_synthetic
from training.trainer import build_model, evaluate_split, hardest_negatives, make_optimizer, train

# --------------------------------------------------------------------------------------------------
# BPRSampler
# --------------------------------------------------------------------------------------------------


def _pairs(rng: np.random.Generator, n_users: int = 30, n_items: int = 12) -> np.ndarray:
    """Users with 1..n_items-1 distinct items each (some nearly saturated: hard rejection sampling)."""
    rows = []
    for u in range(n_users):
        k = n_items - 1 if u % 5 == 0 else int(rng.integers(1, n_items - 1))
        rows += [(u, int(i)) for i in rng.permutation(n_items)[:k]]
    return np.asarray(rows, dtype=np.int64)


def _collect(sampler: BPRSampler) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batches = list(sampler.epoch())
    return tuple(np.concatenate([b[j] for b in batches]) for j in range(3))  # type: ignore[return-value]


def test_sampler_negatives_are_unseen_and_pairs_covered_once() -> None:
    rng = np.random.default_rng(0)
    pairs, n_items = _pairs(rng), 12
    seen = {(u, i) for u, i in pairs.tolist()}
    sampler = BPRSampler(pairs, n_items, batch_size=7, seed=3)
    assert len(sampler) == -(-len(pairs) // 7)
    for _ in range(3):
        batches = list(sampler.epoch())
        assert len(batches) == len(sampler)
        assert all(len(b[0]) == 7 for b in batches[:-1]) and 1 <= len(batches[-1][0]) <= 7
        users, pos, neg = _collect(sampler)
        assert Counter(zip(users.tolist(), pos.tolist(), strict=True)) == Counter(map(tuple, pairs.tolist()))
        assert neg.dtype == np.int64 and neg.min() >= 0 and neg.max() < n_items
        assert not any((u, j) in seen for u, j in zip(users.tolist(), neg.tolist(), strict=True))
    # A user who saw all items but one always gets that one as negative.
    users, _, neg = _collect(sampler)
    missing = set(range(n_items)) - {i for u, i in seen if u == 0}
    assert set(neg[users == 0].tolist()) == missing


def test_sampler_negatives_differ_between_epochs_and_order_is_shuffled() -> None:
    rng = np.random.default_rng(1)
    pairs = _pairs(rng, n_users=50, n_items=40)
    sampler = BPRSampler(pairs, 40, batch_size=64, seed=0)

    def negatives_by_pair() -> tuple[dict, list]:
        users, pos, neg = _collect(sampler)
        keys = list(zip(users.tolist(), pos.tolist(), strict=True))
        return dict(zip(keys, neg.tolist(), strict=True)), keys

    first, order1 = negatives_by_pair()
    second, order2 = negatives_by_pair()
    changed = sum(first[k] != second[k] for k in first)
    assert changed > 0.5 * len(first)
    assert order1 != order2


def test_sampler_is_reproducible_with_a_seed() -> None:
    pairs = _pairs(np.random.default_rng(2))
    a, b, c = (BPRSampler(pairs, 12, batch_size=16, seed=s) for s in (5, 5, 6))
    for _ in range(2):
        for x, y in zip(a.epoch(), b.epoch(), strict=True):
            for arr_x, arr_y in zip(x, y, strict=True):
                np.testing.assert_array_equal(arr_x, arr_y)
    assert not all(np.array_equal(x, y) for x, y in zip(_collect(a), _collect(c), strict=True))


def test_sampler_uses_the_chosen_candidate_among_unseen_negatives() -> None:
    rng = np.random.default_rng(4)
    pairs, n_items = _pairs(rng, n_users=40, n_items=30), 30
    seen = {(u, i) for u, i in pairs.tolist()}
    offered: list[np.ndarray] = []

    def largest_item(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        assert items.shape == (len(users), 5)
        assert not any((u, j) in seen for u, row in zip(users.tolist(), items.tolist(), strict=True) for j in row)
        offered.append(items)
        return items.argmax(1)

    batches = list(BPRSampler(pairs, n_items, 16, seed=0).epoch(5, largest_item))
    users, pos, neg = (np.concatenate(parts) for parts in zip(*batches, strict=True))
    assert len(offered) == 1  # chosen once per epoch, for every interaction
    np.testing.assert_array_equal(neg, offered[0].max(1))
    assert Counter(zip(users.tolist(), pos.tolist(), strict=True)) == Counter(map(tuple, pairs.tolist()))
    with pytest.raises(ValueError, match="rule"):
        next(BPRSampler(pairs, n_items, 16).epoch(3))


def test_hardest_negatives_are_the_highest_scored_in_inference_mode(tiny_data: RecData, make_config) -> None:
    model = build_model(tiny_data, make_config("metammf_lightgcn", edge_dropout=0.5), 1e-4)
    model.train()
    users = np.arange(10, dtype=np.int64)
    candidates = np.random.default_rng(0).integers(0, tiny_data.n_items, size=(10, 6))
    chosen = hardest_negatives(model, users, candidates, chunk=3)
    assert model.training  # left as it was found
    model.eval()
    assert np.array_equal(hardest_negatives(model, users, candidates), chosen) and not model.training
    scores = model.full_sort_predict(torch.from_numpy(users)).numpy()
    expected = np.take_along_axis(scores, candidates, 1).argmax(1)
    np.testing.assert_array_equal(chosen, expected)


def test_dynamic_negative_sampling_trains_a_model(tiny_data: RecData, make_config) -> None:
    cfg = TrainConfig(epochs=8, progress=False, threads=1, negative_candidates=4, lr=0.01)
    result = train(tiny_data, make_config("lightgcn"), cfg)
    assert result.test.metrics["recall@20"] > 1.5 * random_ranker_recall(tiny_data, 20)


def test_sampler_rejects_a_user_who_saw_everything() -> None:
    pairs = np.array([[0, 0], [0, 1], [0, 2], [1, 0]])
    with pytest.raises(ValueError, match="every item"):
        BPRSampler(pairs, 3)


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data400() -> RecData:
    return generate_synthetic(
        SyntheticConfig(n_users=400, n_items=150, modality_dims={"visual": 16, "acoustic": 16}, seed=0)
    )


def _cfg(**overrides) -> TrainConfig:
    values = {"epochs": 6, "batch_size": 512, "lr": 0.01, "patience": 100, "progress": False, "seed": 7}
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def gcn_run(data400: RecData, make_config):
    return train(data400, make_config("metammf_gcn"), _cfg())


def test_training_is_reproducible(data400: RecData, make_config, gcn_run) -> None:
    again = train(data400, make_config("metammf_gcn"), _cfg())
    assert again.test.metrics == gcn_run.test.metrics
    assert again.best_epoch == gcn_run.best_epoch
    assert [h["loss"] for h in again.history] == [h["loss"] for h in gcn_run.history]
    state_a, state_b = gcn_run.model.state_dict(), again.model.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    other_seed = train(data400, make_config("metammf_gcn"), _cfg(seed=8, epochs=2))
    assert [h["loss"] for h in other_seed.history] != [h["loss"] for h in gcn_run.history[:2]]


def test_training_beats_a_random_ranker(data400: RecData, gcn_run) -> None:
    random_recall = random_ranker_recall(data400)
    assert 0.05 < random_recall < 0.3
    # The analytic baseline agrees with an actual random scorer (sanity of the helper).
    gen = torch.Generator().manual_seed(0)
    sampled = np.mean([
        full_rank_evaluate(lambda u: torch.rand(len(u), data400.n_items, generator=gen), data400.test,
                           [data400.train, data400.valid], data400.n_users, data400.n_items).metrics["recall@20"]
        for _ in range(5)
    ])  # fmt: skip
    assert sampled == pytest.approx(random_recall, abs=0.03)
    assert gcn_run.test.metrics["recall@20"] > 1.5 * random_recall
    losses = [h["loss"] for h in gcn_run.history]
    assert losses[-1] < losses[0]


def test_history_and_metrics_layout(gcn_run) -> None:
    assert [h["epoch"] for h in gcn_run.history] == list(range(1, 7))
    assert all(np.isfinite(h["loss"]) and "valid_recall@20" in h for h in gcn_run.history)
    plain = {f"{m}@{k}" for m in ("recall", "ndcg", "precision", "hit") for k in (10, 20)}
    # (test adds the slice of items without training interactions where the data has any)
    assert set(gcn_run.test.metrics) - plain in (set(), {f"untrained_{key}" for key in plain})
    assert plain <= set(gcn_run.test.metrics)
    assert gcn_run.train_seconds > 0


def test_best_weights_are_restored(data400: RecData, make_config, gcn_run) -> None:
    best = gcn_run.best_epoch
    assert 1 <= best <= len(gcn_run.history)
    record = gcn_run.history[best - 1]
    assert gcn_run.best_valid == {k[len("valid_") :]: v for k, v in record.items() if k.startswith("valid_")}
    assert gcn_run.best_valid["recall@20"] == max(h["valid_recall@20"] for h in gcn_run.history)
    assert gcn_run.valid.metrics == gcn_run.best_valid
    # Re-evaluating the returned model gives the same numbers.
    assert evaluate_split(gcn_run.model, data400, "valid", _cfg()).metrics == gcn_run.best_valid
    assert evaluate_split(gcn_run.model, data400, "test", _cfg()).metrics == gcn_run.test.metrics


def test_early_stopping(data400: RecData, make_config) -> None:
    result = train(data400, make_config("metammf_mf"), _cfg(epochs=200, patience=1, lr=0.05))
    n = len(result.history)
    assert n < 200
    # It stopped at the first evaluation that did not improve on the best so far.
    scores = [h["valid_recall@20"] for h in result.history]
    assert scores[-1] <= max(scores[:-1])
    assert all(b > a for a, b in itertools.pairwise(scores[:-1]))
    assert result.valid.metrics == result.best_valid
    assert result.best_epoch == n - 1


def test_eval_every_and_max_seconds(data400: RecData, make_config) -> None:
    result = train(data400, make_config("metammf_mf"), _cfg(epochs=5, eval_every=2))
    evaluated = [h["epoch"] for h in result.history if "valid_recall@20" in h]
    assert evaluated == [2, 4, 5]  # every 2 epochs, plus the last one
    quick = train(data400, make_config("metammf_mf"), _cfg(epochs=50, max_seconds=1e-9))
    assert len(quick.history) == 1


def test_unknown_monitor_rejected(data400: RecData, make_config) -> None:
    with pytest.raises(ValueError, match="monitor"):
        train(data400, make_config("metammf_mf"), _cfg(monitor="recall@50"))


# --------------------------------------------------------------------------------------------------
# Run configuration
# --------------------------------------------------------------------------------------------------

YAML_TEXT = """
data:
  synthetic:
    n_users: 300
model:
  name: metammf_mf
  rank: 4
  tensor: full
train:
  lr: 0.005
  ks: [5, 50]
  monitor: ndcg@50
"""

TOML_TEXT = """
[data.synthetic]
n_users = 300

[model]
name = "metammf_mf"
rank = 4
tensor = "full"

[train]
lr = 0.005
ks = [5, 50]
monitor = "ndcg@50"
"""


@pytest.mark.parametrize(("suffix", "text"), [(".yaml", YAML_TEXT), (".yml", YAML_TEXT), (".toml", TOML_TEXT)])
def test_config_file_loading(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name == "metammf_mf" and cfg.model.rank == 4 and cfg.model.tensor == "full"
    assert cfg.train.lr == 0.005 and cfg.train.ks == [5, 50] and cfg.train.monitor == "ndcg@50"
    assert cfg.data.synthetic.n_users == 300
    # Unset values keep their defaults.
    assert cfg.model.fused_dim == 32 and cfg.train.patience == 10 and cfg.data.path is None
    assert cfg.data.synthetic.n_items == 6710


def test_empty_file_and_no_file_give_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_run_config(empty) == RunConfig() == load_run_config(None)


def test_dotted_overrides_are_yaml_typed(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(YAML_TEXT)
    cfg = load_run_config(
        path,
        [
            "model.rank=8",
            "train.lr=2e-3",
            "train.ks=[10, 20]",
            "train.monitor=recall@10",
            "model.static_weights=false",
            "train.max_seconds=1.5",
            "data.synthetic.n_items=77",
            "data.path=null",
            "train.device=cpu",
        ],
    )
    assert cfg.model.rank == 8  # override wins over the file
    assert cfg.model.tensor == "full"  # file value kept
    assert cfg.train.lr == pytest.approx(0.002)
    assert cfg.train.ks == [10, 20]
    assert cfg.model.static_weights is False
    assert cfg.train.max_seconds == 1.5
    assert cfg.data.synthetic.n_items == 77 and cfg.data.synthetic.n_users == 300
    assert cfg.data.path is None


def test_apply_override_parses_values() -> None:
    data: dict = {}
    apply_override(data, "a.b.c=[1, two]")
    apply_override(data, "a.flag=yes")
    apply_override(data, "top= 3 ")
    assert data == {"a": {"b": {"c": [1, "two"]}, "flag": True}, "top": 3}


@pytest.mark.parametrize("override", ["model.bogus_key=1", "train.nonsense=true", "extra_section.x=1"])
def test_unknown_override_keys_rejected(override: str) -> None:
    key = override.split("=")[0].split(".")[-1] if not override.startswith("extra") else "extra_section"
    with pytest.raises(ConfigError, match=key):
        load_run_config(None, [override])


def test_unknown_file_keys_rejected(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  rank: 4\n  mystery_option: 1\n")
    with pytest.raises(ConfigError, match="mystery_option") as info:
        load_run_config(path)
    assert str(path) in str(info.value)


def test_invalid_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"model\.rank"):
        load_run_config(None, ["model.rank=abc"])
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_run_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"model\.tensor"):
        load_run_config(None, ["model.tensor=tucker"])


def test_each_model_has_its_own_settings(tmp_path: Path) -> None:
    """A config file written for one model serves another picked on the command line (its settings that model
    has apply, the others are left out), but a setting the chosen model lacks is an error where it is given."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: metammf_lightgcn\n  rank: 8\n  item_graph_k: 5\n  fused_dim: 16\n")
    config = load_run_config(path, ["model.name=lightgcn"]).model
    assert (config.name, config.embedding_dim) == ("lightgcn", 16 + 32)
    assert "rank" not in type(config).model_fields
    assert load_run_config(path, ["model.name=metammf_mf"]).model.rank == 8
    with pytest.raises(ConfigError, match=r"model 'lightgcn' has no setting 'rank'"):
        load_run_config(path, ["model.name=lightgcn", "model.rank=4"])
    with pytest.raises(ConfigError, match=r"model 'metammf_lightgcn' has no setting 'lattice_knn_k'"):
        load_run_config(path, ["model.lattice_knn_k=4"])
    path.write_text("model:\n  name: metammf_mf\n  item_graph_k: 5\n")  # a file is checked against its model
    with pytest.raises(ConfigError, match=r"model 'metammf_mf' has no setting 'item_graph_k'"):
        load_run_config(path)
    # Artifacts and experiment runs record the whole model config: it round-trips through its class.
    dumped = RunConfig.model_validate(load_run_config(None, ["model.name=lattice"]).model_dump())
    assert type(dumped.model).__name__ == "LATTICEConfig" and dumped.model.lattice_knn_k == 10


@pytest.mark.parametrize("override", ["no_equals_sign", "=5", "train.lr.sub=1"])
def test_malformed_overrides(override: str) -> None:
    overrides = ["train.lr=0.1", override] if override.startswith("train.lr.") else [override]
    with pytest.raises(ConfigError, match="override"):
        load_run_config(None, overrides)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("missing.yaml", None),
        ("broken.yaml", "model: [unclosed\n"),
        ("broken.toml", "[model\nrank = 4\n"),
        ("list.yaml", "- 1\n- 2\n"),
    ],
)
def test_bad_config_file_names_the_file(tmp_path: Path, name: str, text: str | None) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(path) in str(info.value)


def test_config_round_trips_through_json() -> None:
    cfg = load_run_config(None, ["model.rank=3", "train.ks=[1, 2]", "train.monitor=hit@2"])
    assert RunConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_make_optimizer_uses_the_fused_adam_and_matches_the_plain_one() -> None:
    """The trainer's Adam is PyTorch's fused kernel on CPU, and takes the same steps as the default one."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer(models[0], lr=1e-2)
    plain = torch.optim.Adam(models[1].parameters(), lr=1e-2)
    assert fused.defaults["fused"] is True
    x = torch.randn(32, 8)
    for _ in range(5):
        for model, optimizer in zip(models, (fused, plain), strict=True):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
