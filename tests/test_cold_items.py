"""Items without interactions: content-only representations, their training, and one code path from the
offline cold-item protocol to what the service computes for ``POST /items``."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from models.artifacts import load_bundle
from models.base import bpr_loss, info_nce, l2_penalty
from models.metammf.cold_items import batch_content_rows, content_rows, distinct_trained_positions, droppable_mask
from models.metammf.gcn import SAGETower
from models.metammf.inference import InferenceEncoder
from service.engine import Engine
from tests.training_support import without_training_interactions
from training.cli import load_data
from training.coldstart import cold_item_embeddings, cold_item_split, train_protocol
from training.config import RunConfig
from training.data import RecData
from training.export import export_artifacts
from training.trainer import build_model

CONTENT = {"untrained_items": "content", "isolated_nodes": "self"}


@pytest.mark.parametrize(
    ("name", "neighbors", "residual"),
    [("metammf_gcn", 0, True), ("metammf_gcn", 4, True), ("metammf_gcn", 4, False), ("metammf_mf", 0, True)],
)
def test_untrained_items_get_exactly_what_a_new_item_gets(
    tiny_data: RecData, make_config, name: str, neighbors: int, residual: bool
) -> None:
    untrained = np.arange(6)
    data = without_training_interactions(tiny_data, untrained)
    torch.manual_seed(0)
    graph = {"content_neighbors": neighbors, "content_residual": residual, **CONTENT}
    config = make_config(name, **(graph if name != "metammf_mf" else {"untrained_items": "content"}))
    model = build_model(data, config, 1e-4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
        _, items = model.get_embedding()
        encoder = InferenceEncoder.from_model(model)
        expected, _ = encoder.encode_items(torch.from_numpy(data.item_features()[untrained]))
    torch.testing.assert_close(items[: len(untrained)], expected, atol=1e-5, rtol=1e-5)
    # The paper's setting keeps their (never positively trained) ID embeddings: another representation.
    torch.manual_seed(0)
    paper = build_model(data, make_config(name), 1e-4).eval()
    paper.load_state_dict(model.state_dict(), strict=not neighbors)
    with torch.no_grad():
        assert not torch.allclose(paper.get_embedding()[1][: len(untrained)], expected, atol=1e-3)


def test_isolated_node_keeps_its_content_with_a_self_loop() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    zeros = SAGETower(8, 3, init="mean", isolated_nodes="zeros")
    selfloop = SAGETower(8, 3, init="mean", isolated_nodes="self")
    zeros.reset_parameters()
    selfloop.load_state_dict(zeros.state_dict())
    # Plain mean aggregation (W_self = 0) forgets a node without neighbours after the first layer ...
    lost = zeros.isolated(x)
    assert torch.equal(lost[1][0], lost[1][1]) and torch.equal(lost[3][0], lost[3][1])
    # ... a self loop carries its state through every layer.
    kept = selfloop.isolated(x)
    assert all(not torch.allclose(h[0], h[1]) for h in kept)
    torch.testing.assert_close(kept[1], torch.nn.functional.leaky_relu(x, 0.01))  # W_neigh = I, bias 0


def test_unknown_isolated_nodes_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="isolated_nodes"):
        SAGETower(8, 2, isolated_nodes="neighbours")


@pytest.mark.parametrize("name", ["metammf_gcn", "metammf_mf"])
def test_cold_item_dropout_scores_dropped_items_from_content(tiny_data: RecData, make_config, name: str) -> None:
    """With a dropout share of (nearly) 1 and no item spared, every batch item is scored as a new item would be."""
    torch.manual_seed(0)
    graph = {"reg_target": "final"} if name != "metammf_mf" else {}
    config = make_config(name, cold_item_dropout=0.999999, cold_item_dropout_skip_top=0.0, **graph)
    model = build_model(tiny_data, config, 1e-3)
    model.train()
    users, pos, neg = (torch.from_numpy(a) for a in (tiny_data.train[:64, 0], tiny_data.train[:64, 1],
                                                      np.arange(64) % tiny_data.n_items))  # fmt: skip
    loss = model.calculate_loss(users, pos, neg)
    with torch.no_grad():
        u_all, _ = model.get_embedding()
        encoder = InferenceEncoder.from_model(model)
        content, _ = encoder.encode_items(torch.from_numpy(tiny_data.item_features()))
    u, p, n = u_all[users], content[pos], content[neg]
    expected = bpr_loss((u * p).sum(-1), (u * n).sum(-1)) + 1e-3 * l2_penalty(u, p, n)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    # Gradients reach the fusion network through the content-only rows.
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.items.fusion.parameters())
    # In evaluation mode nothing is dropped.
    model.eval()
    with torch.no_grad():
        _, items = model.get_embedding()
        assert not torch.allclose(items, content, atol=1e-3)


def test_droppable_mask_spares_the_most_popular_items() -> None:
    # Item training counts: 3 -> 4, 0 -> 3, 1 and 4 -> 2 (tie: lower index first), 2 -> 0.
    items = torch.tensor([3, 3, 3, 3, 0, 0, 0, 1, 1, 4, 4])
    pairs = torch.stack([torch.zeros_like(items), items], dim=1)
    assert droppable_mask(pairs, 5, 0.0) is None
    assert droppable_mask(pairs, 5, 0.4).tolist() == [False, True, True, False, True]
    assert droppable_mask(pairs, 5, 0.6).tolist() == [False, False, True, False, True]
    # Dropout (nearly) 1: every droppable item in the batch is taken, no spared one, untrained ones always.
    batch = torch.tensor([0, 1, 2, 3, 4, 3, 1])
    untrained = torch.tensor([False, False, True, False, False])
    rows = content_rows(batch, untrained, 0.999999, True, droppable_mask(pairs, 5, 0.4))
    assert rows.tolist() == [1, 2, 4, 6]
    assert content_rows(batch, untrained, 0.999999, False, droppable_mask(pairs, 5, 0.4)).tolist() == [2]


@pytest.mark.parametrize("name", ["metammf_gcn", "metammf_mf"])
def test_spared_items_keep_their_trained_rows_under_dropout(tiny_data: RecData, make_config, name: str) -> None:
    """With every item spared, a dropout share of (nearly) 1 changes nothing: the loss is the trained rows' loss."""
    graph = {"reg_target": "final"} if name != "metammf_mf" else {}
    users, pos, neg = (torch.from_numpy(a) for a in (tiny_data.train[:64, 0], tiny_data.train[:64, 1],
                                                      np.arange(64) % tiny_data.n_items))  # fmt: skip
    losses = []
    for dropout in (0.0, 0.999999):
        torch.manual_seed(0)
        config = make_config(name, cold_item_dropout=dropout, cold_item_dropout_skip_top=0.999, **graph)
        losses.append(build_model(tiny_data, config, 1e-3).train().calculate_loss(users, pos, neg))
    torch.testing.assert_close(losses[0], losses[1])


