"""New items of the built-in synthetic set, ranked per fusion group: which ways of carrying an item's latent
factor in its content a model learns to rank items by when it has only their content.

The generator (:mod:`training.synthetic`) puts every item in one fusion group: its latent factor lives in one
modality only, is split across the modalities, or (the last group) is the elementwise product of a factor in
the first modality and one in the second, which a static linear fusion cannot express. Under the cold-item
protocol (:mod:`training.coldstart`) a model is trained on the warm items, and each test interaction with a
held-out item is ranked among the held-out items (the user's validation held-out items masked, as the
protocol's test does); the hit rate at k per group is the share of those interactions whose item reaches the
user's top k.

:func:`content_learnability` asks the question without a recommender: learners fit the warm items' *true*
latent factor from their content, and the held-out items' predicted factors are ranked with the generator's
true user vectors. :func:`embedding_probe` asks how much of the true factor a trained model's item embeddings
hold, per group: what a content path trained to match them could learn at best.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from models.metammf.fusion import MetaFusionNetwork
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


def require_synthetic(cfg: RunConfig) -> None:
    """The fusion groups are known for the built-in synthetic data only."""
    if cfg.data.path is not None:
        raise ValueError("cold-groups needs the built-in synthetic data (its fusion groups are known)")


@dataclass(frozen=True)
class GroupScores:
    """One trained model's view of the fusion groups: ``hit_rates`` of its held-out items (see
    :func:`hit_rate_by_group`) and ``probe_r2``, the share of the true latent factor a linear map from its trained
    item embeddings recovers (:func:`embedding_probe`)."""

    hit_rates: list[float]
    probe_r2: list[float]


def embedding_probe(embeddings: np.ndarray, latent: np.ndarray, item_group: np.ndarray, n_groups: int,
                    folds: int = 5, ridge: float = 1e-3) -> list[float]:  # fmt: skip
    """Per group, R^2 of the true latent factors ``latent`` (n, d) predicted from item ``embeddings`` (n, e) by
    one ridge regression fit on the other folds (all groups together, as a content path fit to the embeddings
    would be); NaN for an empty group."""
    fold = np.random.default_rng(0).permutation(len(embeddings)) % folds
    x = np.concatenate([embeddings, np.ones((len(embeddings), 1))], axis=1).astype(np.float64)
    predicted = np.zeros_like(latent, dtype=np.float64)
    for f in range(folds):
        fit, held = fold != f, fold == f
        coef = np.linalg.solve(x[fit].T @ x[fit] + ridge * np.eye(x.shape[1]), x[fit].T @ latent[fit])
        predicted[held] = x[held] @ coef
    r2 = []
    for g in range(n_groups):
        rows = item_group == g
        truth = latent[rows]
        spread = ((truth - truth.mean(0)) ** 2).sum()
        r2.append(float(1 - ((predicted[rows] - truth) ** 2).sum() / spread) if rows.any() else float("nan"))
    return r2


def cold_group_scores(cfg: RunConfig, k: int = 20) -> GroupScores:
    """Train ``cfg`` (built-in synthetic data, the cold-item protocol); its hit rate at ``k`` per fusion group
    and the probe of its trained (warm) item embeddings."""
    require_synthetic(cfg)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"protocol": "cold_items"})})
    data, truth = generate_synthetic_with_truth(cfg.data.synthetic)
    split = split_for(cfg, data)
    result = train_protocol(cfg, data)
    model = result.model.eval()
    with torch.no_grad():
        users, warm = model.get_embedding()
        items = cold_item_embeddings(model, torch.from_numpy(split.cold_item_features()).to(users.device))
        scores = (users @ items.T).cpu().numpy()
    n_groups = cfg.data.synthetic.n_groups
    hits = hit_rate_by_group(scores, split, truth["group"][split.cold_items], n_groups, k)
    probe = embedding_probe(warm.float().cpu().numpy(), truth["latent"][split.warm_items],
                            truth["group"][split.warm_items], n_groups)  # fmt: skip
    return GroupScores(hits, probe)


# --------------------------------------------------------------------------------------------------
# Learnability: content -> the true latent factor, no recommender
# --------------------------------------------------------------------------------------------------

TRUE_FACTOR = "true latent factor"


def content_learners(in_dim: int, out_dim: int) -> dict[str, nn.Module | None]:
    """The learners :func:`content_learnability` compares: ridge regression (``None``: closed form), the project's
    MetaMMF fusion network (one item-specific layer, as the served default) at the paper's d_s = 5 and at
    d_s = 16, and a two-layer ReLU MLP as a generic non-linear reference."""
    mlp = nn.Sequential(nn.Linear(in_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, out_dim))
    return {
        "ridge regression": None,
        "MetaMMF fusion network, d_s 5, rank 16": MetaFusionNetwork(in_dim, out_dim, meta_dim=5, rank=16),
        "MetaMMF fusion network, d_s 16, rank 32": MetaFusionNetwork(in_dim, out_dim, meta_dim=16, rank=32),
        "MLP (2 x 256, ReLU)": mlp,
    }


def fit_regression(model: nn.Module, x: Tensor, y: Tensor, seed: int, epochs: int = 300, patience: int = 20) -> None:
    """Mean squared error, Adam, batches of 256; stops when a held-back tenth of the rows has not improved for
    ``patience`` epochs and keeps the best state."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    held, fit = order[: len(x) // 10], order[len(x) // 10 :]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    best, best_state, since = float("inf"), None, 0
    for _ in range(epochs):
        model.train()
        for batch in fit[torch.randperm(len(fit), generator=gen)].split(256):
            loss = ((model(x[batch]) - y[batch]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            held_loss = float(((model(x[held]) - y[held]) ** 2).mean())
        if held_loss < best:
            best, best_state, since = held_loss, {n: t.clone() for n, t in model.state_dict().items()}, 0
        elif (since := since + 1) >= patience:
            break
    model.load_state_dict(best_state)


def content_learnability(cfg: RunConfig, seed: int, k: int = 20) -> dict[str, list[float]]:
    """Per learner of :func:`content_learners`, the hit rate at ``k`` per fusion group of the held-out items
    (``cfg``'s cold-item split of the built-in synthetic data) when each learner, fit on the warm items' content
    and *true* latent factors, predicts the held-out items' factors and the generator's true user vectors rank
    them; the first row ranks the true factors themselves. ``seed`` seeds the learners' initialisation."""
    require_synthetic(cfg)
    data, truth = generate_synthetic_with_truth(cfg.data.synthetic)
    split = split_for(cfg, data)
    warm_x, cold_x = (torch.from_numpy(x).float() for x in split.standardized_features())
    warm_z = torch.from_numpy(truth["latent"][split.warm_items])
    users = truth["user_latent"]
    groups, n_groups = truth["group"][split.cold_items], cfg.data.synthetic.n_groups

    def rates(cold_z: np.ndarray) -> list[float]:
        return hit_rate_by_group((users @ cold_z.T).astype(np.float32), split, groups, n_groups, k)

    out = {TRUE_FACTOR: rates(truth["latent"][split.cold_items])}
    torch.manual_seed(seed)
    for name, learner in content_learners(warm_x.shape[1], warm_z.shape[1]).items():
        if learner is None:
            x = warm_x.double()
            coef = torch.linalg.solve(x.T @ x + 10.0 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ warm_z.double())
            predicted = (cold_x.double() @ coef).float()
        else:
            fit_regression(learner, warm_x, warm_z, seed)
            with torch.no_grad():
                predicted = learner(cold_x)
        out[name] = rates(predicted.numpy())
    return out
