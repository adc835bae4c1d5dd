"""Neighbour-sampled mini-batch training of MetaMMF_GCN: the sampler (real edges, fanout bounds,
uniformity), exactness with full fanouts, a short training run, and its configuration."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from models.graph.neighbor_sampling import NeighborSampler
from models.metammf.gcn import MetaMMF_GCN
from tests.training_support import random_ranker_recall
from training.cli import build_parser
from training.config import ConfigError, TrainConfig, load_run_config
from training.data import RecData
from training.synthetic import SyntheticConfig, generate_synthetic
from training.trainer import model_inputs, train


def _model(data: RecData, config, seed: int = 0) -> MetaMMF_GCN:
    torch.manual_seed(seed)
    return MetaMMF_GCN(model_inputs(data), config)


def _rows(model: MetaMMF_GCN, n: int = 60, seed: int = 0) -> torch.Tensor:
    """Random node rows with duplicates, users and items."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.n_users + model.n_items, (n,), generator=gen)


def _max_degree(model: MetaMMF_GCN) -> int:
    return int(torch.bincount(model.edge_index[1]).max())


# --------------------------------------------------------------------------------------------------
# Exactness with fanouts that cover every neighbour
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layers", "combine"), [(1, "mean"), (2, "mean"), (3, "last"), (3, "mean")])
@pytest.mark.parametrize("all_neighbours", ["-1", "max_degree"])
def test_full_fanouts_give_the_full_graph_embeddings(
    tiny_data: RecData, make_config, layers: int, combine: str, all_neighbours: str
) -> None:
    model = _model(tiny_data, make_config(gcn_layers=layers, layer_combine=combine, sage_init="residual")).eval()
    fanout = -1 if all_neighbours == "-1" else _max_degree(model)
    rows = _rows(model)
    with torch.no_grad():
        users, items = model.get_embedding()
        full = torch.cat([users, items])
        final, ego = model.sampled_rows(rows, [fanout] * layers)
        x, _, _ = model._graph_input()
    torch.testing.assert_close(final, full[rows], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ego, x[rows])