def test_the_new_item_dropout_can_spare_the_negatives() -> None:
    item_ids = torch.arange(40) % 10  # 20 positives, then 20 negatives
    untrained = torch.zeros(10, dtype=torch.bool)
    untrained[7] = True
    torch.manual_seed(0)
    every = content_rows(item_ids, untrained, 0.999999, True)
    assert every.tolist() == list(range(40))
    torch.manual_seed(0)
    first = content_rows(item_ids, untrained, 0.999999, True, first=20)
    assert first.tolist() == [*range(20), 27, 37]  # the negatives only where they have no trained ID
    assert content_rows(item_ids, untrained, 0.999999, False, first=20).tolist() == [7, 17, 27, 37]


@pytest.mark.parametrize("name", ["metammf_mf", "metammf_lightgcn"])
def test_models_drop_only_positives_without_cold_item_dropout_negatives(
    tiny_data: RecData, make_config, name: str, monkeypatch
) -> None:
    module = importlib.import_module(f"models.metammf.{'mf' if name == 'metammf_mf' else 'gcn'}")
    drawn = []

    def recorded(*args, **kwargs):
        drawn.append(batch_content_rows(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(module, "batch_content_rows", recorded)
    users, pos, neg = (torch.from_numpy(a) for a in (tiny_data.train[:64, 0], tiny_data.train[:64, 1],
                                                      np.arange(64) % tiny_data.n_items))  # fmt: skip
    for negatives in (True, False):
        config = make_config(name, cold_item_dropout=0.5, cold_item_dropout_skip_top=0.0,
                             cold_item_dropout_negatives=negatives)  # fmt: skip
        build_model(tiny_data, config, 1e-3).train().calculate_loss(users, pos, neg)
        assert bool((drawn[-1] >= 64).any()) is negatives


def test_content_alignment_adds_a_distillation_term(tiny_data: RecData, make_config) -> None:
    users, pos, neg = (torch.from_numpy(a) for a in (tiny_data.train[:64, 0], tiny_data.train[:64, 1],
                                                      np.arange(64) % tiny_data.n_items))  # fmt: skip
    losses = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_model(tiny_data, make_config("metammf_gcn", content_alignment=weight), 1e-3).train()
        losses.append(model.calculate_loss(users, pos, neg))
    assert losses[1] > losses[0]


def test_info_nce_is_the_symmetric_cross_entropy_of_cosine_similarities() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    cos = torch.tensor([[float(torch.cosine_similarity(a[i], b[j], dim=0)) for j in range(5)] for i in range(5)])
    expected = 0.0
    for i in range(5):
        rows, columns = cos[i] / 0.3, cos[:, i] / 0.3
        expected -= (rows[i] - rows.exp().sum().log()) / 10 + (columns[i] - columns.exp().sum().log()) / 10
    torch.testing.assert_close(info_nce(a, b, 0.3), expected, rtol=1e-5, atol=1e-6)
    # views that match row for row and differ across rows cost next to nothing at a low temperature
    assert float(info_nce(torch.eye(5), 2 * torch.eye(5), 0.01)) < 1e-6


def test_distinct_trained_positions_pick_each_trained_item_once() -> None:
    item_ids = torch.tensor([3, 1, 3, 0, 2, 1, 4, 4, 0])
    untrained = torch.tensor([False, False, True, False, False])  # item 2 has no training interaction
    torch.manual_seed(0)
    picked = distinct_trained_positions(item_ids, untrained, limit=100)
    assert sorted(item_ids[picked].tolist()) == [0, 1, 3, 4]
    for seed in range(5):
        torch.manual_seed(seed)
        picked = distinct_trained_positions(item_ids, untrained, limit=2)
        assert picked.numel() == 2 and item_ids[picked].unique().numel() == 2
        assert not untrained[item_ids[picked]].any()
    every = {tuple(sorted(distinct_trained_positions(item_ids, None, 100).tolist())) for _ in range(30)}
    assert len(every) > 1  # which position stands for a repeated item is drawn, not always the first


def test_content_contrast_trains_both_views(tiny_data: RecData, make_config) -> None:
    """The distillation term reaches the items' ID embeddings only through the mean ID embedding of the
    content-only side (the same gradient on every row); the contrastive term also trains the trained side,
    so each item's own ID embedding gets its own gradient."""
    users, pos, neg = (torch.from_numpy(a) for a in (tiny_data.train[:64, 0], tiny_data.train[:64, 1],
                                                      np.arange(64) % tiny_data.n_items))  # fmt: skip
    graph = {"content_neighbors": 4, "cold_item_dropout": 0.0, "item_graph_k": 0, **CONTENT}
    torch.manual_seed(0)
    model = build_model(tiny_data, make_config("metammf_lightgcn", **graph), 0.0).train()
    off = model.config

    def term_gradient(**weights: float) -> tuple[float, torch.Tensor]:
        losses = []
        for config in (off, off.model_copy(update=weights)):
            model.config = config
            torch.manual_seed(1)
            losses.append(model.calculate_loss(users, pos, neg))
        model.zero_grad()
        (losses[1] - losses[0]).backward()
        return float(losses[1] - losses[0]), model.items.id_embedding.weight.grad.clone()

    alignment, from_alignment = term_gradient(content_alignment=1.0)
    contrast, from_contrast = term_gradient(content_contrast=1.0)
    assert alignment > 0 and contrast > 0
    torch.testing.assert_close(from_alignment, from_alignment[:1].expand_as(from_alignment))
    assert not torch.allclose(from_contrast, from_contrast[:1].expand_as(from_contrast))


def test_offline_cold_score_is_what_the_service_computes(tmp_path) -> None:
    """Train under the cold-item protocol, export, serve: the held-out items fused by the service's engine
    are the embeddings the offline protocol scored, and so are their scores."""
    run = RunConfig.model_validate({
        "data": {"synthetic": {"n_users": 80, "n_items": 60, "modality_dims": {"visual": 8, "acoustic": 8}, "seed": 3},
                 "protocol": "cold_items"},
        "model": {"fused_dim": 8, "id_dim": 8, "rank": 4, "extractor_hidden": 8, "cold_item_dropout": 0.3,
                  "content_neighbors": 3, **CONTENT},
        "train": {"epochs": 2, "batch_size": 128, "progress": False},
    })  # fmt: skip
    data = load_data(run.data)
    split = cold_item_split(data, run.data.cold_item_ratio, run.data.cold_item_seed)
    result = train_protocol(run, data)
    features = split.cold_item_features()
    offline = cold_item_embeddings(result.model, torch.from_numpy(features))
    path = export_artifacts(result, split.warm, run, tmp_path / "artifact", [str(i) for i in split.warm_items])
    engine = Engine(load_bundle(path))
    assert engine.bundle.item_ids == [str(i) for i in split.warm_items]
    served, _ = engine.fuse(features)
    np.testing.assert_allclose(served, offline.numpy(), rtol=1e-5, atol=1e-6)
    users, _ = result.model.get_embedding()
    np.testing.assert_allclose(engine.bundle.user_embeddings @ served.T, (users @ offline.T).detach().numpy(),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="item_ids"):
        export_artifacts(result, split.warm, run, tmp_path / "bad", ["same"] * split.warm.n_items)


def test_content_neighbors_are_the_nearest_trained_items_by_feature_cosine(tiny_data: RecData, make_config) -> None:
    untrained = np.arange(10)
    data = without_training_interactions(tiny_data, untrained)
    model = build_model(data, make_config("metammf_gcn", content_neighbors=5, **CONTENT), 1e-4)
    table = model.neighbors.table.numpy()
    assert table.shape == (data.n_items, 5)
    inputs = torch.nn.functional.normalize(model.items.item_inputs, dim=1).numpy()
    similarity = inputs @ inputs.T
    trained = np.unique(data.train[:, 1])  # (a few more items than ``untrained`` have no interaction)
    for item in range(data.n_items):
        candidates = trained[trained != item]  # never itself, never an item without interactions
        best = candidates[np.argsort(-similarity[item, candidates], kind="stable")[:5]]
        np.testing.assert_allclose(np.sort(similarity[item, table[item]]), np.sort(similarity[item, best]), rtol=1e-5)
        assert item not in table[item] and np.isin(table[item], trained).all()
    # The learned scale is a model parameter (trained by the dropped-out items), exported to the encoder.
    assert any(p is model.neighbors.scale for p in model.parameters())
    with torch.no_grad():
        model.neighbors.scale.fill_(2.5)
    assert InferenceEncoder.from_model(model.eval()).neighbor_scale.item() == 2.5
    with pytest.raises(ValueError, match="'metammf_mf' has no setting 'content_neighbors'"):
        build_model(data, make_config("metammf_mf", content_neighbors=5), 1e-4)


def test_encoder_without_neighbor_buffers_loads(tiny_data: RecData, make_config) -> None:
    """An encoder file written without content neighbours (no such buffers) still loads."""
    model = build_model(tiny_data, make_config("metammf_gcn"), 1e-4).eval()
    state = InferenceEncoder.from_model(model).state_dict()
    for name in InferenceEncoder.NEIGHBOR_BUFFERS:
        del state[name]
    encoder = InferenceEncoder.from_state_dict(model.config, model.items.fusion.in_dim, state)
    features = torch.from_numpy(tiny_data.item_features()[:3])
    torch.testing.assert_close(
        encoder.encode_items(features)[0], InferenceEncoder.from_model(model).encode_items(features)[0]
    )


def test_calibration_takes_the_largest_new_item_scale_within_one_standard_error(
    tiny_data: RecData, make_config
) -> None:
    """Per-user validation values as a function of the multiplier: the rule walks up from the best one while the
    paired difference stays within one standard error, and reads the ``all`` ranking where the evaluator has one."""
    from training.config import TrainConfig
    from training.evaluate import EvalResult
    from training.trainer import calibrate_new_items

    model = build_model(tiny_data, make_config("metammf_gcn", content_neighbors=3, **CONTENT), 1e-4)
    learned = model.neighbors.scale.item()
    noise = np.random.default_rng(0).standard_normal(400)

    def evaluate(curve, ranking: str | None = "all"):
        def run(m, which: str) -> EvalResult:
            assert which == "valid"  # never the test split
            per_user = {"recall@20": curve(m.neighbors.scale.item() / learned) + 0.01 * noise}
            result = EvalResult({"recall@20": float(per_user["recall@20"].mean())}, np.arange(400), per_user)
            if ranking is None:
                return result
            return EvalResult({"recall@20": 0.0}, np.zeros(0, dtype=np.int64), {}, {ranking: result})

        return run

    # A sharp peak at 2^2.5: every larger step is far below it.
    peak = evaluate(lambda r: 1.0 - abs(np.log2(r) - 2.5))
    assert calibrate_new_items(model, peak, TrainConfig()) == pytest.approx(2**2.5)
    assert model.neighbors.scale.item() == pytest.approx(2**2.5 * learned)
    # A plateau from 1 to 4 (the best at 1 by a hair, the rest within noise), then a fall: the plateau's end.
    model.neighbors.scale.data.fill_(learned)

    def plateau(r: float) -> np.ndarray:
        step = round(2 * np.log2(r))  # 0 at the learned scale, 1 per factor sqrt(2)
        if step < 0 or step > 4:
            return np.full(400, 0.3 if step < 0 else 0.0)
        values = np.full(400, 0.5)
        if step > 0:  # 2 step + 1 users lose a hit, 2 step others gain one: level within the noise
            values[: 2 * step + 1] = 0.0
            values[200 : 200 + 2 * step] = 1.0
        return values

    assert calibrate_new_items(model, evaluate(plateau), TrainConfig()) == 4.0
    model.neighbors.scale.data.fill_(learned)
    assert calibrate_new_items(model, evaluate(plateau), TrainConfig(new_item_scale_rule="best")) == 1.0
    # The warm protocol's evaluator (no separate rankings) is read directly.
    model.neighbors.scale.data.fill_(learned)
    assert calibrate_new_items(model, evaluate(plateau, ranking=None), TrainConfig()) == 4.0
    # No difference on validation at all (no new item takes part): the learned scale is kept.
    model.neighbors.scale.data.fill_(learned)
    assert calibrate_new_items(model, evaluate(lambda r: 0.1), TrainConfig()) == 1.0
    assert model.neighbors.scale.item() == pytest.approx(learned)
    plain = build_model(tiny_data, make_config("metammf_gcn"), 1e-4)
    assert calibrate_new_items(plain, peak, TrainConfig()) is None
