"""Cold-start item protocol, popularity ranker, experiment run cache, tables, significance and plots.

Tiny synthetic data and two epochs throughout: every test here is about plumbing, not about results.
"""

from __future__ import annotations

import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from models.registry import MODELS
from tests.training_support import without_training_interactions
from training.coldstart import (
    ColdStartError,
    check_cold_start_model,
    cold_item_embeddings,
    cold_item_split,
    train_protocol,
)
from training.config import ConfigError, RunConfig, load_run_config
from training.data import RecData
from training.experiments import cli as experiments_cli
from training.experiments.runner import Runner, RunRecord, RunSpec, code_modules, data_fingerprint, run_key
from training.experiments.slices import embedding_scores, evaluate_slices, popularity_slices
from training.experiments.stats import paired_pvalue, paired_ttest, silhouette_score, wilcoxon_signed_rank
from training.experiments.suites import STATIC_FUSION, SUITES, Context, table2_models
from training.experiments.tables import Comparison, metric_keys, results_table
from training.experiments.tsne import _tsne_numpy, sample_users, user_item_points
from training.popularity import content_popularity, evaluate_popularity
from training.trainer import build_model

TINY_RUN = {
    "data": {"synthetic": {"n_users": 60, "n_items": 50, "modality_dims": {"v": 8, "a": 8}, "seed": 0}},
    "model": {"fused_dim": 8, "id_dim": 8, "rank": 4, "extractor_hidden": 8, "meta_dim": 3},
    "train": {"epochs": 2, "batch_size": 256, "progress": False},
}


def tiny_config(**changes: object) -> RunConfig:
    """TINY_RUN with dotted overrides, e.g. ``tiny_config(**{"model.name": "vbpr"})``."""
    dump = json.loads(json.dumps(TINY_RUN))
    for dotted, value in changes.items():
        section, key = dotted.split(".", 1)
        dump[section][key] = value
    return RunConfig.model_validate(dump)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"  # JSON is YAML
    path.write_text(json.dumps(TINY_RUN))
    return path


# --------------------------------------------------------------------------------------------------
# Cold-start split
# --------------------------------------------------------------------------------------------------


def test_cold_item_split_holds_out_a_seeded_fifth_of_the_items(tiny_data: RecData) -> None:
    split = cold_item_split(tiny_data, 0.2, seed=3)
    cold, warm = split.cold_items, split.warm_items
    assert len(cold) == round(0.2 * tiny_data.n_items)
    assert np.intersect1d(cold, warm).size == 0 and np.union1d(cold, warm).size == tiny_data.n_items
    # No held-out item in training: the warm data only knows the warm items.
    assert split.warm.n_items == len(warm)
    assert not np.isin(warm[split.warm.train[:, 1]], cold).any()
    assert (
        not np.isin(warm[split.warm.valid[:, 1]], cold).any() and not np.isin(warm[split.warm.test[:, 1]], cold).any()
    )
    # Every warm training interaction is kept, re-indexed.
    kept = tiny_data.train[~np.isin(tiny_data.train[:, 1], cold)]
    got = np.stack([split.warm.train[:, 0], warm[split.warm.train[:, 1]]], axis=1)
    assert {tuple(p) for p in kept.tolist()} == {tuple(p) for p in got.tolist()}
    # Every interaction of a held-out item goes to valid or test (but for users with no warm training item).
    everything = np.concatenate([tiny_data.train, tiny_data.valid, tiny_data.test])
    cold_pairs = everything[np.isin(everything[:, 1], cold)]
    warm_users = np.unique(split.warm.train[:, 0])
    cold_pairs = cold_pairs[np.isin(cold_pairs[:, 0], warm_users)]
    held = np.concatenate([split.valid, split.test])
    held = np.stack([held[:, 0], cold[held[:, 1]]], axis=1)
    assert sorted(map(tuple, held.tolist())) == sorted(map(tuple, cold_pairs.tolist()))
    assert len(split.valid) and len(split.test)
    # Features follow their items.
    np.testing.assert_array_equal(split.warm.item_features(), tiny_data.item_features()[warm])
    np.testing.assert_array_equal(split.cold_item_features(), tiny_data.item_features()[cold])
    # Seeded.
    again = cold_item_split(tiny_data, 0.2, seed=3)
    np.testing.assert_array_equal(again.cold_items, cold)
    np.testing.assert_array_equal(again.valid, split.valid)
    assert not np.array_equal(cold_item_split(tiny_data, 0.2, seed=4).cold_items, cold)


