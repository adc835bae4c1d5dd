"""MetaMMF_MF / MetaMMF_GCN on a tiny synthetic data set, and the inductive InferenceEncoder."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.base import ModelInputs, RecModel
from models.config import ModelConfig
from models.graph.csr import csr_matmul
from models.graph.utils import bipartite_edge_index
from models.metammf.gcn import MetaMMF_GCN
from models.metammf.inference import InferenceEncoder, item_states
from models.metammf.mf import MetaMMF_MF
from tests.training_support import perturb
from training.data import RecData
from training.sampling import BPRSampler
from training.trainer import build_model

MODEL_NAMES = ["metammf_mf", "metammf_gcn", "metammf_lightgcn"]


def make_model(data: RecData, config, seed: int = 0) -> RecModel:
    torch.manual_seed(seed)
    return build_model(data, config, reg_weight=1e-4)


def user_items(pairs: np.ndarray, user: int) -> np.ndarray:
    return np.unique(pairs[pairs[:, 0] == user, 1])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loss_finite_and_decreasing(tiny_data: RecData, make_config, name: str) -> None:
    model = make_model(tiny_data, make_config(name))
    sampler = BPRSampler(tiny_data.train, tiny_data.n_items, batch_size=len(tiny_data.train), seed=0)
    users, pos, neg = (torch.from_numpy(a) for a in next(sampler.epoch()))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    losses = []
    for _ in range(30):
        loss = model.calculate_loss(users, pos, neg)
        assert loss.ndim == 0 and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert 0.3 < losses[0] < 2.0  # small scores at init: BPR near ln 2
    assert losses[-1] < 0.8 * losses[0]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradients_reach_the_fusion_network(tiny_data: RecData, make_config, name: str) -> None:
    model = make_model(tiny_data, make_config(name))
    users, pos, neg = (torch.from_numpy(a[:64]) for a in next(BPRSampler(tiny_data.train, 150).epoch()))
    model.calculate_loss(users, pos, neg).backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None, param_name
        assert torch.isfinite(p.grad).all(), param_name
    assert any(p.grad.abs().sum() > 0 for p in model.items.fusion.layers.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_full_sort_predict_and_cache(tiny_data: RecData, make_config, name: str) -> None:
    model = make_model(tiny_data, make_config(name))
    perturb(model)
    model.eval()
    user_emb, item_emb = model.get_embedding()
    d = make_config(name).embedding_dim
    assert user_emb.shape == (tiny_data.n_users, d) and item_emb.shape == (tiny_data.n_items, d)
    users = torch.tensor([0, 5, 17, 199, 5])
    expected = user_emb[users] @ item_emb.T
    scores = model.full_sort_predict(users)
    assert scores.shape == (len(users), tiny_data.n_items)
    torch.testing.assert_close(scores, expected)

    model.prepare_inference()
    assert model._cache is not None
    torch.testing.assert_close(model.full_sort_predict(users), expected)
    # The cache really is used: parameter changes are invisible until it is cleared...
    # (MF's cached user embeddings alias the parameter itself, so change the fusion weights.)
    with torch.no_grad():
        model.items.fusion.layers[0].weight.mul_(3.0)
    torch.testing.assert_close(model.full_sort_predict(users), expected)
    # ... and train() (or eval(), which calls train(False)) clears it.
    model.train()
    assert model._cache is None
    model.eval()
    fresh_user, fresh_item = model.get_embedding()
    torch.testing.assert_close(model.full_sort_predict(users), fresh_user[users] @ fresh_item.T)
    assert not torch.allclose(model.full_sort_predict(users), expected)
    model.prepare_inference()
    model.clear_inference_cache()
    assert model._cache is None


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_recommend_excludes_and_ranks(tiny_data: RecData, make_config, name: str) -> None:
    model = make_model(tiny_data, make_config(name)).eval()
    users = torch.arange(10)
    scores = model.full_sort_predict(users)
    exclude = scores >= scores.median(dim=1, keepdim=True).values  # mask the better half
    top = model.recommend(users, 5, exclude)
    assert top.shape == (10, 5)
    assert not exclude.gather(1, top).any()
    masked = scores.masked_fill(exclude, float("-inf"))
    torch.testing.assert_close(scores.gather(1, top), masked.topk(5).values)


def test_gcn_graph_uses_only_training_edges(tiny_data: RecData, make_config) -> None:
    config = make_config("metammf_gcn")
    model = make_model(tiny_data, config).eval()
    n_users = tiny_data.n_users
    edges = model.edge_index.T.numpy()
    train_set = {(u, i) for u, i in tiny_data.train.tolist()}
    assert len(edges) == 2 * len(train_set)
    for a, b in edges.tolist():
        u, i = (a, b - n_users) if a < n_users else (b, a - n_users)
        assert (u, i) in train_set
    assert not any((u, i) in train_set for u, i in tiny_data.test.tolist())

    # Different valid/test splits (same train) -> the same embeddings.
    rng = np.random.default_rng(0)
    other = dataclasses.replace(
        tiny_data,
        valid=np.stack([rng.integers(0, n_users, 50), rng.integers(0, tiny_data.n_items, 50)], 1),
        test=tiny_data.valid,
    )
    base_u, base_i = model.get_embedding()
    other_u, other_i = make_model(other, config).eval().get_embedding()
    torch.testing.assert_close(other_u, base_u, atol=0, rtol=0)
    torch.testing.assert_close(other_i, base_i, atol=0, rtol=0)

    # Sanity: the embeddings do depend on the training edges.
    more_train = dataclasses.replace(tiny_data, train=np.concatenate([tiny_data.train, tiny_data.test]))
    changed_u, _ = make_model(more_train, config).eval().get_embedding()
    assert not torch.allclose(changed_u, base_u)


def test_bipartite_edge_index_deduplicates_and_is_symmetric() -> None:
    pairs = torch.tensor([[0, 1], [0, 1], [1, 0], [2, 2]])
    edge_index = bipartite_edge_index(pairs, n_users=3, n_items=3)
    assert {tuple(e) for e in edge_index.T.tolist()} == {(0, 4), (4, 0), (1, 3), (3, 1), (2, 5), (5, 2)}
    assert edge_index.shape[1] == 6


@pytest.mark.parametrize("combine", ["mean", "last"])
def test_gcn_node_update_reproduces_graph_layers(tiny_data: RecData, make_config, combine: str) -> None:
    model = make_model(tiny_data, make_config("metammf_gcn", gcn_layers=2, layer_combine=combine))
    perturb(model)
    model.eval()
    with torch.no_grad():
        states, item_ego = model.layer_states()
        user_emb, item_emb = model.get_embedding()
    n_users = tiny_data.n_users
    assert len(states) == 3
    torch.testing.assert_close(states[0][n_users:], item_ego)
    torch.testing.assert_close(states[0][:n_users], model.user_embedding.weight.detach())
    expected_final = states[-1] if combine == "last" else torch.stack(states).mean(0)
    torch.testing.assert_close(torch.cat([user_emb, item_emb]), expected_final)
    train = tiny_data.train
    with torch.no_grad():
        user_nodes = [(u, torch.from_numpy(user_items(train, u)) + n_users) for u in (0, 7, 42, 199)]
        item_nodes = [  # item nodes aggregate their users
            (n_users + i, torch.from_numpy(np.unique(train[train[:, 1] == i, 0])))
            for i in np.unique(train[:, 1])[:4].tolist()
        ]
        for node, neigh in user_nodes + item_nodes:
            for layer in range(2):
                own, neighbor_mean = states[layer][node : node + 1], states[layer][neigh].mean(0, keepdim=True)
                h = model.graph.node_update(layer, own, neighbor_mean)
                torch.testing.assert_close(h[0], states[layer + 1][node], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activate_last", [True, False])
def test_sage_tower_matches_pyg_sageconv_values_and_gradients(tiny_data: RecData, make_config, activate_last) -> None:
    """The tower's fast aggregation (precomputed CSR and transpose) computes exactly PyG's SAGEConv,
    forward and backward, on the model's own training graph."""
    from torch_geometric.utils import to_torch_csr_tensor

    model = make_model(tiny_data, make_config("metammf_gcn", gcn_layers=3, activate_last=activate_last))
    perturb(model)
    n = model.n_users + model.n_items
    adj_t = to_torch_csr_tensor(model.edge_index.flip(0), size=(n, n))
    x = torch.randn(n, model.config.embedding_dim, requires_grad=True)
    ours = model.graph(x, model._adjacency())
    reference = [x]
    for layer, conv in enumerate(model.graph.convs):
        reference.append(model.graph._activate(layer, conv(reference[-1], adj_t)))
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    weights = torch.randn(n, model.config.embedding_dim)
    grads = [torch.autograd.grad((model.graph.combine(states) * weights).sum(), [x, *model.graph.weights()])
             for states in (ours, reference)]  # fmt: skip
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("combine", "gcn_layers", "activate_last", "sage_bias"),
    [("mean", 2, True, True), ("last", 2, True, True), ("mean", 3, False, False), ("last", 1, False, True),
     ("mean", 1, True, False)],
)  # fmt: skip
def test_final_rows_equals_full_propagation(
    tiny_data: RecData, make_config, combine: str, gcn_layers: int, activate_last: bool, sage_bias: bool
) -> None:
    """The training shortcut (last layer only for the batch's nodes, repeated rows allowed, the
    hand-written backward of models/graph/sage_rows.py) gives the same embeddings and gradients as
    propagating everything with autograd and indexing."""
    config = make_config(
        "metammf_gcn", gcn_layers=gcn_layers, layer_combine=combine, activate_last=activate_last, sage_bias=sage_bias
    )
    model = make_model(tiny_data, config)
    perturb(model)
    x, _, aggregate = model._graph_input()
    rows = torch.tensor([0, 5, 5, 199, model.n_users + 3, model.n_users + 3, model.n_users + 149])
    fast = model.graph.final_rows(x, aggregate, rows)
    full = model.graph.combine(model.graph(x, aggregate))[rows]
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-5)
    weights = torch.randn(full.shape)  # a loss that weighs every output differently
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), params, allow_unused=True, retain_graph=True),
                    torch.autograd.grad((full * weights).sum(), params, allow_unused=True), strict=True):  # fmt: skip
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("combine", ["mean", "last"])
def test_sage_rows_backward_passes_gradcheck(combine: str) -> None:
    """The hand-written backward pass against finite differences (float64, a small random graph with an
    isolated node, repeated and isolated rows, a negative pre-activation range)."""
    from models.graph.sage_rows import TowerSettings, sage_rows
    from models.graph.utils import MeanAggregation

    generator = torch.Generator().manual_seed(0)
    n, dim = 9, 3
    edges = torch.tensor([[0, 1, 1, 2, 3, 4, 5, 6, 6], [4, 4, 5, 6, 7, 1, 2, 0, 3]])
    aggregate = MeanAggregation(torch.cat([edges, edges.flip(0)], 1), n)  # node 8 has no neighbours
    matrix, transposed = (m.to(torch.float64) for m in (aggregate.matrix, aggregate.transposed))
    x = torch.randn(n, dim, dtype=torch.float64, generator=generator, requires_grad=True)
    weights = [
        torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True) if shape else None
        for _ in range(2) for shape in ((dim, dim), (dim,), (dim, dim))
    ]  # fmt: skip
    weights[4] = None  # the second layer without a bias
    rows = torch.tensor([0, 4, 7, 8])

    def run(x, *params):
        it = iter(params)
        flat = [w if w is None else next(it) for w in weights]
        return sage_rows(x, matrix, transposed, rows, TowerSettings(0.2, True, combine == "mean"), flat)

    assert torch.autograd.gradcheck(run, (x, *(w for w in weights if w is not None)))


