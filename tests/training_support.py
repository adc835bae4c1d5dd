"""Helpers of the training tests that need no service packages (the CUDA tests run with these alone)."""

from __future__ import annotations

import numpy as np
import torch

from models.base import RecModel
from training.data import RecData
from training.synthetic import SyntheticConfig

TINY = SyntheticConfig(n_users=200, n_items=150, modality_dims={"visual": 16, "acoustic": 16}, seed=0)
# The paper's settings for the model-level tests (the code's defaults are the served model's: new-item
# treatment and the item-item graph on, three layers); tests of those settings ask for them explicitly.
PAPER_SETTINGS = {
    "gcn_layers": 2,
    "item_graph_k": 0,
    "content_neighbors": 0,
    "content_residual": True,
    "untrained_items": "id",
    "isolated_nodes": "zeros",
    "cold_item_dropout": 0.0,
}
SMALL_MODEL = {"fused_dim": 16, "id_dim": 16, "rank": 8, "extractor_hidden": 32, "meta_dim": 5, **PAPER_SETTINGS}


def random_ranker_recall(data: RecData, k: int = 20) -> float:
    """Expected test recall@k of a uniformly random ranking over the items the evaluator ranks for the
    user (all but its train and valid items): k / (n_items - excluded) per reachable test item."""
    excluded: dict[int, set[int]] = {}
    for u, i in np.concatenate([data.train, data.valid]).tolist():
        excluded.setdefault(u, set()).add(i)
    targets: dict[int, set[int]] = {}
    for u, i in data.test.tolist():
        targets.setdefault(u, set()).add(i)
    recalls = []
    for u, items in targets.items():
        seen = excluded.get(u, set())
        ranked = data.n_items - len(seen)
        recalls.append(len(items - seen) / len(items) * min(k, ranked) / ranked)
    return float(np.mean(recalls))


def perturb(model: RecModel, seed: int = 1) -> None:
    """Move every parameter off its (possibly structured) init so equalities are not accidental."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def without_training_interactions(data: RecData, items: np.ndarray) -> RecData:
    """``data`` with every training interaction of ``items`` removed (they stay in the catalogue)."""
    train = data.train[~np.isin(data.train[:, 1], items)]
    return RecData(data.name, data.n_users, data.n_items, train, data.valid, data.test, data.features)