def test_cold_protocol_trains_on_warm_items_and_ranks_held_out_ones() -> None:
    cfg = tiny_config(**{"data.protocol": "cold_items", "model.name": "metammf_gcn"})
    from training.cli import load_data

    data = load_data(cfg.data)
    split = cold_item_split(data, cfg.data.cold_item_ratio, cfg.data.cold_item_seed)
    result = train_protocol(cfg, data)
    assert result.model.n_items == split.warm.n_items  # never saw a held-out item
    assert set(result.test.users) == set(np.unique(split.test[:, 0]))
    plain = set(metric_keys([10, 20]))
    prefixed = {f"{prefix}_{k}" for prefix in ("full", "warm", "all") for k in plain}
    assert set(result.test.metrics) == plain | prefixed | {"selection"}
    for which in (result.valid, result.test):  # the model-selection rule: held-out and warm together
        assert which.metrics["selection"] == pytest.approx(
            (which.metrics["recall@20"] + which.metrics["warm_recall@20"]) / 2
        )
    # Among all items a held-out item has more competitors: it can only rank lower.
    assert result.test.metrics["full_recall@20"] <= result.test.metrics["recall@20"]
    # Held-out items are scored from content alone: what the service's encoder computes for new items.
    from models.metammf.inference import InferenceEncoder

    features = torch.from_numpy(split.cold_item_features())
    expected, _ = InferenceEncoder.from_model(result.model).encode_items(features)
    got = cold_item_embeddings(result.model, features)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["graphsage", "gat"])
def test_unseen_item_embeddings_equal_isolated_nodes(tiny_data: RecData, make_config, name: str) -> None:
    """For models without item IDs, a held-out item is exactly an item without edges in the graph."""
    isolated = np.arange(5)
    data = without_training_interactions(tiny_data, isolated)
    torch.manual_seed(0)
    model = build_model(data, make_config(name), 1e-4).eval()
    features = torch.from_numpy(data.item_features())
    with torch.no_grad():
        expected = model.get_embedding()[1][isolated]
    got = cold_item_embeddings(model, features[isolated])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# Where each model keeps its item ID parameters: (parameter, first item row).
ITEM_ID_PARAMETERS = {
    "grcn": lambda m: [(m.id_embedding, m.n_users)],
    "mmgcn": lambda m: [(m.id_embedding, m.n_users)],
    "invrl": lambda m: [(m.item.weight, 0)],
    "vbpr": lambda m: [(m.item_gamma.weight, 0), (m.item_bias.weight, 0)],
}