@pytest.mark.parametrize("combine", ["mean", "last"])
def test_final_rows_in_bf16_autocast_computes_the_tower_in_bfloat16(
    tiny_data: RecData, make_config, combine: str
) -> None:
    """Under bf16 autocast on CPU the hand-written tower runs in bfloat16 (one cast in, one out): float32
    result and gradients, close to float32's (bfloat16 keeps 8 bits of mantissa), and different from them, so
    the products did run in bfloat16."""
    model = make_model(tiny_data, make_config("metammf_gcn", gcn_layers=3, layer_combine=combine))
    perturb(model)
    x, _, aggregate = model._graph_input()
    rows = torch.tensor([0, 5, 5, 199, model.n_users + 3, model.n_users + 149])
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(len(rows), x.shape[1])
    results = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.graph.final_rows(x, aggregate, rows)
        grads = torch.autograd.grad((out * weights).sum(), params, allow_unused=True, retain_graph=True)
        results.append((out, [g for g in grads if g is not None]))
    (out32, grads32), (out16, grads16) = results
    assert out16.dtype == torch.float32 and {g.dtype for g in grads16} == {torch.float32}
    assert not torch.equal(out16, out32)
    torch.testing.assert_close(out16, out32, atol=0.02 * out32.abs().max().item(), rtol=0.05)
    for a, b in zip(grads16, grads32, strict=True):
        assert (a - b).norm() <= 0.05 * b.norm()


