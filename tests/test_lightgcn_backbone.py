"""MetaMMF_LightGCN and the frozen item-item content graph: the formulas, new items, and serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch_geometric.nn import LGConv

from models.base import ModelInputs
from models.graph.utils import bipartite_edge_index, degree_sensitive_edges
from models.metammf.inference import InferenceEncoder, item_states
from models.metammf.item_graph import ItemContentGraph, degree_scale
from models.metammf.lightgcn import MetaMMF_LightGCN
from service.app import create_app
from service.settings import Settings
from tests.service_support import AUTH, KEY, post_item, rec
from tests.training_support import perturb, random_ranker_recall
from training.config import DataConfig, RunConfig, TrainConfig
from training.data import RecData
from training.export import export_artifacts
from training.synthetic import SyntheticConfig, generate_synthetic
from training.trainer import train

NEW_ITEMS = {"untrained_items": "content", "isolated_nodes": "self", "content_neighbors": 5, "cold_item_dropout": 0.2}


def build(data: RecData, config, train_pairs: np.ndarray | None = None, seed: int = 0) -> MetaMMF_LightGCN:
    torch.manual_seed(seed)
    pairs = torch.from_numpy(data.train if train_pairs is None else train_pairs)
    inputs = ModelInputs(data.n_users, torch.from_numpy(data.item_features()), data.modality_dims, pairs)
    model = MetaMMF_LightGCN(inputs, config)
    perturb(model)
    return model.eval()


def test_propagation_is_lightgcn_over_the_ego_representations(tiny_data: RecData, make_config) -> None:
    """Without the item graph the final embeddings are PyG LightGCN (LGConv, layer mean) over [users | ego]."""
    config = make_config("metammf_lightgcn", gcn_layers=3)
    model = build(tiny_data, config)
    edge_index = bipartite_edge_index(torch.from_numpy(tiny_data.train), tiny_data.n_users, tiny_data.n_items)
    h = torch.cat([model.user_embedding.weight, model.items()]).detach()
    states = [h]
    for _ in range(3):
        states.append(LGConv()(states[-1], edge_index))
    expected = torch.stack(states).mean(0)
    users, items = model.get_embedding()
    torch.testing.assert_close(torch.cat([users, items]), expected, atol=1e-5, rtol=1e-5)
    assert list(model.graph.parameters()) == []  # no weights, no non-linearity


def test_item_graph_rows_are_trained_content_neighbours_summing_to_one(tiny_data: RecData) -> None:
    features = torch.from_numpy(tiny_data.item_features())
    trained = torch.ones(tiny_data.n_items, dtype=torch.bool)
    trained[:10] = False
    graph = ItemContentGraph(features, trained, k=4)
    source, target = graph.edge_index
    assert torch.equal(torch.bincount(target, minlength=tiny_data.n_items), torch.full((tiny_data.n_items,), 4))
    assert bool((source >= 10).all())  # only trained items are neighbours
    assert bool((source != target).all())  # never the item itself
    sums = torch.zeros(tiny_data.n_items).index_add_(0, target, graph.edge_weight)
    torch.testing.assert_close(sums, torch.ones(tiny_data.n_items))
    # The most similar trained item by cosine carries the largest weight of item 20.
    unit = torch.nn.functional.normalize(features, dim=1)
    similarity = unit[20] @ unit.T
    similarity[:10] = -2
    similarity[20] = -2
    mine = target == 20
    assert int(source[mine][graph.edge_weight[mine].argmax()]) == int(similarity.argmax())
    # S h is the weighted sum, in the forward and the backward pass.
    ego = torch.randn(tiny_data.n_items, 6, requires_grad=True)
    dense = torch.zeros(tiny_data.n_items, tiny_data.n_items)
    dense[target, source] = graph.edge_weight
    out = graph(ego)
    torch.testing.assert_close(out, dense @ ego)
    out.pow(2).sum().backward()
    torch.testing.assert_close(ego.grad, 2 * dense.T @ (dense @ ego.detach()))


def test_items_without_interactions_get_their_own_neighbour_count(tiny_data: RecData) -> None:
    features = torch.from_numpy(tiny_data.item_features())
    trained = torch.ones(tiny_data.n_items, dtype=torch.bool)
    trained[:10] = False
    same = ItemContentGraph(features, trained, k=4)
    for new_k in (2, 7):
        graph = ItemContentGraph(features, trained, k=4, new_k=new_k)
        source, target = graph.edge_index
        counts = torch.bincount(target, minlength=tiny_data.n_items)
        assert bool((counts[:10] == new_k).all()) and bool((counts[10:] == 4).all())
        assert bool((source >= 10).all())
        sums = torch.zeros(tiny_data.n_items).index_add_(0, target, graph.edge_weight)
        torch.testing.assert_close(sums, torch.ones(tiny_data.n_items))
        # The trained items' rows are those of the graph with one k; the untrained ones their new_k nearest.
        ego = torch.randn(tiny_data.n_items, 6)
        torch.testing.assert_close(graph(ego)[10:], same(ego)[10:])
        torch.testing.assert_close(graph(ego)[:10], graph.new_rows(features[:10], ego), atol=1e-5, rtol=1e-5)
        narrow = ItemContentGraph(features, trained, k=new_k)
        torch.testing.assert_close(graph(ego)[:10], narrow(ego)[:10])


def test_a_popular_items_term_shrinks_with_its_training_interactions(tiny_data: RecData, make_config) -> None:
    counts = torch.bincount(torch.from_numpy(tiny_data.train[:, 1]), minlength=tiny_data.n_items)
    scale = degree_scale(counts, 4.0)
    torch.testing.assert_close(scale, 4.0 / (4.0 + counts.float()))
    assert degree_scale(counts, None) is None
    plain = build(tiny_data, make_config("metammf_lightgcn", item_graph_k=5, gcn_layers=1))
    scaled = build(tiny_data, make_config("metammf_lightgcn", item_graph_k=5, gcn_layers=1, item_graph_half_degree=4))
    _, items_a = plain.get_embedding()
    _, items_b = scaled.get_embedding()
    term = plain.item_graph(plain.items()).detach()
    torch.testing.assert_close(items_b - (items_a - term), scale.unsqueeze(1) * term, atol=1e-5, rtol=1e-5)
    assert float(scale.min()) < 0.5  # the tiny set's most popular items lose more than half of it
    # Rows without training interactions (as every new item) must keep the full term.
    features = torch.from_numpy(tiny_data.item_features())
    trained = torch.ones(tiny_data.n_items, dtype=torch.bool)
    trained[:3] = False
    with pytest.raises(ValueError, match="row_scale must be 1"):
        ItemContentGraph(features, trained, k=4, row_scale=torch.full((tiny_data.n_items,), 0.5))


def test_final_item_embedding_adds_the_item_graph_term(tiny_data: RecData, make_config) -> None:
    plain = build(tiny_data, make_config("metammf_lightgcn"))
    with_graph = build(tiny_data, make_config("metammf_lightgcn", item_graph_k=5))
    users_a, items_a = plain.get_embedding()
    users_b, items_b = with_graph.get_embedding()
    torch.testing.assert_close(users_a, users_b)  # the term is not propagated to users
    torch.testing.assert_close(items_b - items_a, with_graph.item_graph(with_graph.items()).detach())
    unit = build(tiny_data, make_config("metammf_lightgcn", item_graph_k=5, item_graph_normalize=True))
    term = unit.get_embedding()[1] - items_a
    torch.testing.assert_close(term.norm(dim=1), torch.ones(tiny_data.n_items))
    weighted = build(tiny_data, make_config("metammf_lightgcn", item_graph_k=5, item_graph_weight=0.25))
    torch.testing.assert_close(weighted.get_embedding()[1] - items_a, 0.25 * (items_b - items_a))


@pytest.mark.parametrize(
    "item_graph",
    [
        {"item_graph_k": 0},
        {"item_graph_k": 5},
        {"item_graph_k": 5, "item_graph_normalize": True},
        {"item_graph_k": 5, "item_graph_weight": 0.25},
        {"item_graph_k": 5, "item_graph_new_k": 2},
        {"item_graph_k": 5, "item_graph_half_degree": 2.0},
    ],
)
def test_a_new_item_gets_what_an_item_without_interactions_gets(tiny_data: RecData, make_config, item_graph) -> None:
    """The serving encoder's embedding of a new item equals the model's embedding of an item of the catalogue
    nobody interacted with, with the same features (content neighbours and the item graph included)."""
    new = tiny_data.n_items - 1
    train_pairs = tiny_data.train[tiny_data.train[:, 1] != new]
    model = build(tiny_data, make_config("metammf_lightgcn", **item_graph, **NEW_ITEMS), train_pairs)
    encoder = InferenceEncoder.from_model(model)
    embedding, states = encoder.encode_items(torch.from_numpy(tiny_data.item_features()[new:]))
    _, items = model.get_embedding()
    torch.testing.assert_close(embedding[0], items[new], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[:, 0], item_states(model)[:, new], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.embed_unseen_items(torch.from_numpy(tiny_data.item_features()[new:])), embedding)


def test_a_new_user_aggregates_the_states_of_their_items(tiny_data: RecData, make_config) -> None:
    """Layer l+1 of a new user is the mean of their items' layer-l states (LightGCN's aggregation with a
    row-normalised adjacency), starting from the mean user embedding; their score ranks those items' content
    neighbourhood above the rest on average."""
    model = build(tiny_data, make_config("metammf_lightgcn", gcn_layers=2))
    encoder = InferenceEncoder.from_model(model)
    states = item_states(model)
    items = torch.tensor([3, 17, 40])
    user = encoder.encode_user(states[:, items])
    mean_user = model.user_embedding.weight.mean(0).detach()
    layer1 = states[0, items].mean(0)
    layer2 = states[1, items].mean(0)
    torch.testing.assert_close(user, (mean_user + layer1 + layer2) / 3)


def test_degree_sensitive_pruning_keeps_a_symmetric_share_dropping_popular_edges_most() -> None:
    """A hub user with 20 items next to 20 one-item users: the hub's edges (weight 1/sqrt(20*2)) are kept far
    less often than the lone users' (1/sqrt(1*2))."""
    hub = [(0, i) for i in range(20)]
    lone = [(1 + i, i) for i in range(20)]
    edge_index = bipartite_edge_index(torch.tensor(hub + lone), 21, 20)
    kept_hub = kept_lone = 0
    torch.manual_seed(0)
    for _ in range(200):
        kept = degree_sensitive_edges(edge_index, 41, 0.5)
        assert kept.shape[1] == 40  # half of the 40 undirected edges, both directions
        pairs = set(map(tuple, kept.t().tolist()))
        assert all((t, s) in pairs for s, t in pairs)
        assert pairs <= set(map(tuple, edge_index.t().tolist()))
        hub_edges = int((kept[0] == 0).sum())
        kept_hub += hub_edges
        kept_lone += 20 - hub_edges
    assert kept_lone > 2 * kept_hub