@pytest.mark.parametrize("name", sorted(ITEM_ID_PARAMETERS))
def test_unseen_items_are_items_without_edges_and_with_the_mean_id(tiny_data: RecData, make_config, name: str) -> None:
    """An unseen item is scored as a catalogue item without training interactions whose ID parameters are the
    mean of the trained items' (set so here: the mean over all items stays the same)."""
    isolated = np.arange(5)
    data = without_training_interactions(tiny_data, isolated)
    torch.manual_seed(0)
    model = build_model(data, make_config(name), 1e-4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
        for weight, first in ITEM_ID_PARAMETERS[name](model):
            rows = weight[first : first + data.n_items]
            rows[isolated] = rows[len(isolated) :].mean(0)
        expected = model.get_embedding()[1][isolated]
    got = cold_item_embeddings(model, torch.from_numpy(data.item_features())[isolated])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "why"),
    [("lightgcn", "pure ID model"), ("ngcf", "pure ID model")],
)
def test_models_without_unseen_item_embeddings_are_rejected_under_the_cold_protocol(name: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_run_config(None, [f"model.name={name}", "data.protocol=cold_items"])
    with pytest.raises(ColdStartError, match="cannot score items unseen in training"):
        check_cold_start_model(name)
    load_run_config(None, [f"model.name={name}"])  # fine under the warm protocol


def test_every_model_that_embeds_unseen_items_implements_it() -> None:
    """The registry's capability flag and the model classes agree (the base class refuses)."""
    from models.base import RecModel

    for name, spec in MODELS.items():
        implemented = spec.model_class().embed_unseen_items is not RecModel.embed_unseen_items
        assert implemented == spec.embeds_unseen_items, name
        assert spec.embeds_unseen_items == spec.has_content, name  # every content model scores unseen items


def test_cli_train_under_the_cold_protocol_reports_and_does_not_export(tmp_path, capsys, tiny_yaml) -> None:
    from training.cli import main

    args = ["train", "--config", str(tiny_yaml), "--set", "data.protocol=cold_items", "--out", str(tmp_path / "a")]
    assert main([*args, "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["protocol"] == "cold_items" and summary["artifacts"] is None
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------------------------------
# Popularity ranker
# --------------------------------------------------------------------------------------------------


def test_popularity_ranks_items_by_training_count() -> None:
    # Training counts: item 0: 4, item 1: 3, item 2: 2, item 5: 1, items 3 and 4: 0.
    train = np.array([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 2], [3, 5], [4, 0], [4, 1], [4, 2]])
    valid, test = np.array([[3, 1], [4, 4]]), np.array([[3, 2], [4, 5]])
    feats = {"v": np.eye(6, dtype=np.float32)}
    data = RecData("pop", 5, 6, train, valid, test, feats)
    valid_result, result = evaluate_popularity(tiny_config(**{"train.ks": [1, 2]}), data)
    # Test, user 3 (5 seen, 1 in valid): 0, 2, ... -> item 2 second; user 4 (0, 1, 2 seen, 4 in valid): 5 first.
    np.testing.assert_array_equal(result.per_user["hit@1"], [0, 1])
    np.testing.assert_array_equal(result.per_user["hit@2"], [1, 1])
    # Valid, user 3: 0, 1 -> item 1 second; user 4: 5, 3, 4 -> item 4 third.
    np.testing.assert_array_equal(valid_result.per_user["hit@2"], [1, 0])


def test_content_popularity_learns_a_linear_trend() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    counts = np.expm1(np.clip(2.0 + x @ np.array([1.0, -0.5, 0.0, 0.2]), 0, None))
    new = rng.normal(size=(50, 4))
    predicted = content_popularity(x, counts, new, ridge=1e-3)
    truth = np.clip(2.0 + new @ np.array([1.0, -0.5, 0.0, 0.2]), 0, None)
    assert np.corrcoef(predicted, truth)[0, 1] > 0.95


def test_popularity_under_the_cold_protocol() -> None:
    cfg = tiny_config(**{"data.protocol": "cold_items"})
    from training.cli import load_data

    valid, test = evaluate_popularity(cfg, load_data(cfg.data))
    assert all(0.0 <= v <= 1.0 for v in test.metrics.values())
    assert len(test.users) > 0 and len(valid.users) > 0


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def test_paired_tests_match_known_values() -> None:
    # Reference p-values from scipy 1.17 (ttest_rel, wilcoxon with the default method='auto').
    assert paired_ttest([1, 2, 3, 4, 5.5], [0, 0, 0, 0, 0]) == pytest.approx(0.016550539701028, rel=1e-9)
    seeds_a, seeds_b = [0.31, 0.28, 0.35, 0.30, 0.33], [0.29, 0.27, 0.31, 0.30, 0.30]
    assert paired_ttest(seeds_a, seeds_b) == pytest.approx(0.047420655584319515, rel=1e-9)
    # Exact: n = 7, W- = 2 -> two-sided 2 * 3/128.
    assert wilcoxon_signed_rank([1, -2, 3, 4, 5, 6, 7], [0] * 7) == pytest.approx(6 / 128)
    # Ties and zeros, 10 pairs: all sign flips.
    a = [0.5, 0.5, 0, 1, 0.25, 0.75, 0, 0.5, 1, 0.25]
    b = [0.25, 0.5, 0.25, 0.5, 0.25, 0.5, 0.5, 0, 0.75, 0]
    assert wilcoxon_signed_rank(a, b) == pytest.approx(0.34375)
    # Many tied per-user values: normal approximation with tie correction.
    i = np.arange(120)
    a2, b2 = (i % 5) / 4 + (i % 3 == 0) * 0.25, ((i * 7) % 5) / 4
    assert wilcoxon_signed_rank(a2, b2) == pytest.approx(0.015828408331608115, rel=1e-9)
    assert paired_pvalue(a2, b2, "ttest") == pytest.approx(0.016193087475137653, rel=1e-9)
    # Degenerate cases.
    assert paired_ttest([1, 2, 3], [1, 2, 3]) == 1.0 and wilcoxon_signed_rank([1, 2], [1, 2]) == 1.0
    assert math.isnan(paired_ttest([1.0], [0.0]))
    with pytest.raises(ValueError, match="unknown test"):
        paired_pvalue([1, 2], [2, 1], "sign")


def test_paired_tests_agree_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for trial in range(60):
        n = int(rng.integers(3, 120))
        a = rng.integers(0, 4, size=n) / 4 if trial % 2 else rng.normal(size=n)
        b = rng.integers(0, 4, size=n) / 4 if trial % 2 else a + rng.normal(0.2, 1.0, size=n)
        if np.all(a == b):
            continue
        assert paired_ttest(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-8, abs=1e-300)
        assert wilcoxon_signed_rank(a, b) == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-8)


def test_silhouette_known_case() -> None:
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    s0, s1 = (10.5 - 1) / 10.5, (9.5 - 1) / 9.5
    assert silhouette_score(x, np.array([0, 0, 1, 1])) == pytest.approx((s0 + s1) / 2)
    # A point alone in its cluster scores 0.
    assert silhouette_score(np.array([[0.0], [1.0], [5.0]]), np.array([0, 0, 1])) == pytest.approx(
        ((5 - 1) / 5 + (4 - 1) / 4 + 0) / 3
    )
    assert math.isnan(silhouette_score(x, np.zeros(4)))


def test_tsne_keeps_separated_clusters_apart() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(3, 10))[labels] * 6 + rng.normal(size=(60, 10))
    coords = _tsne_numpy(x, perplexity=10, n_iter=300, seed=0)
    assert coords.shape == (60, 2) and np.isfinite(coords).all()
    assert silhouette_score(coords, labels) > 0.5


