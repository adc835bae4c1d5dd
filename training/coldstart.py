"""Cold-start item protocol (``data.protocol: cold_items``): items never seen in training, scored from content.

Split (:func:`cold_item_split`): a seeded ``cold_item_ratio`` share of all items (``round(ratio * n_items)``,
drawn with ``numpy.random.default_rng(cold_item_seed)``) is held out. Their interactions leave the
training set entirely; those that were in train are assigned to valid or test at random (same seed),
in the valid : test proportion of the data set; their valid/test interactions stay where they were.
The models are built and trained on the *warm* items only (re-indexed ``0..n_warm-1``), so held-out items
are neither positives nor sampled negatives, have no graph edges and do not enter the feature statistics.
Evaluation rows of users without any warm training interaction (cold users as well) are dropped.

Evaluation (:func:`cold_evaluator`): the common protocol of cold-start recommendation (e.g. DUIF,
CLCRec): each user with a held-out target is ranked against the held-out items *only* (full ranking
over the cold item set, the metrics of :mod:`training.evaluate`); when scoring test, the user's valid
cold items are masked, as in the warm protocol. Early stopping monitors the same cold valid metrics.

Scoring unseen items from content (:func:`cold_item_embeddings`, each model's ``embed_unseen_items``),
per model family:

* MetaMMF_MF / MetaMMF_GCN / MetaMMF_LightGCN and the static-fusion variants: ego ``[fusion(x_i) ; mean
  item ID embedding]`` (what :class:`models.metammf.inference.InferenceEncoder` serves); graph backbones then run
  their layers for a node without neighbours (``isolated``), with the content neighbours' states and the
  item-item content graph's term where the config turns them on;
* VBPR: ``[mean gamma_i ; E f_i ; mean beta_i + beta'^T f_i]``;
* GraphSAGE / GAT: the projected features through the layers as an isolated node (GAT: self loop only);
* MMGCN: per modality, the projected features with the mean item ID embedding as an isolated node;
* GRCN: ``[normalised mean item ID embedding ; f^1 ; ... ; f^M]``, an isolated node's representation;
* InvRL: ``[mean item ID embedding ; W (f * mask) + b]``;
* LATTICE: LightGCN's part of a node without edges plus the item-graph term of a row of S built for the item
  (its k nearest catalogue items per modality).

User embeddings are the trained model's final ones. Pure ID models (LightGCN, NGCF) cannot score items they
never saw: their :class:`~models.registry.ModelSpec` says so and the run config refuses them under this protocol
(:func:`check_cold_start_model`). The popularity ranker lives in :mod:`training.popularity`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from models.base import RecModel
from models.metammf.inference import InferenceEncoder
from models.registry import is_servable, unseen_items_problem
from training.data import DataError, RecData
from training.evaluate import EvalResult, full_rank_evaluate

if TYPE_CHECKING:
    from training.config import RunConfig, TrainConfig
    from training.trainer import TrainResult

PROTOCOLS = ("warm", "cold_items")


class ColdStartError(ValueError):
    """A model that cannot score items it never saw in training."""


def check_cold_start_model(name: str) -> None:
    """Raise :class:`ColdStartError` unless model ``name`` can score held-out items from content."""
    problem = unseen_items_problem(name)
    if problem:
        raise ColdStartError(f"{problem} (data.protocol=cold_items)")


@dataclass(frozen=True)
class ColdItemSplit:
    """The held-out split: ``warm`` trains the model, ``valid``/``test`` are (user, cold index) pairs.

    ``warm`` has every user, the warm items re-indexed in ``warm_items`` order, and the data's valid/test
    interactions with warm items (the warm half of model selection, :func:`cold_evaluator`);
    ``cold_features`` maps modality -> raw features of the held-out items in ``cold_items`` order.
    """

    warm: RecData
    warm_items: np.ndarray  # warm index -> original item id
    cold_items: np.ndarray  # cold index -> original item id
    valid: np.ndarray
    test: np.ndarray
    cold_features: dict[str, np.ndarray]
    dropped_cold_users: int = 0

    @property
    def n_cold(self) -> int:
        return len(self.cold_items)

    def cold_item_features(self) -> np.ndarray:
        """Concatenated raw features of the held-out items, modalities in the warm data's order."""
        return np.concatenate([self.cold_features[m] for m in self.warm.features], axis=1).astype(np.float32)

    def standardized_features(self) -> tuple[np.ndarray, np.ndarray]:
        """(warm, held-out) concatenated features, float64, standardised with the warm items' statistics: the
        inputs of the content baselines fit on the warm items."""
        warm = self.warm.item_features().astype(np.float64)
        cold = self.cold_item_features().astype(np.float64)
        mean, std = warm.mean(0), np.maximum(warm.std(0), 1e-6)
        return (warm - mean) / std, (cold - mean) / std