def test_edge_pruning_trains_on_the_epochs_subgraph_and_evaluates_on_the_whole_graph(
    tiny_data: RecData, make_config
) -> None:
    pruned = build(tiny_data, make_config("metammf_lightgcn", edge_pruning=0.5))
    full = build(tiny_data, make_config("metammf_lightgcn"))
    full.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(pruned.full_sort_predict(torch.arange(5)), full.full_sort_predict(torch.arange(5)))
    pruned.train()
    pruned.on_epoch_start()
    graph = pruned._graph_input()[2]
    assert graph is pruned._graph_input()[2]  # one subgraph for the whole epoch
    assert graph.matrix._nnz() == 2 * int(full.edge_index.shape[1] // 2 * 0.5)
    pruned.on_epoch_start()
    assert pruned._graph_input()[2] is not graph
    pruned.eval()
    torch.testing.assert_close(pruned.full_sort_predict(torch.arange(5)), full.full_sort_predict(torch.arange(5)))


def test_edge_dropout_drops_from_the_epochs_pruned_subgraph(tiny_data: RecData, make_config) -> None:
    model = build(tiny_data, make_config("metammf_lightgcn", edge_pruning=0.5, edge_dropout=0.5)).train()
    model.on_epoch_start()
    pruned = set(map(tuple, model._pruned_edges.t().tolist()))
    rows = model._graph_input()[2].matrix.to_sparse_coo().coalesce().indices()  # (target, source) pairs
    dropped = set(map(tuple, rows.flip(0).t().tolist()))
    assert dropped < pruned and len(dropped) < 0.75 * len(pruned)


def test_edge_pruning_trains_a_model(tiny_data: RecData, make_config) -> None:
    cfg = TrainConfig(epochs=20, progress=False, threads=1, lr=0.01)
    result = train(tiny_data, make_config("metammf_lightgcn", edge_pruning=0.5), cfg)
    assert result.test.metrics["recall@20"] > 1.5 * random_ranker_recall(tiny_data, 20)


def test_neighbour_sampling_is_refused_with_the_item_graph(make_config) -> None:
    from training.config import ConfigError, check_neighbor_sampling

    with pytest.raises(ConfigError, match="item_graph_k"):
        check_neighbor_sampling(make_config("metammf_gcn", item_graph_k=5), TrainConfig(neighbor_sampling=True))
    with pytest.raises(ConfigError, match="metammf_gcn"):
        check_neighbor_sampling(make_config("metammf_lightgcn"), TrainConfig(neighbor_sampling=True))
    with pytest.raises(ConfigError, match="edge_pruning"):
        config = make_config("metammf_gcn", item_graph_k=0, edge_pruning=0.5)
        check_neighbor_sampling(config, TrainConfig(neighbor_sampling=True))


def test_a_new_items_neighbour_count_needs_the_item_graph(make_config) -> None:
    with pytest.raises(ValueError, match="item_graph_new_k needs the item graph"):
        make_config("metammf_lightgcn", item_graph_k=0, item_graph_new_k=5)
    assert make_config("metammf_lightgcn", item_graph_k=0).new_item_graph_k == 0
    assert make_config("metammf_lightgcn", item_graph_k=20).new_item_graph_k == 20
    assert make_config("metammf_lightgcn", item_graph_k=20, item_graph_new_k=10).new_item_graph_k == 10
    with pytest.raises(ValueError, match="item_graph_half_degree needs the item graph"):
        make_config("metammf_lightgcn", item_graph_k=0, item_graph_half_degree=10)


def test_mf_backbones_refuse_the_item_graph(make_config) -> None:
    with pytest.raises(ValueError, match="model 'metammf_mf' has no setting 'item_graph_k'"):
        make_config("metammf_mf", item_graph_k=5)


def test_trained_exported_and_served_with_new_items(tmp_path, redis_url: str, ns: str) -> None:
    """Trains, exports and serves: a new item posted with the features of a user's top item ranks in the top
    quarter of that user's catalogue (a random placement: the middle; its content neighbours and item-graph row
    are that item's neighbourhood) and is similar to it."""
    synthetic = SyntheticConfig(n_users=300, n_items=200, seed=11)
    data = generate_synthetic(synthetic)
    run = RunConfig(
        data=DataConfig(synthetic=synthetic),
        model={"name": "metammf_lightgcn", "item_graph_k": 10, **NEW_ITEMS},
        train=TrainConfig(progress=False, epochs=20, lr=0.01, seed=3),
    )
    result = train(data, run.model, run.train)
    path = export_artifacts(result, data, run, tmp_path / "artifacts")
    users = [str(u) for u in range(data.n_users)]
    settings = Settings(artifacts=path, redis_url=redis_url, api_key=KEY, namespace=ns)
    with TestClient(create_app(settings)) as client:
        assert client.get("/info").json()["model"] == "metammf_lightgcn"
        user = users[7]
        top = rec(client, user, 1)["items"][0]["item_id"]
        row = int(top)
        features = {m: data.features[m][row].astype(float).tolist() for m in data.modality_dims}
        post_item(client, "copy-of-top", features)
        ranking = [i["item_id"] for i in rec(client, user, 1000)["items"]]
        assert ranking.index("copy-of-top") < len(ranking) / 4, ranking.index("copy-of-top")
        similar = client.get("/items/copy-of-top/similar", params={"k": 10}).json()["items"]
        assert top in [i["item_id"] for i in similar]
        # A new user with online interactions is embedded inductively through the LightGCN aggregation.
        for item in ("3", "17", "copy-of-top"):
            r = client.post("/interactions", json={"user_id": "newcomer", "item_id": item}, headers=AUTH)
            assert r.status_code == 201, r.text
        body = rec(client, "newcomer", 10)
        assert body["strategy"] == "inductive" and len(body["items"]) == 10


def test_the_fused_content_can_have_its_own_l2_weight(tiny_data: RecData, make_config) -> None:
    users, pos, neg = (torch.from_numpy(a) for a in (tiny_data.train[:64, 0], tiny_data.train[:64, 1],
                                                      np.arange(64) % tiny_data.n_items))  # fmt: skip
    settings = {"cold_item_dropout": 0.0, "item_graph_k": 0}

    def loss(reg_weight: float, **content) -> torch.Tensor:
        model = build(tiny_data, make_config("metammf_lightgcn", **settings, **content))
        model.reg_weight = reg_weight
        return model.train().calculate_loss(users, pos, neg).detach()

    model = build(tiny_data, make_config("metammf_lightgcn", **settings))
    with torch.no_grad():
        ego, fused, user_ego = model.items(), model.config.fused_dim, model.user_embedding(users)
        content = (ego[pos, :fused].pow(2).sum() + ego[neg, :fused].pow(2).sum()) / (2 * 64)
        rest = (user_ego.pow(2).sum() + ego[pos, fused:].pow(2).sum() + ego[neg, fused:].pow(2).sum()) / (2 * 64)
    torch.testing.assert_close(loss(0.3, content_reg_weight=0.3), loss(0.3))
    torch.testing.assert_close(loss(1.0, content_reg_weight=0.0), loss(0.0) + rest)
    torch.testing.assert_close(loss(0.0, content_reg_weight=1.0), loss(0.0) + content)
    # With the L2 term on the final representations, the fused content's ego term comes on top of it.
    with torch.no_grad():
        users_final, items_final = model.get_embedding()
        final = (users_final[users].pow(2).sum() + items_final[pos].pow(2).sum() + items_final[neg].pow(2).sum()) / 128
    torch.testing.assert_close(loss(1.0, reg_target="final"), loss(0.0) + final)
    torch.testing.assert_close(loss(1.0, reg_target="final", content_reg_weight=2.0), loss(0.0) + final + 2 * content)