def test_user_item_points_label_items_by_their_user(tiny_data: RecData) -> None:
    users = sample_users(tiny_data, 4, seed=0)
    assert len(users) == 4 and len(set(users.tolist())) == 4
    user_emb, item_emb = np.arange(tiny_data.n_users)[:, None] * 1.0, -np.arange(tiny_data.n_items)[:, None] * 1.0
    points, labels, is_user = user_item_points(tiny_data, users, user_emb, item_emb)
    np.testing.assert_array_equal(labels[is_user], users)
    everything = {tuple(p) for p in np.concatenate([tiny_data.train, tiny_data.valid, tiny_data.test]).tolist()}
    for point, owner in zip(points[~is_user, 0], labels[~is_user], strict=True):
        assert (int(owner), int(-point)) in everything


# --------------------------------------------------------------------------------------------------
# Run cache
# --------------------------------------------------------------------------------------------------


class CountingTrain:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, cfg, data):
        self.calls += 1
        return train_protocol(cfg, data)


def test_concurrent_runners_train_a_run_once(tmp_path: Path) -> None:
    """Two processes sharing a results directory (here two threads, each with its own Runner and file lock)
    asking for the same run: one trains it, the other waits and reads it."""
    counter = CountingTrain()

    def slow_train(cfg, data):
        time.sleep(0.5)  # long enough for the other runner to find no finished run and wait
        return counter(cfg, data)

    spec = RunSpec(tiny_config(**{"model.name": "metammf_mf"}))
    runners = [Runner(tmp_path, train_fn=slow_train) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        records = list(pool.map(lambda runner: runner.run(spec), runners))
    assert counter.calls == 1 and sorted(r.trained for r in runners) == [0, 1]
    assert records[0].key == records[1].key and records[0].test == records[1].test


def test_cached_rerun_does_not_retrain(tmp_path: Path) -> None:
    counter = CountingTrain()
    spec = RunSpec(tiny_config(**{"model.name": "metammf_mf"}))
    first = Runner(tmp_path, train_fn=counter).run(spec)
    assert counter.calls == 1
    assert {p.name for p in first.path.iterdir()} >= {
        "metrics.json", "config.json", "test_per_user.npz", "valid_per_user.npz", "embeddings.npz"
    }  # fmt: skip
    mtime = (first.path / "metrics.json").stat().st_mtime_ns
    runner = Runner(tmp_path, train_fn=counter)  # a new process: only the files remain
    again = runner.run(spec)
    assert counter.calls == 1 and runner.trained == 0
    assert again.key == first.key and again.test == first.test
    assert (again.path / "metrics.json").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.test_per_user["recall@20"], first.test_per_user["recall@20"])
    # Progress bars do not matter; another seed does.
    quiet = RunSpec(spec.config.model_copy(update={"train": spec.config.train.model_copy(update={"progress": True})}))
    assert runner.key(quiet) == first.key
    runner.run(RunSpec(tiny_config(**{"model.name": "metammf_mf", "train.seed": 7})))
    assert counter.calls == 2
    # Runs keep their embeddings; a cached run without them (an older cache) is trained once more.
    users, items = runner.run(spec, embeddings=True).embeddings()
    assert counter.calls == 2 and users.shape[0] == 60 and items.shape[0] == 50
    (first.path / "embeddings.npz").unlink()
    runner.run(spec)
    assert counter.calls == 2
    runner.run(spec, embeddings=True)
    runner.run(spec, embeddings=True)
    assert counter.calls == 3
    assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".tmp")]