def _set_row_to_mean_of_others(weight: torch.Tensor, row: int) -> None:
    """After this the mean over all rows equals the row itself."""
    with torch.no_grad():
        others = torch.cat([weight[:row], weight[row + 1 :]])
        weight[row] = others.mean(0)


def _graph_variants() -> list:
    """GCN settings the InferenceEncoder must mirror (fields missing from ModelConfig are skipped)."""
    variants = [
        pytest.param({}, id="default"),
        pytest.param({"layer_combine": "last", "gcn_layers": 3}, id="last-3layers"),
        pytest.param({"sage_bias": False}, id="no-bias"),
    ]  # fmt: skip
    if "activate_last" in ModelConfig.model_fields:
        variants.append(pytest.param({"activate_last": False}, id="linear-last"))
    return variants


GRAPH_VARIANTS = pytest.mark.parametrize("variant", _graph_variants())


@GRAPH_VARIANTS
def test_encode_user_matches_graph_for_a_mean_user(tiny_data: RecData, make_config, variant: dict) -> None:
    """A training user whose h^0 is the mean user embedding gets exactly its graph embedding from
    encode_user with the states of its training items."""
    config = make_config("metammf_gcn", **{"gcn_layers": 2, **variant})
    model = make_model(tiny_data, config)
    perturb(model)
    user = 11
    _set_row_to_mean_of_others(model.user_embedding.weight, user)
    model.eval()
    encoder = InferenceEncoder.from_model(model)
    assert encoder.n_states == config.gcn_layers + 1
    torch.testing.assert_close(encoder.mean_user, model.user_embedding.weight[user].detach())
    states = item_states(model)
    assert states.shape == (config.gcn_layers + 1, tiny_data.n_items, config.embedding_dim)
    user_emb, _ = model.get_embedding()
    items = torch.from_numpy(user_items(tiny_data.train, user))
    torch.testing.assert_close(encoder.encode_user(states[:, items]), user_emb[user].detach(), atol=1e-5, rtol=1e-5)
    # Other users (h^0 != mean) get something else from the same items.
    assert not torch.allclose(encoder.encode_user(states[:, items]), user_emb[user + 1].detach(), atol=1e-3)


