"""GRCN, LATTICE and InvRL: the structure each paper defines, on small inputs.

Their training smoke tests (loss decreases, test recall beats a random ranker), the prediction
contract and the every-parameter-gets-a-gradient check run with every registered model in
``tests/test_baselines.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn import AGNNConv, LGConv

from models.base import RecModel, bpr_loss
from models.baselines.grcn import attention
from models.baselines.lattice import knn_neighbours
from training.data import RecData
from training.sampling import BPRSampler
from training.trainer import build_model


def _perturbed(model: RecModel, seed: int = 1) -> RecModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _batch(data: RecData, n: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    users, pos, neg = next(BPRSampler(data.train, data.n_items, seed=3).epoch())
    return tuple(torch.from_numpy(a[:n]) for a in (users, pos, neg))


def _dense_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """Dense reference: similarity-weighted kNN graph (no self loops), cosine clamped at 0."""
    unit = F.normalize(x, dim=1)
    sim = unit @ unit.T
    top = sim.masked_fill(torch.eye(len(x), dtype=torch.bool), float("-inf")).topk(k, dim=1).indices
    dense = torch.zeros_like(sim)
    return dense.scatter_(1, top, sim.gather(1, top).clamp_min(0))


def _sym_norm(s: torch.Tensor) -> torch.Tensor:
    d = s.sum(1).rsqrt()
    return d[:, None] * s * d[None, :]


# --------------------------------------------------------------------------------------------------
# LATTICE
# --------------------------------------------------------------------------------------------------


def test_lattice_knn_graphs_have_k_neighbours_and_no_self_loops(tiny_data: RecData, make_config) -> None:
    model = build_model(tiny_data, make_config("lattice"), 1e-4)
    n, k = tiny_data.n_items, 10
    for m in range(2):
        neighbours = getattr(model, f"initial_neighbours_{m}")
        assert neighbours.shape == (n, k)
        assert not (neighbours == torch.arange(n)[:, None]).any()  # no self loops
        assert all(len(set(row)) == k for row in neighbours.tolist())  # k distinct neighbours
        unit = F.normalize(getattr(model, f"features_{m}"), dim=1)
        top = (unit @ unit.T).fill_diagonal_(float("-inf")).topk(k, dim=1).indices
        assert torch.equal(neighbours.sort(1).values, top.sort(1).values)  # exact cosine top-k
        reference = _dense_knn(getattr(model, f"features_{m}"), k)
        # Stored weights are D^-1/2 S D^-1/2 of the similarity-weighted graph.
        rows = torch.arange(n).repeat_interleave(k)
        weights = getattr(model, f"initial_weights_{m}").reshape(-1)
        dense = torch.zeros(n, n).index_put_((rows, neighbours.reshape(-1)), weights)
        torch.testing.assert_close(dense, _sym_norm(reference))
    # The chunked search is exact, whatever the chunk size.
    x = torch.randn(37, 8)
    assert torch.equal(knn_neighbours(x, 5, chunk=4), knn_neighbours(x, 5))


def test_lattice_item_graph_and_embeddings_follow_the_paper(tiny_data: RecData, make_config) -> None:
    config = make_config("lattice")
    model = _perturbed(build_model(tiny_data, config, 1e-4))
    n, k, lam = tiny_data.n_items, config.lattice_knn_k, config.lattice_lambda
    alpha = torch.softmax(model.modal_weight, 0)
    learned = sum(
        alpha[m] * _dense_knn(proj(getattr(model, f"features_{m}")), k) for m, proj in enumerate(model.projections)
    )
    initial = sum(alpha[m] * _sym_norm(_dense_knn(getattr(model, f"features_{m}"), k)) for m in range(2))
    expected = (1 - lam) * _sym_norm(learned) + lam * initial

    edge_index, weight = model.item_graph()
    assert edge_index.min() >= 0 and edge_index.max() < n
    assert edge_index.shape[1] == 2 * 2 * n * k  # (learned + initial) x modalities x n x k
    dense = torch.zeros(n, n).index_put_((edge_index[1], edge_index[0]), weight, accumulate=True)
    torch.testing.assert_close(dense, expected, atol=1e-6, rtol=1e-5)

    # Items: LightGCN over the user-item graph + the L2-normalised item-graph convolution of the IDs.
    lightgcn = model.propagate()
    h = model.embedding.weight[tiny_data.n_users :]
    assert len(model.item_convs) == 1 and all(type(conv) is LGConv for conv in model.item_convs)
    user_emb, item_emb = model.get_embedding()
    torch.testing.assert_close(user_emb, lightgcn[: tiny_data.n_users])
    expected_items = lightgcn[tiny_data.n_users :] + F.normalize(expected @ h, dim=1)
    torch.testing.assert_close(item_emb, expected_items, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("item_layers", [1, 2])
def test_lattice_embeds_unseen_items_with_a_row_of_its_item_graph(
    tiny_data: RecData, make_config, item_layers: int
) -> None:
    """An item outside the catalogue gets the row of S a catalogue item would have (its k nearest catalogue items
    per modality, learned and initial graphs, normalised with its own and the catalogue's degrees), and
    LightGCN's part of a node without edges; dense reference as above."""
    config = make_config("lattice", lattice_item_layers=item_layers)
    model = _perturbed(build_model(tiny_data, config, 1e-4))
    k, lam, n_users = config.lattice_knn_k, config.lattice_lambda, tiny_data.n_users
    raw = torch.randn(3, sum(tiny_data.modality_dims.values())) * 2 + 0.5  # three items nobody has seen
    x = model.standardizer(raw)
    alpha = torch.softmax(model.modal_weight, 0)

    def top_row(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        sim = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
        top = sim.topk(k, dim=1).indices
        return torch.zeros_like(sim).scatter_(1, top, sim.gather(1, top).clamp_min(0))

    def degree(s: torch.Tensor) -> torch.Tensor:
        return s.sum(1).rsqrt()

    parts = x.split(list(tiny_data.modality_dims.values()), dim=1)
    catalogue = [getattr(model, f"features_{m}") for m in range(2)]
    learned_new = sum(alpha[m] * top_row(p(parts[m]), p(catalogue[m])) for m, p in enumerate(model.projections))
    learned_catalogue = sum(alpha[m] * _dense_knn(p(catalogue[m]), k) for m, p in enumerate(model.projections))
    row = (1 - lam) * degree(learned_new)[:, None] * learned_new * degree(learned_catalogue)[None, :]
    for m in range(2):
        initial = top_row(parts[m], catalogue[m])
        normalised = degree(initial)[:, None] * initial * degree(_dense_knn(catalogue[m], k))[None, :]
        row = row + lam * alpha[m] * normalised
    ids = model.embedding.weight[n_users:]
    catalogue_graph = (1 - lam) * _sym_norm(learned_catalogue) + lam * sum(
        alpha[m] * _sym_norm(_dense_knn(catalogue[m], k)) for m in range(2)
    )
    states = ids
    for _ in range(item_layers - 1):  # the catalogue's states before the last layer
        states = catalogue_graph @ states
    expected = ids.mean(0) / (config.gcn_layers + 1) + F.normalize(row @ states, dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.embed_unseen_items(raw), expected, atol=1e-5, rtol=1e-5)


def test_lattice_builds_its_learned_graph_once_per_epoch(tiny_data: RecData, make_config, monkeypatch) -> None:
    """As the official code: the kNN graph is built at an epoch's first step (gradients reach the
    projections there) and reused, detached, by the epoch's other steps; inference builds it afresh."""
    model = _perturbed(build_model(tiny_data, make_config("lattice"), 1e-4))
    builds = []
    original = model.item_graph
    monkeypatch.setattr(model, "item_graph", lambda: builds.append(1) or original())
    users, pos, neg = _batch(tiny_data)
    projection = model.projections[0].weight
    model.train()  # the trainer's start of an epoch
    model.on_epoch_start()
    model.calculate_loss(users, pos, neg).backward()
    assert len(builds) == 1 and projection.grad is not None and projection.grad.abs().sum() > 0
    projection.grad = None
    model.calculate_loss(users, pos, neg).backward()
    assert len(builds) == 1 and (projection.grad is None or projection.grad.abs().sum() == 0)
    with torch.no_grad():  # the reused graph (a CSR matrix) propagates as the edge list it was built from
        reused = model.item_graph_embedding()
        fresh = model.eval().item_graph_embedding()
    torch.testing.assert_close(reused, fresh, atol=1e-6, rtol=1e-5)
    assert len(builds) == 2
    model.train()
    model.calculate_loss(users, pos, neg)  # the same epoch: the graph is reused
    assert len(builds) == 2
    model.on_epoch_start()
    model.calculate_loss(users, pos, neg)
    assert len(builds) == 3
    builds.clear()
    model.eval()
    with torch.no_grad():
        first = model.get_embedding()[1]
        model.projections[0].weight.mul_(3.0)  # other weights (e.g. the best epoch's, restored): another graph
        second = model.get_embedding()[1]
        assert len(builds) == 2 and not torch.equal(second, first)
    model.train()  # the next epoch builds again
    model.on_epoch_start()
    model.calculate_loss(users, pos, neg)
    assert len(builds) == 3


# --------------------------------------------------------------------------------------------------
# GRCN
# --------------------------------------------------------------------------------------------------


def test_grcn_refined_edge_weights_are_in_unit_interval_on_training_edges(tiny_data: RecData, make_config) -> None:
    model = _perturbed(build_model(tiny_data, make_config("grcn"), 1e-4))
    edge_index, weight = model.refined_edge_weights()
    train = {(u, tiny_data.n_users + i) for u, i in tiny_data.train.tolist()}
    assert edge_index.shape[1] == weight.shape[0] == 2 * len(train)
    assert set(map(tuple, edge_index.T.tolist())) == train | {(b, a) for a, b in train}
    assert (weight >= 0).all() and (weight <= 1).all()
    assert (weight == 0).any() and (weight > 0).any()  # negative confidence prunes edges
    # A node whose confidence is negative in every modality sends nothing.
    with torch.no_grad():
        model.confidence[3] = -1.0
    edge_index, weight = model.refined_edge_weights()
    assert (weight[edge_index[0] == 3] == 0).all()
    # Edge dropout thins the graph in training only.
    dropped = build_model(tiny_data, make_config("grcn", edge_dropout=0.5), 1e-4)
    n_both = 2 * dropped.user_item.shape[1]
    assert dropped.train().graphs().both.edge_index.shape[1] < n_both
    assert dropped.eval().graphs().both.edge_index.shape[1] == n_both


def test_grcn_refining_attention_is_pyg_agnnconv(tiny_data: RecData, make_config) -> None:
    config = make_config("grcn")
    model = build_model(tiny_data, config, 1e-4).eval()
    graphs = model.graphs()
    edge_index = graphs.both.edge_index
    x = F.normalize(torch.randn(model.n_nodes, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    aggregated, alpha = attention(x, graphs.both)
    reference = AGNNConv(requires_grad=False, add_self_loops=False)  # beta = 1: softmax of the cosine
    torch.testing.assert_close(aggregated, reference(x, edge_index), atol=1e-6, rtol=1e-5)
    sums = torch.zeros(model.n_nodes).index_add_(0, edge_index[1], alpha)
    torch.testing.assert_close(sums[edge_index[1].unique()], torch.ones(len(edge_index[1].unique())))
    # ID convolutions are PyG LGConv without normalisation; representations are [ID ; content per modality].
    _, weight, content = model.refine(graphs)
    h = F.normalize(model.id_embedding, dim=1)
    total = h
    for _ in range(config.gcn_layers):
        h = LGConv(normalize=False)(h, edge_index, weight)
        total = total + h
    user_emb, item_emb = model.get_embedding()
    torch.testing.assert_close(torch.cat([user_emb, item_emb]), torch.cat([total, *content], dim=1))
    assert user_emb.shape[1] == item_emb.shape[1] == config.embedding_dim + 2 * config.fused_dim


# --------------------------------------------------------------------------------------------------
# InvRL
# --------------------------------------------------------------------------------------------------


def test_invrl_mask_is_in_unit_interval_and_the_penalty_needs_differing_environments(
    tiny_data: RecData, make_config
) -> None:
    model = build_model(tiny_data, make_config("invrl"), 1e-4)
    torch.testing.assert_close(model.mask(), torch.full_like(model.mask(), 0.5))  # mu = 0 at init
    with torch.no_grad():
        model.gate.mu.copy_(2 * torch.randn(model.gate.mu.shape, generator=torch.Generator().manual_seed(0)))
    mask = model.mask()
    assert (mask >= 0).all() and (mask <= 1).all() and (mask == 0).any() and (mask == 1).any()
    model.train()
    assert not torch.equal(model.gate(), model.gate())  # stochastic gates in training ...
    model.eval()
    assert torch.equal(model.gate(), mask) and torch.equal(model.gate(), model.gate())  # ... not for inference
    torch.testing.assert_close(model.get_embedding()[1][:, 16:], model.projection(model.features * mask))

    model = _perturbed(build_model(tiny_data, make_config("invrl"), 1e-4)).train()
    users, pos, neg = _batch(tiny_data)
    loss, penalty = model.invariance(users, pos, neg, torch.zeros_like(users))
    assert penalty.item() == 0.0  # one environment: nothing to vary over
    environments = (users % 2).long()
    torch.manual_seed(0)
    loss, penalty = model.invariance(users, pos, neg, environments)
    assert penalty.item() > 0
    # The loss is the mean of the environments' BPR losses (same gate draw).
    torch.manual_seed(0)
    u, gate = model.user(users), model.gate()
    p, n = model.items(pos, gate), model.items(neg, gate)
    per_env = [bpr_loss((u * p).sum(-1)[environments == e], (u * n).sum(-1)[environments == e]) for e in (0, 1)]
    torch.testing.assert_close(loss, torch.stack(per_env).mean())
    penalty.backward()  # the penalty trains the mask (through the gates) and the projection
    assert model.gate.mu.grad.abs().sum() > 0 and model.projection.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert model.invariance(users, pos, neg, environments)[1].item() == 0.0  # no autograd: no penalty


def test_invrl_environments_partition_the_training_pairs(tiny_data: RecData, make_config) -> None:
    config = make_config("invrl", invrl_envs=3, invrl_refresh_epochs=1)
    model = build_model(tiny_data, config, 1e-4)
    pairs = torch.from_numpy(tiny_data.train)
    keys = torch.unique(pairs[:, 0] * tiny_data.n_items + pairs[:, 1])
    assert model.environment.shape == keys.shape and set(model.environment.tolist()) == {0, 1, 2}
    found = model.environment_of(keys // tiny_data.n_items, keys % tiny_data.n_items)
    assert torch.equal(found, model.environment)
    before = model.environment.clone()
    moved = model.learn_environments()
    assert moved >= int((model.environment != before).sum())  # every move counted, across iterations
    assert len(model.environment.unique()) >= 2 and model.environment.max() < 3
    # The trainer's loop re-learns them at the start of every invrl_refresh_epochs-th epoch, 3 rounds.
    model = build_model(tiny_data, config, 1e-4).train()
    users, pos, neg = (torch.from_numpy(a) for a in next(BPRSampler(tiny_data.train, tiny_data.n_items, 10**6).epoch()))
    rounds = []
    for _ in range(5):
        model.on_epoch_start()
        model.calculate_loss(users, pos, neg)  # one whole epoch per call
        rounds.append(model._rounds_done)
    assert rounds == [0, 1, 2, 3, 3]


@pytest.mark.parametrize("name", ["grcn", "lattice", "invrl"])
def test_inference_is_deterministic(tiny_data: RecData, make_config, name: str) -> None:
    dropout = {"edge_dropout": 0.3} if name == "grcn" else {}  # GRCN drops edges in training only
    model = _perturbed(build_model(tiny_data, make_config(name, **dropout), 1e-4))
    first, second = model.get_embedding(), model.get_embedding()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