def test_run_key_depends_on_config_data_and_code(tiny_data: RecData) -> None:
    spec = RunSpec(tiny_config())
    key = run_key(spec, data_fingerprint(tiny_data), "code")
    assert run_key(spec, data_fingerprint(tiny_data), "other code") != key
    assert run_key(RunSpec(tiny_config(**{"model.rank": 8})), data_fingerprint(tiny_data), "code") != key
    moved = tiny_config(**{"data.path": "/somewhere/else"})
    assert run_key(RunSpec(moved), data_fingerprint(tiny_data), "code") == key  # the data enter by content
    shifted = RecData(tiny_data.name, tiny_data.n_users, tiny_data.n_items, tiny_data.train[1:], tiny_data.valid,
                      tiny_data.test, tiny_data.features)  # fmt: skip
    assert data_fingerprint(shifted) != data_fingerprint(tiny_data)
    # Popularity ignores the model and the optimiser.
    pop = run_key(RunSpec(tiny_config(), "popularity"), "d", "c")
    assert run_key(RunSpec(tiny_config(**{"model.rank": 8, "train.seed": 3}), "popularity"), "d", "c") == pop
    # A model's code version covers its own module and the training loop, not the other models.
    _, modules = code_modules("vbpr")
    assert {"models.baselines.vbpr", "training.trainer", "training.evaluate", "models.base"} <= set(modules)
    assert "models.baselines.lightgcn" not in modules and "models.registry" not in modules


# --------------------------------------------------------------------------------------------------
# Tables, suites, command line
# --------------------------------------------------------------------------------------------------


def _fake_record(tmp: Path, name: str, values: np.ndarray) -> RunRecord:
    path = tmp / name
    path.mkdir()
    users = np.arange(len(values))
    keys = metric_keys([10])
    np.savez(path / "test_per_user.npz", users=users, **{k: values for k in keys})
    info = {"test": {k: float(values.mean()) for k in keys}, "history": [], "best_epoch": 3, "seconds_per_epoch": 1}
    (path / "metrics.json").write_text(json.dumps(info))
    return RunRecord.load(path)


