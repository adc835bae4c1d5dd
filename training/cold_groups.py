"""New items of the built-in synthetic set, ranked per fusion group: which ways of carrying an item's latent
factor in its content a model learns to rank items by when it has only their content.

The generator (:mod:`training.synthetic`) puts every item in one fusion group: its latent factor lives in one
modality only, is split across the modalities, or (the last group) is the elementwise product of a factor in
the first modality and one in the second, which a static linear fusion cannot express. Under the cold-item
protocol (:mod:`training.coldstart`) a model is trained on the warm items, and each test interaction with a
held-out item is ranked among the held-out items (the user's validation held-out items masked, as the
protocol's test does); the hit rate at k per group is the share of those interactions whose item reaches the
user's top k.
"""

from __future__ import annotations

import numpy as np
import torch

from training.coldstart import ColdItemSplit, cold_item_embeddings, split_for, train_protocol
from training.config import RunConfig
from training.synthetic import generate_synthetic_with_truth


def group_names(modalities: list[str], n_groups: int) -> list[str]:
    """The generator's group patterns, in its order (training/synthetic.py)."""
    names = [f"{m} only" for m in modalities] + ["split across all", f"product of {' and '.join(modalities[:2])}"]
    return names[:n_groups]


def hit_rate_by_group(
    scores: np.ndarray, split: ColdItemSplit, item_group: np.ndarray, n_groups: int, k: int = 20
) -> list[float]:
    """Per group, the share of the split's test interactions whose held-out item ranks in the user's top ``k``
    among the held-out items. ``scores`` (n_users, n_cold) user x held-out item scores (changed in place: the
    user's validation held-out items are masked); ``item_group`` the group of each held-out item. NaN for a
    group without test interactions."""
    valid = split.valid
    scores[valid[:, 0], valid[:, 1]] = -np.inf
    users, items = split.test[:, 0], split.test[:, 1]
    target = scores[users, items]
    rank = (scores[users] > target[:, None]).sum(1)
    groups = item_group[items]
    return [float(np.mean(rank[groups == g] < k)) if np.any(groups == g) else float("nan") for g in range(n_groups)]


def cold_hit_rates(cfg: RunConfig, k: int = 20) -> list[float]:
    """Train ``cfg`` (built-in synthetic data, the cold-item protocol) and return its hit rate at ``k`` per
    fusion group."""
    if cfg.data.path is not None:
        raise ValueError("cold-groups needs the built-in synthetic data (its fusion groups are known)")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"protocol": "cold_items"})})
    data, truth = generate_synthetic_with_truth(cfg.data.synthetic)
    split = split_for(cfg, data)
    result = train_protocol(cfg, data)
    model = result.model.eval()
    with torch.no_grad():
        users = model.get_embedding()[0]
        items = cold_item_embeddings(model, torch.from_numpy(split.cold_item_features()).to(users.device))
        scores = (users @ items.T).cpu().numpy()
    n_groups = cfg.data.synthetic.n_groups
    return hit_rate_by_group(scores, split, truth["group"][split.cold_items], n_groups, k)