@GRAPH_VARIANTS
def test_encode_items_matches_isolated_item_node(tiny_data: RecData, make_config, variant: dict) -> None:
    """A brand-new item (no edges) gets the same embedding from the encoder as from the full graph."""
    new = tiny_data.n_items - 1
    train = tiny_data.train[tiny_data.train[:, 1] != new]
    assert len(train) < len(tiny_data.train)  # the item did have training interactions
    features = torch.from_numpy(tiny_data.item_features())
    torch.manual_seed(0)
    inputs = ModelInputs(tiny_data.n_users, features, tiny_data.modality_dims, torch.from_numpy(train))
    model = MetaMMF_GCN(inputs, make_config("metammf_gcn", **variant))
    perturb(model)
    _set_row_to_mean_of_others(model.items.id_embedding.weight, new)
    model.eval()
    encoder = InferenceEncoder.from_model(model)
    _, item_emb = model.get_embedding()
    graph_states = item_states(model)
    emb, states = encoder.encode_items(features[new:])  # raw features: the encoder normalises
    torch.testing.assert_close(emb[0], item_emb[new].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[:, 0], graph_states[:, new], atol=1e-5, rtol=1e-5)
    # A connected item differs from its isolated encoding (message passing matters).
    emb_0, _ = encoder.encode_items(features[:1])
    assert not torch.allclose(emb_0[0], item_emb[0].detach(), atol=1e-3)