def test_results_table_rows_columns_and_significance(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.random(50)
    groups = {
        "MetaMMF_GCN": [_fake_record(tmp_path, f"m{s}", base + 0.2 + 0.01 * s) for s in range(3)],
        "VBPR": [_fake_record(tmp_path, f"v{s}", base + 0.1 * rng.random(50)) for s in range(3)],
        "Popularity": [_fake_record(tmp_path, f"p{s}", base * 0.5) for s in range(3)],
    }
    keys = metric_keys([10])
    table = results_table(groups, keys, comparisons=[Comparison("MetaMMF_GCN", ["VBPR", "Popularity"])])
    lines = table.markdown.strip().splitlines()
    assert lines[0] == "| Model | P@10 | R@10 | HR@10 | NDCG@10 |"
    assert [line.split("|")[1].strip() for line in lines[2:5]] == list(groups)
    assert "**" in lines[2] and "±" in lines[3]
    comparison = table.summary["comparisons"][0]["columns"]
    assert {c["baseline"] for c in comparison.values()} == {"VBPR"}  # the strongest baseline
    for c in comparison.values():
        assert 0.0 <= c["p_user"] <= 1e-6 and 0.0 <= c["p_seed"] <= 1.0 and c["improvement"] > 0


def _table_pvalues(markdown: str) -> list[float]:
    values = []
    for line in markdown.splitlines():
        if "p-value" in line:
            values += [float(cell) for cell in re.findall(r"\|\s*([0-9.e+-]+)\s*(?=\|)", line)]
    return values


def test_table2_command_writes_table_and_plots_and_resumes(tmp_path: Path, tiny_yaml: Path, capsys) -> None:
    out = tmp_path / "results"
    argv = ["table2", "--config", str(tiny_yaml), "--seeds", "2", "--out", str(out)]
    argv += ["--models", "metammf_gcn,vbpr,popularity"]
    assert experiments_cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "table2: 5 run(s) trained" in first  # popularity is seed-independent: one run
    markdown = (out / "table2" / "table.md").read_text()
    header = [c.strip() for c in markdown.splitlines()[2].strip("|").split("|")]
    assert header == ["Model", "P@10", "R@10", "HR@10", "NDCG@10", "P@20", "R@20", "HR@20", "NDCG@20",
                      "R@20 items without training interactions"]  # fmt: skip
    rows = [line.split("|")[1].strip() for line in markdown.splitlines()[4:]]
    assert rows[:3] == ["MetaMMF_GCN", "VBPR", "Popularity"]
    pvalues = _table_pvalues(markdown)
    assert len(pvalues) == 16 and all(0.0 <= p <= 1.0 for p in pvalues)
    summary = json.loads((out / "table2" / "summary.json").read_text())
    for column in summary["comparisons"][0]["columns"].values():
        assert column["baseline"] in ("VBPR", "Popularity")
        assert 0.0 <= column["p_user"] <= 1.0 and 0.0 <= column["p_seed"] <= 1.0
    if pytest.importorskip("matplotlib"):
        assert (out / "table2" / "learning_curves.png").stat().st_size > 1000
    # Re-running finds every run in the cache.
    assert experiments_cli.main(argv) == 0
    assert "table2: 0 run(s) trained" in capsys.readouterr().out
    assert (out / "table2" / "table.md").read_text() == markdown
    assert experiments_cli.main([*argv, "--cached-only"]) == 0
    assert (out / "table2" / "table.md").read_text() == markdown
    # --cached-only names a run it would have to train instead of training it.
    assert experiments_cli.main([*argv[:-1], "metammf_gcn,lightgcn", "--cached-only"]) == 2
    assert "LightGCN seed 0: run" in capsys.readouterr().err and not list((out / "runs").glob(".tmp*"))
    # --partial tabulates the seeds that finished and says so in the row.
    three = [*argv[:-1], "metammf_gcn,vbpr,popularity", "--seeds", "3", "--cached-only"]
    assert experiments_cli.main(three) == 2
    capsys.readouterr()
    assert experiments_cli.main([*three, "--partial"]) == 0
    rows = [line.split("|")[1].strip() for line in (out / "table2" / "table.md").read_text().splitlines()[4:7]]
    assert rows == ["MetaMMF_GCN (2 seeds)", "VBPR (2 seeds)", "Popularity"]  # popularity: one seed-free run
    assert experiments_cli.main([*argv, "--partial"]) == 2
    assert "--partial needs --cached-only" in capsys.readouterr().err


def test_coldstart_command_rejects_pure_id_models(tmp_path: Path, tiny_yaml: Path, capsys) -> None:
    argv = ["coldstart", "--config", str(tiny_yaml), "--out", str(tmp_path), "--models", "lightgcn"]
    assert experiments_cli.main(argv) == 2
    assert "pure ID model" in capsys.readouterr().err


def test_sweep_suites_write_tables_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    ctx = Context(Runner(tmp_path), tiny_config(), seeds=1, out=tmp_path, models=["metammf_mf"],
                  options={"users": 4})  # fmt: skip
    written = {suite: SUITES[suite](ctx) for suite in ("depth", "rank", "static", "tsne", "coldstart")}
    names = {suite: {p.name for p in paths} for suite, paths in written.items()}
    assert names["depth"] == {"table.md", "summary.json", "depth_sweep.png"}
    assert names["rank"] == {"table.md", "summary.json", "rank_sweep.png", "learning_curves.png"}
    assert names["tsne"] == {"table.md", "summary.json", "tsne.png"}
    assert all(p.stat().st_size > 0 for paths in written.values() for p in paths)
    rank = (tmp_path / "rank" / "table.md").read_text()
    assert "epochs to converge" in rank and "seconds / epoch" in rank
    assert [f"MetaMMF_MF R={r}" in rank for r in (4, 8, 16, 32, "full")] == [True] * 5
    depth = (tmp_path / "depth" / "table.md").read_text()
    assert all(f"MetaMMF_MF N={n}" in depth for n in range(1, 5))
    static = (tmp_path / "static" / "table.md").read_text()
    assert "MetaMMF_MF w/o static W" in static
    assert all(0.0 <= p <= 1.0 for p in _table_pvalues(static))
    tsne_summary = json.loads((tmp_path / "tsne" / "summary.json").read_text())
    assert -1.0 <= tsne_summary["rows"]["MetaMMF_MF"]["tsne"]["mean"] <= 1.0
    # depth N=1 and rank R=4 are the base config: the same cached run.
    assert ctx.runner.trained == 4 + 4 + 1 + 1  # depth 4, rank 4 new, static 1 new, tsne 0 (kept), coldstart 1


def test_popularity_slices_order_the_items_from_the_head_to_the_tail() -> None:
    train = np.array([[0, 3], [1, 3], [2, 3], [0, 1], [1, 1], [2, 4], [3, 0], [3, 2]])
    head, middle, tail = popularity_slices(train, 6, ((0.0, 0.2), (0.2, 0.5), (0.5, 1.0)))
    # counts: item 3: 3, item 1: 2, items 0, 2, 4: 1 (ties by id), item 5: 0.
    assert head.tolist() == [3] and middle.tolist() == [1, 0] and tail.tolist() == [2, 4, 5]
    with pytest.raises(ValueError, match="popularity slice"):
        popularity_slices(train, 6, ((0.5, 0.2),))


def test_popularity_suite_scores_the_slices_as_the_test_split_is_scored(tmp_path: Path) -> None:
    models = ["metammf_mf", "popularity"]
    ctx = Context(Runner(tmp_path), tiny_config(), seeds=2, out=tmp_path, models=models)
    [table, summary, *_] = SUITES["popularity"](ctx)
    markdown = table.read_text()
    assert "| MetaMMF_MF |" in markdown and "| Popularity |" in markdown
    result = json.loads(summary.read_text())
    assert sum(s["test_share"] for s in result["slices"]) == pytest.approx(1.0)
    # Popularity ranks the most popular items first: its hits are at the head (on 50 items the top 1% is empty).
    head = next(s["name"] for s in result["slices"] if s["test_share"] > 0)
    assert result["rows"]["Popularity"][head]["recall"]["mean"] > 0
    # The first model against each other one, per slice: p-values over users.
    pvalues = result["pvalues"]["MetaMMF_MF vs Popularity"][head]
    assert set(pvalues) == {"recall", "ndcg"} and all(0.0 <= p <= 1.0 for p in pvalues.values())
    assert "*MetaMMF_MF vs Popularity: p-value over users (ttest)*" in markdown
    # One slice holding every item gives the run's own test metrics: the same scores and masks.
    [record, _] = ctx.group("MetaMMF_MF", {"model.name": "metammf_mf", "data.protocol": "warm"}, embeddings=True)
    data, _ = ctx.runner.data(ctx.base.data)
    [whole] = evaluate_slices(embedding_scores(*record.embeddings()), data, [np.arange(data.n_items)], (10, 20))
    for key in ("recall@20", "ndcg@20", "recall@10"):
        assert whole.metrics[key] == pytest.approx(record.test[key], abs=1e-6)
    assert ctx.runner.trained == 3  # two seeds of MetaMMF_MF, one (seed-free) popularity run
    # Embeddings that do not score as the run did are refused, not tabulated.
    users, items = record.embeddings()
    np.savez(record.path / "embeddings.npz", users=users, items=-items)
    with pytest.raises(ValueError, match="do not reproduce its test NDCG"):
        SUITES["popularity"](ctx)


def test_fusion_suite_compares_each_backbone_with_its_static_variants(tmp_path: Path) -> None:
    models = ["early_fusion_mf", "hybrid_fusion_mf", "metammf_mf"]
    ctx = Context(Runner(tmp_path), tiny_config(), seeds=2, out=tmp_path, models=models)
    SUITES["fusion"](ctx)
    markdown = (tmp_path / "fusion" / "table.md").read_text()
    assert "MetaMMF_MF vs the strongest static fusion (MF)" in markdown and "(GCN)" not in markdown
    summary = json.loads((tmp_path / "fusion" / "summary.json").read_text())
    [comparison] = summary["comparisons"]
    assert {c["baseline"] for c in comparison["columns"].values()} <= {"Early fusion (MF)", "Hybrid fusion (MF)"}
    assert all(0.0 <= p <= 1.0 for p in _table_pvalues(markdown))
    assert ctx.runner.trained == 6
    # Table 2 leaves the static variants to this suite.
    assert not set(table2_models()) & set(STATIC_FUSION) and "popularity" in table2_models()


def test_tune_grid_chooses_on_validation_and_tuned_suites_use_it(tmp_path: Path, tiny_yaml: Path, capsys) -> None:
    out = tmp_path / "results"
    argv = ["tune", "--config", str(tiny_yaml), "--out", str(out), "--models", "lightgcn,vbpr"]
    argv += ["--grid", "train.lr=0.001,0.02", "--grid", "train.reg_weight=0.001", "--grid", "layers=1,2"]
    assert experiments_cli.main(argv) == 0
    assert "tune: 6 run(s) trained" in capsys.readouterr().out  # lightgcn 2 x 2, vbpr (no layers) 2
    summary = json.loads((out / "tune" / "summary.json").read_text())
    best = json.loads((out / "tune" / "best.json").read_text())
    for model in ("lightgcn", "vbpr"):
        rows = summary["models"][model]["rows"]
        assert len(rows) == (4 if model == "lightgcn" else 2)
        assert best[model] == max(rows, key=lambda row: row["valid"])["changes"]
    assert set(best["lightgcn"]) == {"train.lr", "train.reg_weight", "model.gcn_layers"}
    assert set(best["vbpr"]) == {"train.lr", "train.reg_weight"}
    assert best["lightgcn"]["train.lr"] in (0.001, 0.02) and best["lightgcn"]["model.gcn_layers"] in (1, 2)  # typed
    markdown = (out / "tune" / "table.md").read_text()
    assert markdown.count("**") == 2 * 2 * 9  # the chosen row of each model, every cell bold
    # Another invocation (another model, another grid) adds to what is there.
    more = ["tune", "--config", str(tiny_yaml), "--out", str(out), "--models", "metammf_mf", "--grid", "train.lr=0.01"]
    assert experiments_cli.main([*more, "--grid", "train.reg_weight=0.001"]) == 0
    assert "tune: 1 run(s) trained" in capsys.readouterr().out
    assert set(json.loads((out / "tune" / "best.json").read_text())) == {"lightgcn", "vbpr", "metammf_mf"}
    assert (out / "tune" / "table.md").read_text().count("**") == 3 * 2 * 9
    # --tuned: table2 trains each model with its chosen settings: the tuning run (seed 0) is reused.
    table2 = ["table2", "--config", str(tiny_yaml), "--out", str(out), "--models", "lightgcn,vbpr", "--tuned"]
    assert experiments_cli.main(table2) == 0
    assert "table2: 0 run(s) trained" in capsys.readouterr().out
    assert "settings tuned per model" in (out / "table2" / "table.md").read_text()
    row = json.loads((out / "table2" / "summary.json").read_text())["rows"]["LightGCN"]
    chosen = max(summary["models"]["lightgcn"]["rows"], key=lambda r: r["valid"])
    assert row["recall@20"]["mean"] == pytest.approx(chosen["test_recall"])


def test_tuned_without_a_tune_run_and_bad_grids_are_refused(tmp_path: Path, tiny_yaml: Path, capsys) -> None:
    base = ["--config", str(tiny_yaml), "--out", str(tmp_path)]
    assert experiments_cli.main(["table2", *base, "--tuned"]) == 2
    assert "run the tune suite" in capsys.readouterr().err
    for bad in ("train.lr", "lr=0.1", "train.lr="):
        assert experiments_cli.main(["tune", *base, "--grid", bad]) == 2
        assert "--grid" in capsys.readouterr().err
    assert experiments_cli.main(["tune", *base, "--models", "vbpr", "--grid", "train.lr=-1"]) == 2
    assert "lr" in capsys.readouterr().err


def test_newitems_suite_puts_every_new_item_variant_side_by_side(tmp_path: Path) -> None:
    from training.experiments.suites import NEW_ITEM_VARIANTS

    # A base config with new-item settings of its own: every row sets all of them, so rows do not inherit.
    base = tiny_config(**{"model.content_neighbors": 7, "model.cold_item_dropout": 0.4})
    ctx = Context(Runner(tmp_path), base, seeds=1, out=tmp_path)
    SUITES["newitems"](ctx)
    markdown = (tmp_path / "newitems" / "table.md").read_text()
    cells = [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ")]
    assert [c for c in cells if not c.startswith("*")][1:] == list(NEW_ITEM_VARIANTS)
    assert "valid selection" in markdown and "R@20 among all items" in markdown and "warm R@20" in markdown
    summary = json.loads((tmp_path / "newitems" / "summary.json").read_text())
    chosen = max(summary["rows"], key=lambda row: summary["rows"][row]["valid selection"]["mean"])
    assert summary["comparisons"][0]["target"] == chosen
    configs = [json.loads(p.read_text())["config"]["model"] for p in (tmp_path / "runs").glob("*/config.json")]
    assert sorted(c.get("content_neighbors", 0) for c in configs) == sorted(
        changes.get("model.content_neighbors", 0) for changes in NEW_ITEM_VARIANTS.values()
    )
    assert {c["cold_item_dropout"] for c in configs} <= {0.0, 0.2}
    # MF backbones have no content neighbours: the suites leave the setting out there.
    assert "content_neighbors" not in type(ctx.variant(0, {"model.name": "late_fusion_mf"}).model).model_fields
    assert ctx.variant(0, {"model.name": "metammf_gcn"}).model.content_neighbors == 7


def test_suites_give_each_model_the_base_settings_it_has(tmp_path: Path) -> None:
    """A base config with the item graph and content neighbours (as configs/tiktok.yaml): MF rows run without
    both (their configs have no such settings), graph rows keep them, every row keeps the shared width."""
    base = tiny_config(**{"model.name": "metammf_lightgcn", "model.content_neighbors": 7, "model.item_graph_k": 5})
    ctx = Context(Runner(tmp_path), base, seeds=1, out=tmp_path)
    for name in ("metammf_mf", "late_fusion_mf", "vbpr", "lightgcn"):
        model = ctx.variant(0, {"model.name": name}).model
        assert not {"content_neighbors", "item_graph_k"} & set(type(model).model_fields), name
        assert model.embedding_dim == base.model.embedding_dim, name
    for name in ("metammf_lightgcn", "early_fusion_gcn"):
        model = ctx.variant(0, {"model.name": name}).model
        assert (model.content_neighbors, model.item_graph_k) == (7, 5), name