def cold_item_split(data: RecData, ratio: float = 0.2, seed: int = 0) -> ColdItemSplit:
    """Hold out ``round(ratio * n_items)`` items (seeded) from training; see the module docstring."""
    if not 0 < ratio < 1:
        raise ValueError(f"cold_item_ratio must be in (0, 1), got {ratio}")
    rng = np.random.default_rng(seed)
    n_cold = min(max(1, round(ratio * data.n_items)), data.n_items - 1)
    cold_items = np.sort(rng.permutation(data.n_items)[:n_cold]).astype(np.int64)
    is_cold = np.zeros(data.n_items, dtype=bool)
    is_cold[cold_items] = True
    warm_items = np.flatnonzero(~is_cold).astype(np.int64)
    cold_index = np.full(data.n_items, -1, dtype=np.int64)
    cold_index[cold_items] = np.arange(n_cold)
    warm_index = np.full(data.n_items, -1, dtype=np.int64)
    warm_index[warm_items] = np.arange(len(warm_items))

    train_cold = data.train[is_cold[data.train[:, 1]]]
    n_valid, n_test = len(data.valid), len(data.test)
    valid_share = n_valid / (n_valid + n_test) if n_valid + n_test else 0.5
    to_valid = rng.random(len(train_cold)) < valid_share
    valid = np.concatenate([data.valid[is_cold[data.valid[:, 1]]], train_cold[to_valid]])
    test = np.concatenate([data.test[is_cold[data.test[:, 1]]], train_cold[~to_valid]])

    train = data.train[~is_cold[data.train[:, 1]]]
    has_train = np.zeros(data.n_users, dtype=bool)
    has_train[train[:, 0]] = True
    warm_valid, warm_test = (pairs[~is_cold[pairs[:, 1]]] for pairs in (data.valid, data.test))
    dropped = np.unique(np.concatenate([valid[:, 0], test[:, 0]])[~has_train[np.r_[valid[:, 0], test[:, 0]]]])
    valid, test = valid[has_train[valid[:, 0]]], test[has_train[test[:, 0]]]
    for name, arr in (("valid", valid), ("test", test)):
        if len(arr) == 0:
            raise DataError(f"{data.name}: the cold-item {name} split is empty (ratio {ratio}, seed {seed})")

    def remap(pairs: np.ndarray, index: np.ndarray) -> np.ndarray:
        out = np.stack([pairs[:, 0], index[pairs[:, 1]]], axis=1).astype(np.int64)
        return np.ascontiguousarray(out[np.lexsort((out[:, 1], out[:, 0]))])

    empty = np.zeros((0, 2), dtype=np.int64)
    warm = RecData(
        name=data.name,
        n_users=data.n_users,
        n_items=len(warm_items),
        train=remap(train, warm_index),
        valid=remap(warm_valid, warm_index) if len(warm_valid) else empty,
        test=remap(warm_test, warm_index) if len(warm_test) else empty,
        features={m: np.ascontiguousarray(x[warm_items]) for m, x in data.features.items()},
        user_ids=data.user_ids,
        item_ids=None if data.item_ids is None else [data.item_ids[i] for i in warm_items],
    )
    return ColdItemSplit(
        warm=warm,
        warm_items=warm_items,
        cold_items=cold_items,
        valid=remap(valid, cold_index),
        test=remap(test, cold_index),
        cold_features={m: np.ascontiguousarray(x[cold_items]) for m, x in data.features.items()},
        dropped_cold_users=len(dropped),
    )


# --------------------------------------------------------------------------------------------------
# Content-only embeddings of held-out items
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def cold_item_embeddings(model: RecModel, features: Tensor) -> Tensor:
    """Final embeddings (n_cold, d) of items unseen in training from their raw features (n_cold, d_x): a
    servable model's through the service's own encoder (exactly what POST /items computes), any other
    through its :meth:`~models.base.RecModel.embed_unseen_items`."""
    features = features.float()
    model.eval()
    if is_servable(model.config.name):
        return InferenceEncoder.from_model(model).to(features.device).encode_items(features)[0]
    check_cold_start_model(model.config.name)
    return model.embed_unseen_items(features)


# --------------------------------------------------------------------------------------------------
# Evaluation and training under the protocol
# --------------------------------------------------------------------------------------------------


def evaluate_cold_scores(
    score_fn: Callable[[Tensor], Tensor],
    split: ColdItemSplit,
    which: str,
    ks: Sequence[int],
    batch_size: int = 2048,
    device: str | torch.device = "cpu",
) -> EvalResult:
    """Rank the held-out items for ``which`` ('valid' or 'test'); test masks the user's valid cold items."""
    targets = split.valid if which == "valid" else split.test
    exclude = [] if which == "valid" else [split.valid]
    return full_rank_evaluate(
        score_fn, targets, exclude, split.warm.n_users, split.n_cold, ks=ks, batch_size=batch_size, device=device
    )