def test_mf_inference_encoder(tiny_data: RecData, make_config) -> None:
    model = make_model(tiny_data, make_config("metammf_mf"))
    perturb(model)
    model.eval()
    encoder = InferenceEncoder.from_model(model)
    assert encoder.graph is None and encoder.n_states == 1
    features = torch.from_numpy(tiny_data.item_features()[:7])
    emb, states = encoder.encode_items(features)
    mean_id = model.items.id_embedding.weight.mean(0).detach()
    expected = torch.cat([model.items.fusion(features).detach(), mean_id.expand(7, -1)], dim=1)
    torch.testing.assert_close(emb, expected)
    torch.testing.assert_close(states, expected.unsqueeze(0))
    assert torch.equal(emb, model.new_item_embeddings(model.items.fusion(features)).detach())
    # The fused part of existing items equals their trained embedding's fused part.
    fused_dim = make_config().fused_dim
    _, item_emb = model.get_embedding()
    torch.testing.assert_close(emb[:, :fused_dim], item_emb[:7, :fused_dim].detach())
    # MF users: the mean of the items' embeddings.
    all_states = item_states(model)
    torch.testing.assert_close(encoder.encode_user(all_states[:, :3]), item_emb[:3].detach().mean(0))
    with pytest.raises(TypeError):
        InferenceEncoder.from_model(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_models_are_the_right_types(tiny_data: RecData, make_config) -> None:
    assert isinstance(make_model(tiny_data, make_config("metammf_mf")), MetaMMF_MF)
    assert isinstance(make_model(tiny_data, make_config("metammf_gcn")), MetaMMF_GCN)


def test_unique_rows_equals_torch_unique() -> None:
    from models.metammf.gcn import _unique_rows

    rows = torch.tensor([7, 0, 7, 3, 9, 0, 3, 3])
    expected = rows.unique(return_inverse=True)
    for a, b in zip(_unique_rows(rows, 10), expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_csr_matmul_equals_the_dense_product(dtype: torch.dtype) -> None:
    # Empty rows (a node without neighbours), a repeated column, an input that requires grad and a strided one.
    generator = torch.Generator().manual_seed(0)
    dense = torch.rand(7, 9, generator=generator, dtype=dtype) * (torch.rand(7, 9, generator=generator) < 0.4)
    dense[[0, 4]] = 0
    matrix = dense.to_sparse_csr()
    x = torch.randn(5, 9, generator=generator, dtype=dtype).t().requires_grad_()
    product = csr_matmul(matrix, x)
    assert product.dtype == dtype and product.shape == (7, 5) and not product.requires_grad
    torch.testing.assert_close(product, dense @ x.detach())
    assert product[[0, 4]].eq(0).all()
    # bf16 input (as under autocast) is multiplied in the matrix's dtype
    torch.testing.assert_close(csr_matmul(matrix, x.detach().bfloat16()), dense @ x.detach().bfloat16().to(dtype))


@pytest.mark.parametrize("name", ["metammf_mf", "metammf_lightgcn"])
def test_feature_dropout_acts_in_training_only(tiny_data: RecData, make_config, name: str) -> None:
    """``feature_dropout`` zeroes fusion inputs in training (each step its own draw); evaluation, and so
    the exported artifact and the service, fuse the features whole."""
    torch.manual_seed(0)
    plain = build_model(tiny_data, make_config(name), 1e-4)
    torch.manual_seed(0)
    dropped = build_model(tiny_data, make_config(name, feature_dropout=0.5), 1e-4)
    for model in (plain, dropped):
        model.eval()
    torch.testing.assert_close(plain.items(), dropped.items())
    plain.train(), dropped.train()
    torch.testing.assert_close(plain.items(), plain.items())
    first, second = dropped.items(), dropped.items()
    fused = first.shape[1] - dropped.items.id_embedding.embedding_dim
    assert not torch.allclose(first[:, :fused], second[:, :fused])
    torch.testing.assert_close(first[:, fused:], second[:, fused:])  # the ID embeddings are untouched
    expected = dropped.items.fusion.fuse_standardized(dropped.items.item_inputs)
    assert not torch.allclose(first[:, :fused], expected)