@pytest.mark.parametrize(
    "overrides", [{}, {"reg_target": "final", "layer_reg": 1e-3}, {"gcn_layers": 3, "layer_combine": "last"}]
)
def test_full_fanouts_give_the_full_graph_loss_and_gradients(tiny_data: RecData, make_config, overrides) -> None:
    config = make_config(**overrides)
    full, sampled = _model(tiny_data, config), _model(tiny_data, config)
    gen = torch.Generator().manual_seed(1)
    users = torch.from_numpy(tiny_data.train[:96, 0])
    pos = torch.from_numpy(tiny_data.train[:96, 1])
    neg = torch.randint(0, tiny_data.n_items, (96,), generator=gen)
    loss_full = full.calculate_loss(users, pos, neg)
    loss_sampled = sampled.calculate_sampled_loss(users, pos, neg, [-1] * config.gcn_layers)
    torch.testing.assert_close(loss_sampled, loss_full)
    loss_full.backward()
    loss_sampled.backward()
    for (name, p_full), (_, p_sampled) in zip(full.named_parameters(), sampled.named_parameters(), strict=True):
        torch.testing.assert_close(p_sampled.grad, p_full.grad, atol=1e-7, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------------
# The sampler with small fanouts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fanouts", [[3, 2], [1], [2, 2, 5]])
def test_small_fanouts_sample_real_edges_within_bounds(tiny_data: RecData, make_config, fanouts) -> None:
    model = _model(tiny_data, make_config(gcn_layers=len(fanouts)))
    sampler = model.neighbor_sampler()
    graph_edges = set(map(tuple, model.edge_index.t().tolist()))
    in_degree = torch.bincount(model.edge_index[1], minlength=sampler.num_nodes)
    rows = _rows(model, 80)
    sub = sampler.sample(rows, fanouts, torch.Generator().manual_seed(0))
    n_id = sub.n_id
    # Nodes: unique, the seeds first (hop 0), then by hop; seed_index maps every seed row.
    assert len(set(n_id.tolist())) == len(n_id) == sum(sub.hop_sizes)
    assert len(sub.hop_sizes) == len(fanouts) + 1
    assert set(n_id[: sub.hop_sizes[0]].tolist()) == set(rows.tolist())
    assert torch.equal(n_id[sub.seed_index], rows)
    # Every sampled edge is a training edge; no edge twice.
    source, target = n_id[sub.edge_index[0]], n_id[sub.edge_index[1]]
    sampled = list(zip(source.tolist(), target.tolist(), strict=True))
    assert set(sampled) <= graph_edges and len(set(sampled)) == len(sampled)
    # Nodes first reached at hop k < L get min(degree, fanouts[k]) in-edges, those at hop L none.
    hop_of = torch.repeat_interleave(torch.arange(len(sub.hop_sizes)), torch.tensor(sub.hop_sizes))
    counts = Counter(sub.edge_index[1].tolist())
    for local in range(len(n_id)):
        hop = int(hop_of[local])
        expected = 0 if hop == len(fanouts) else min(int(in_degree[n_id[local]]), fanouts[hop])
        assert counts.get(local, 0) == expected
    # Each node is reached through a sampled edge from the previous hop.
    for local in range(sub.hop_sizes[0], len(n_id)):
        parents = sub.edge_index[1][sub.edge_index[0] == local]
        assert (hop_of[parents] == hop_of[local] - 1).any()


def test_sampling_is_uniform_and_reproducible() -> None:
    hubs, leaves, fanout = 300, 12, 4  # hub h has leaves 300 + 12h .. 300 + 12h + 11
    hub = torch.arange(hubs).repeat_interleave(leaves)
    leaf = hubs + torch.arange(hubs * leaves)
    sampler = NeighborSampler(torch.stack([torch.cat([leaf, hub]), torch.cat([hub, leaf])]), hubs * (leaves + 1))
    frequency = torch.zeros(leaves)
    for draw in range(10):
        segment, neighbor = sampler.sample_neighbors(torch.arange(hubs), fanout, torch.Generator().manual_seed(draw))
        assert torch.equal(torch.bincount(segment, minlength=hubs), torch.full((hubs,), fanout))
        assert torch.equal((neighbor - hubs) // leaves, segment)  # a leaf of its own hub
        frequency += torch.bincount((neighbor - hubs) % leaves, minlength=leaves)
    # Each leaf is kept with probability fanout / leaves = 1/3; 3000 hub draws: sd ~ 0.009.
    share = frequency / (10 * hubs)
    assert torch.allclose(share, torch.full((leaves,), fanout / leaves), atol=0.04), share
    first = sampler.sample(torch.arange(5), [3, 3], torch.Generator().manual_seed(7))
    again = sampler.sample(torch.arange(5), [3, 3], torch.Generator().manual_seed(7))
    assert torch.equal(first.n_id, again.n_id) and torch.equal(first.edge_index, again.edge_index)
    assert (sampler._local == -1).all()  # the scratch map is left clean


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def test_neighbor_sampled_training_learns(make_config) -> None:
    data = generate_synthetic(
        SyntheticConfig(n_users=400, n_items=150, modality_dims={"visual": 16, "acoustic": 16}, seed=0)
    )
    cfg = TrainConfig(
        epochs=6, batch_size=512, lr=0.01, patience=100, progress=False, seed=7, neighbor_sampling=True, fanouts=[3, 3]
    )
    result = train(data, make_config("metammf_gcn", edge_dropout=0.1), cfg)
    losses = [h["loss"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    assert result.test.metrics["recall@20"] > 1.5 * random_ranker_recall(data)
    again = train(data, make_config("metammf_gcn", edge_dropout=0.1), cfg)
    assert [h["loss"] for h in again.history] == losses  # reproducible with the seed


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


GCN = ["model.name=metammf_gcn", "model.item_graph_k=0"]  # the model that samples, without the item graph


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=metammf_mf", "train.neighbor_sampling=true"], "needs model.name=metammf_gcn"),
        ([*GCN, "train.neighbor_sampling=true", "train.fanouts=[10]"], r"one fanout per GCN layer"),
        ([*GCN, "train.neighbor_sampling=true", "model.gcn_layers=3", "train.fanouts=[5, 5]"], "gcn_layers=3"),
        (["train.neighbor_sampling=true"], "needs model.name=metammf_gcn"),  # the default model has no sampler
        (["model.name=metammf_gcn", "train.neighbor_sampling=true"], "item_graph_k=10"),
        (["train.fanouts=[10, 0]"], "positive integers"),
        (["train.fanouts=[]"], "positive integers"),
        (["train.neighbor_sampling=maybe"], "neighbor_sampling"),
    ],
)
def test_invalid_sampling_configs(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_valid_sampling_configs_and_defaults() -> None:
    cfg = load_run_config(
        None, [*GCN, "train.neighbor_sampling=true", "model.gcn_layers=3", "train.fanouts=[10, 5, -1]"]
    )
    assert cfg.train.fanouts_for(3) == [10, 5, -1]
    assert load_run_config(None, [*GCN, "train.neighbor_sampling=true"]).train.fanouts_for(2) == [10, 10]
    assert load_run_config(None).train.neighbor_sampling is False


def test_train_rejects_sampling_for_the_mf_model(tiny_data: RecData, make_config) -> None:
    with pytest.raises(ConfigError, match="metammf_gcn"):
        train(tiny_data, make_config("metammf_mf"), TrainConfig(neighbor_sampling=True, progress=False))


def test_train_help_documents_scaling_out(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "torchrun --nproc_per_node" in text and "train.neighbor_sampling=true" in text
    assert "train.fanouts" in text