def full_catalogue_targets(split: ColdItemSplit, which: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(targets, exclude) for ranking the held-out items among *all* items, warm rows first and held-out
    item ``c`` at row ``n_warm + c``: the user's training items are masked, and for test their valid
    interactions (warm and held-out) too."""
    n_warm = split.warm.n_items

    def shifted(pairs: np.ndarray) -> np.ndarray:
        return pairs + np.array([0, n_warm], dtype=pairs.dtype)

    targets = shifted(split.valid if which == "valid" else split.test)
    exclude = [split.warm.train]
    if which == "test":
        exclude += [split.warm.valid, shifted(split.valid)]
    return targets, exclude


def cold_evaluator(split: ColdItemSplit, cfg: TrainConfig) -> Callable[[RecModel, str], EvalResult]:
    """``evaluate(model, split_name)`` for :func:`training.trainer.train` under the cold-item protocol.

    The result's plain metrics (``recall@20``, ...) and per-user values rank the held-out items among
    themselves; ``full_<metric>`` ranks them among all items (warm and held-out compete, as in the
    service's ``/recommend``); ``warm_<metric>`` is the warm protocol's ranking of the warm items for the
    data's warm valid/test interactions; ``all_<metric>`` ranks every warm and held-out target in one ranking
    over all items (what calibrates new items' scale, :func:`training.trainer.calibrate_new_items`). Each of
    the three rankings' own result, with per-user values, is in ``rankings`` under its prefix.
    ``selection`` is the model-selection rule early stopping uses:
    the mean of the held-out and the warm ``cfg.monitor`` (the warm one alone when a split has no warm
    targets), so the chosen epoch serves both new and existing items.
    """
    features = torch.from_numpy(split.cold_item_features())
    n_users, n_warm = split.warm.n_users, split.warm.n_items
    ks, batch, device = cfg.ks, cfg.eval_batch_size, cfg.device

    def evaluate(model: RecModel, which: str) -> EvalResult:
        with torch.no_grad():
            model.eval()
            users, warm_items = (t.detach() for t in model.get_embedding())
            items = cold_item_embeddings(model, features.to(users.device))
        cold = evaluate_cold_scores(lambda u: users[u] @ items.T, split, which, ks, batch, device)
        metrics = dict(cold.metrics)
        catalogue = torch.cat([warm_items, items])
        targets, exclude = full_catalogue_targets(split, which)
        full = full_rank_evaluate(
            lambda u: users[u] @ catalogue.T, targets, exclude, n_users, len(catalogue), ks, batch, device
        )
        metrics.update({f"full_{k}": v for k, v in full.metrics.items()})
        rankings = {"full": full}
        warm_targets = split.warm.valid if which == "valid" else split.warm.test
        every = np.concatenate([warm_targets, targets]) if len(warm_targets) else targets
        both = full_rank_evaluate(
            lambda u: users[u] @ catalogue.T, every, exclude, n_users, len(catalogue), ks, batch, device
        )
        metrics.update({f"all_{k}": v for k, v in both.metrics.items()})
        rankings["all"] = both
        metrics["selection"] = metrics[cfg.monitor]
        if len(warm_targets):
            exclude = [split.warm.train] if which == "valid" else [split.warm.train, split.warm.valid]
            warm = full_rank_evaluate(
                lambda u: users[u] @ warm_items.T, warm_targets, exclude, n_users, n_warm, ks, batch, device
            )
            metrics.update({f"warm_{k}": v for k, v in warm.metrics.items()})
            rankings["warm"] = warm
            metrics["selection"] = (metrics[cfg.monitor] + warm.metrics[cfg.monitor]) / 2
        return EvalResult(metrics, cold.users, cold.per_user, rankings)

    return evaluate


def split_for(cfg: RunConfig, data: RecData) -> ColdItemSplit:
    """The cold-item split a RunConfig's ``data`` section asks for."""
    return cold_item_split(data, cfg.data.cold_item_ratio, cfg.data.cold_item_seed)


def train_protocol(cfg: RunConfig, data: RecData) -> TrainResult | None:
    """Train ``cfg.model`` on ``data`` under ``cfg.data.protocol`` (a :class:`training.trainer.TrainResult`;
    under cold_items its valid/test results rank the held-out items)."""
    from training.trainer import train

    if cfg.data.protocol == "warm":
        return train(data, cfg.model, cfg.train)
    check_cold_start_model(cfg.model.name)
    split = split_for(cfg, data)
    return train(split.warm, cfg.model, cfg.train, evaluate=cold_evaluator(split, cfg.train))
