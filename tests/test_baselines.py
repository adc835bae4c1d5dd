"""Every registered model (MetaMMF and the baselines) behind the common contract: the registry, a
short run of the real trainer on a tiny synthetic set (loss decreases, test recall beats a random
ranker), the PyG layers where a baseline uses them, each baseline's defining formula on small
inputs, and that baselines are never exported for serving."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch_geometric.nn import GATConv, LGConv, SAGEConv

from models.base import RecModel
from models.baselines.gat import GAT
from models.baselines.graphsage import GraphSAGE
from models.baselines.grcn import GRCN
from models.baselines.invrl import InvRL
from models.baselines.lattice import LATTICE
from models.baselines.lightgcn import LightGCN
from models.baselines.mmgcn import MMGCN
from models.baselines.ngcf import NGCF
from models.baselines.static_fusion import StaticFusionGCN, StaticFusionLightGCN, StaticFusionMF
from models.baselines.vbpr import VBPR
from models.metammf.gcn import MetaMMF_GCN
from models.metammf.inference import InferenceEncoder
from models.metammf.lightgcn import MetaMMF_LightGCN
from models.metammf.mf import MetaMMF_MF
from models.registry import MODELS, is_servable, parse_model_config
from tests.training_support import random_ranker_recall
from training import cli
from training.config import RunConfig, TrainConfig
from training.data import RecData
from training.export import NotServableError, export_artifacts
from training.sampling import BPRSampler
from training.synthetic import SyntheticConfig, generate_synthetic
from training.trainer import TrainResult, build_model, train

ALL_MODELS = list(MODELS)
BASELINES = [name for name in MODELS if not is_servable(name)]
EXPECTED_CLASS = {
    "metammf_gcn": MetaMMF_GCN,
    "metammf_mf": MetaMMF_MF,
    "metammf_lightgcn": MetaMMF_LightGCN,
    "vbpr": VBPR,
    "lightgcn": LightGCN,
    "ngcf": NGCF,
    "graphsage": GraphSAGE,
    "gat": GAT,
    "mmgcn": MMGCN,
    "grcn": GRCN,
    "lattice": LATTICE,
    "invrl": InvRL,
    **{f"{mode}_fusion_mf": StaticFusionMF for mode in ("early", "late", "hybrid")},
    **{f"{mode}_fusion_gcn": StaticFusionGCN for mode in ("early", "late", "hybrid")},
    **{f"{mode}_fusion_lightgcn": StaticFusionLightGCN for mode in ("early", "late", "hybrid")},
}


@pytest.fixture(scope="module")
def data() -> RecData:
    """400 users x 150 items (twice conftest's tiny set: the test split is then large enough for a
    recall comparison with a clear margin), two 16-d modalities."""
    return generate_synthetic(
        SyntheticConfig(n_users=400, n_items=150, modality_dims={"visual": 16, "acoustic": 16}, seed=0)
    )


TRAIN = TrainConfig(epochs=20, batch_size=256, lr=0.005, reg_weight=1e-4, patience=100, progress=False, seed=7)
_runs: dict[str, TrainResult] = {}


@pytest.fixture(scope="module")
def trained(data: RecData, make_config):
    """One short training run per model, shared by the tests of this module."""

    def run(name: str) -> TrainResult:
        if name not in _runs:
            _runs[name] = train(data, make_config(name), TRAIN)
        return _runs[name]

    yield run
    _runs.clear()


def test_random_ranker_recall_is_what_random_scores_get(data: RecData) -> None:
    from training.evaluate import full_rank_evaluate

    expected = random_ranker_recall(data)
    g = torch.Generator().manual_seed(0)
    runs = [
        full_rank_evaluate(
            lambda users: torch.rand(len(users), data.n_items, generator=g),
            data.test, [data.train, data.valid], data.n_users, data.n_items, ks=[20],
        ).metrics["recall@20"]
        for _ in range(20)
    ]  # fmt: skip
    assert abs(np.mean(runs) - expected) < 0.01


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_every_registered_name_is_a_valid_config_and_builds_its_class(data: RecData, make_config) -> None:
    assert set(EXPECTED_CLASS) == set(MODELS)
    for name in MODELS:
        model = build_model(data, make_config(name), reg_weight=1e-4)
        assert type(model) is EXPECTED_CLASS[name], name
        assert isinstance(model, RecModel) and (model.n_users, model.n_items) == (data.n_users, data.n_items)
    assert [name for name in MODELS if is_servable(name)] == ["metammf_gcn", "metammf_mf", "metammf_lightgcn"]
    modes = {name: build_model(data, make_config(name), 1e-4).items.fusion.mode for name in MODELS if "fusion" in name}
    assert modes == {name: name.split("_")[0] for name in modes}


def test_unknown_model_name_is_rejected_with_the_known_names() -> None:
    with pytest.raises(ValidationError, match=r"unknown model 'lightgcm'.*lightgcn"):
        RunConfig.model_validate({"model": {"name": "lightgcm"}})
    with pytest.raises(ValueError, match=r"unknown model 'lightgcm'.*lightgcn"):
        parse_model_config({"name": "lightgcm"})
    assert RunConfig.model_validate({"model": {"name": "ngcf"}}).model.name == "ngcf"
    parser = cli.build_parser()
    for name in ALL_MODELS:
        assert parser.parse_args(["train", "--model", name]).model == name
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--model", "lightgcm"])


# --------------------------------------------------------------------------------------------------
# Training smoke tests: the real trainer, evaluator and early stopping
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_trains_with_decreasing_loss_and_beats_a_random_ranker(data: RecData, trained, name: str) -> None:
    result = trained(name)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == TRAIN.epochs and all(np.isfinite(losses))
    assert 0.3 < losses[0] < 1.0  # BPR near ln 2 at initialisation
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3])
    assert 1 <= result.best_epoch <= TRAIN.epochs
    recall, random_recall = result.test.metrics["recall@20"], random_ranker_recall(data)
    assert recall > 1.25 * random_recall, (name, recall, random_recall)
    # The best epoch's weights were restored: validation scores as recorded at that epoch.
    assert result.valid.metrics["recall@20"] == pytest.approx(result.best_valid["recall@20"])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_full_sort_predict_and_recommend(data: RecData, trained, name: str) -> None:
    model = trained(name).model.eval()
    user_emb, item_emb = model.get_embedding()
    assert user_emb.shape[0] == data.n_users and item_emb.shape[0] == data.n_items
    assert user_emb.shape[1] == item_emb.shape[1]
    users = torch.tensor([0, 3, 399, 3])
    scores = model.full_sort_predict(users)
    assert scores.shape == (4, data.n_items) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, user_emb[users] @ item_emb.T)
    model.prepare_inference()
    torch.testing.assert_close(model.full_sort_predict(users), scores)
    model.clear_inference_cache()
    exclude = torch.zeros(4, data.n_items, dtype=torch.bool)
    exclude[:, :10] = True
    top = model.recommend(users, 20, exclude)
    assert top.shape == (4, 20) and (top >= 10).all()


@pytest.mark.parametrize("name", BASELINES)
def test_every_parameter_gets_a_gradient(data: RecData, make_config, name: str) -> None:
    torch.manual_seed(0)
    model = build_model(data, make_config(name), reg_weight=1e-4).train()
    users, pos, neg = (torch.from_numpy(a[:128]) for a in next(BPRSampler(data.train, data.n_items).epoch()))
    model.calculate_loss(users, pos, neg).backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), param_name
        assert p.grad.abs().sum() > 0, param_name


# --------------------------------------------------------------------------------------------------
# PyG layers and each baseline's formula
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layers", "layer_class"),
    [
        ("lightgcn", "convs", LGConv),
        ("graphsage", "convs", SAGEConv),
        ("gat", "convs", GATConv),
        ("early_fusion_gcn", "graph.convs", SAGEConv),
        ("late_fusion_gcn", "graph.convs", SAGEConv),
        ("hybrid_fusion_gcn", "graph.convs", SAGEConv),
    ],
)
def test_graph_baselines_use_the_pyg_layers(data: RecData, make_config, name, layers, layer_class) -> None:
    config = make_config(name, gcn_layers=3)
    model = build_model(data, config, reg_weight=1e-4)
    convs = model.get_submodule(layers)
    assert len(convs) == 3 and all(type(conv) is layer_class for conv in convs)


def _perturbed(model: RecModel, seed: int = 1) -> RecModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_lightgcn_is_the_layer_mean_of_pyg_lgconv(data: RecData, make_config) -> None:
    model = _perturbed(build_model(data, make_config("lightgcn", gcn_layers=3), 1e-4))
    reference = LGConv()  # PyG's own symmetric normalisation, computed from edge_index
    h = model.embedding.weight
    states = [h]
    for _ in range(3):
        states.append(reference(states[-1], model.edge_index))
    expected = torch.stack(states).mean(0)
    user_emb, item_emb = model.get_embedding()
    torch.testing.assert_close(torch.cat([user_emb, item_emb]), expected, atol=1e-6, rtol=1e-5)


def test_graphsage_layers_are_sageconv_forward(data: RecData, make_config) -> None:
    model = _perturbed(build_model(data, make_config("graphsage", gcn_layers=2), 1e-4))
    h = model.ego()
    first, second = model.convs
    expected = second(F.normalize(F.relu(first(h, model.edge_index)), dim=-1), model.edge_index)
    torch.testing.assert_close(model.propagate(h), expected, atol=1e-5, rtol=1e-5)
    # Item inputs are the projected multimodal features, user inputs free embeddings.
    torch.testing.assert_close(h[: data.n_users], model.user_embedding.weight)
    features = torch.from_numpy(data.item_features())
    standardized = (features - features.mean(0)) / features.std(0)
    torch.testing.assert_close(h[data.n_users :], model.item_projection(standardized), atol=1e-5, rtol=1e-5)


def test_ngcf_layer_matches_the_paper_formula(data: RecData, make_config) -> None:
    model = _perturbed(build_model(data, make_config("ngcf", gcn_layers=2), 1e-4))
    n = data.n_users + data.n_items
    adjacency = torch.zeros(n, n)
    adjacency[model.edge_index[0], model.edge_index[1]] = 1.0
    d = adjacency.sum(1).clamp_min(1).rsqrt()
    laplacian = d[:, None] * adjacency * d[None, :]
    e = model.embedding.weight
    layers = [e]
    for w_gc, w_bi in zip(model.w_gc, model.w_bi, strict=True):
        side = laplacian @ e
        e = F.leaky_relu(w_gc((laplacian + torch.eye(n)) @ e) + w_bi(side * e), 0.2)
        layers.append(F.normalize(e, dim=1))
    user_emb, item_emb = model.get_embedding()
    assert user_emb.shape[1] == 3 * make_config("ngcf").embedding_dim  # concatenation of all layers
    torch.testing.assert_close(torch.cat([user_emb, item_emb]), torch.cat(layers, 1), atol=1e-5, rtol=1e-4)


def test_ngcf_message_dropout_only_in_training(data: RecData, make_config) -> None:
    model = build_model(data, make_config("ngcf", message_dropout=0.5), 1e-4)
    model.train()
    assert not torch.equal(model.propagate(), model.propagate())
    model.eval()
    assert torch.equal(model.propagate(), model.propagate())


def test_vbpr_score_is_the_paper_formula(data: RecData, make_config) -> None:
    model = _perturbed(build_model(data, make_config("vbpr"), 1e-4))
    f = model.features
    u, i = torch.tensor([5, 17]), torch.tensor([3, 140])
    expected = (
        (model.user_gamma(u) * model.item_gamma(i)).sum(1)
        + (model.user_theta(u) * model.content(f[i])).sum(1)
        + model.item_bias(i).squeeze(1)
        + model.content_bias(f[i]).squeeze(1)
    )
    scores = model.full_sort_predict(u)
    torch.testing.assert_close(scores[torch.arange(2), i], expected)
    config = make_config("vbpr")
    assert model.user_gamma.embedding_dim == config.id_dim and model.user_theta.embedding_dim == config.fused_dim


def test_static_fusion_modes(data: RecData, make_config) -> None:
    """Early = one tower over the concatenation (= MetaMMF without its meta tensor), Late = the mean
    of per-modality towers, Hybrid = the mean of both."""
    features = torch.from_numpy(data.item_features())
    x = (features - features.mean(0)) / features.std(0)
    items = torch.arange(20)
    fusion = {
        mode: _perturbed(build_model(data, make_config(f"{mode}_fusion_mf", fusion_layers=2), 1e-4)).items.fusion
        for mode in ("early", "late", "hybrid")
    }
    early, late, hybrid = fusion["early"], fusion["late"], fusion["hybrid"]
    assert early.late is None and late.early is None and len(late.late) == 2
    assert [m.in_features for m in late.late[0] if isinstance(m, torch.nn.Linear)] == [16, 16]
    assert [m.in_features for m in early.early if isinstance(m, torch.nn.Linear)] == [32, 16]
    torch.testing.assert_close(late(features[items]), (late.late[0](x[items, :16]) + late.late[1](x[items, 16:])) / 2)
    hybrid_expected = (
        hybrid.early(x[items]) + sum(t(x[items, s]) for t, s in zip(hybrid.late, hybrid.slices, strict=True)) / 2
    ) / 2
    torch.testing.assert_close(hybrid(features[items]), hybrid_expected)

    # MetaMMF_MF with a zero meta tensor and the same static weights fuses exactly like Early fusion.
    meta = build_model(data, make_config("metammf_mf", fusion_layers=2), 1e-4).eval()
    with torch.no_grad():
        linears = [m for m in early.early if isinstance(m, torch.nn.Linear)]
        for layer, linear in zip(meta.items.fusion.layers, linears, strict=True):
            layer.factor_out.zero_()
            layer.weight.copy_(linear.weight.T)
    torch.testing.assert_close(meta.items.fusion(features[items]), early(features[items]), atol=1e-5, rtol=1e-5)


def test_mmgcn_has_one_graph_per_modality(data: RecData, make_config) -> None:
    model = build_model(data, make_config("mmgcn"), 1e-4)
    assert len(model.graphs) == len(data.features) == 2
    assert all(graph.projection is None for graph in model.graphs)  # 16-d modalities are used as they are
    model = _perturbed(model)
    aggregate = model.aggregation()
    reps = [
        graph(getattr(model, f"features_{n}"), model.id_embedding, aggregate) for n, graph in enumerate(model.graphs)
    ]
    user_emb, item_emb = model.get_embedding()
    torch.testing.assert_close(torch.cat([user_emb, item_emb]), (reps[0] + reps[1]) / 2)


# --------------------------------------------------------------------------------------------------
# Baselines are evaluated, never served
# --------------------------------------------------------------------------------------------------


def test_baselines_are_not_exported(data: RecData, make_config, trained, tmp_path) -> None:
    result = trained("early_fusion_gcn")  # a MetaMMF_GCN subclass: must still be refused
    with pytest.raises(TypeError, match="only MetaMMF models"):
        InferenceEncoder.from_model(result.model)
    run_config = RunConfig(model=make_config("early_fusion_gcn"))
    with pytest.raises(NotServableError, match="'early_fusion_gcn' is a baseline"):
        export_artifacts(result, data, run_config, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_cli_trains_a_baseline_and_skips_the_export(tmp_path, capsys, caplog) -> None:
    out = tmp_path / "art"
    caplog.set_level(logging.INFO, logger="training")
    code = cli.main([
        "train", "--model", "lightgcn", "--out", str(out), "--no-progress",
        "--set", "data.synthetic.n_users=120", "--set", "data.synthetic.n_items=60",
        "--set", "data.synthetic.modality_dims={visual: 8, acoustic: 8}",
        "--set", "train.epochs=2", "--set", "train.batch_size=256",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "lightgcn" and summary["artifacts"] is None
    assert set(summary["test"]) >= {"recall@20", "ndcg@20"}
    assert not out.exists()
    assert "is a baseline: evaluated only" in caplog.text


def test_training_sees_only_training_interactions(data: RecData, make_config) -> None:
    """The graph baselines are built from the train split only: other valid/test splits, same graph."""
    for name in ("lightgcn", "ngcf", "graphsage", "gat", "mmgcn"):
        model = build_model(data, make_config(name), 1e-4)
        edges = model.edge_index.T.tolist()
        train_edges = {(u, data.n_users + i) for u, i in data.train.tolist()}
        assert len(edges) == 2 * len(train_edges), name
        assert set(map(tuple, edges)) == train_edges | {(b, a) for a, b in train_edges}, name
