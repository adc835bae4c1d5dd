"""The ranking losses every model can train with (``model.loss``): BPR and the sampled softmax over the batch's
items, its formula against a plain loop, and models of each family trained with it."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from models.base import in_batch_softmax_loss
from models.registry import parse_model_config
from tests.training_support import random_ranker_recall
from training.config import TrainConfig
from training.data import RecData
from training.synthetic import SyntheticConfig, generate_synthetic
from training.trainer import build_model, train


def softmax_loss_by_loop(users, pos_items, neg_items, u, pos, neg, temperature: float) -> float:
    items = torch.cat([pos_items, neg_items]).tolist()
    vectors = torch.cat([pos, neg])
    total = 0.0
    for b in range(len(users)):
        users_positives = {int(i) for user, i in zip(users, pos_items, strict=True) if int(user) == int(users[b])}
        candidates = [
            float(u[b] @ vectors[j]) / temperature
            for j, item in enumerate(items)
            if j == b or item not in users_positives
        ]
        total -= float(u[b] @ pos[b]) / temperature - math.log(sum(math.exp(c) for c in candidates))
    return total / len(users)


def test_softmax_loss_is_the_positive_against_the_batchs_other_items() -> None:
    g = torch.Generator().manual_seed(0)
    # User 0 has two positives (items 7 and 8), item 7 is the positive of three rows and a negative of one;
    # user 1's positives are 7 and 4, and 4 is also row 0's negative.
    users = torch.tensor([0, 0, 1, 2, 3, 1])
    pos_items = torch.tensor([7, 8, 7, 9, 7, 4])
    neg_items = torch.tensor([4, 2, 3, 7, 5, 8])
    table = torch.randn(10, 4, generator=g)
    u = torch.randn(6, 4, generator=g)
    for temperature in (1.0, 0.2):
        loss = in_batch_softmax_loss(users, pos_items, neg_items, u, table[pos_items], table[neg_items], temperature)
        expected = softmax_loss_by_loop(users, pos_items, neg_items, u, table[pos_items], table[neg_items], temperature)
        assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_softmax_loss_is_zero_when_every_other_item_is_a_positive_of_the_user() -> None:
    users = torch.tensor([5, 5])
    pos_items = torch.tensor([1, 2])
    neg_items = torch.tensor([2, 1])  # each row's negative is the user's other positive: not a negative
    u = torch.randn(2, 3, requires_grad=True)
    items = torch.randn(3, 3, requires_grad=True)
    loss = in_batch_softmax_loss(users, pos_items, neg_items, u, items[pos_items], items[neg_items], 0.5)
    loss.backward()
    assert float(loss) == 0.0
    assert bool(torch.isfinite(u.grad).all()) and bool(torch.isfinite(items.grad).all())


def test_invrl_trains_with_bpr_only() -> None:
    with pytest.raises(ValidationError, match="loss"):
        parse_model_config({"name": "invrl", "loss": "softmax"})
    with pytest.raises(ValidationError, match="softmax_temperature"):
        parse_model_config({"name": "lightgcn", "loss": "softmax", "softmax_temperature": 0})


@pytest.fixture(scope="module")
def data() -> RecData:
    return generate_synthetic(
        SyntheticConfig(n_users=400, n_items=150, modality_dims={"visual": 16, "acoustic": 16}, seed=0)
    )


def test_the_model_uses_the_configured_loss(data: RecData, make_config) -> None:
    users, pos_items, neg_items = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    for name in ("lightgcn", "metammf_lightgcn"):
        bpr = build_model(data, make_config(name), reg_weight=0.0)
        softmax = build_model(data, make_config(name, loss="softmax", softmax_temperature=0.5), reg_weight=0.0)
        softmax.load_state_dict(bpr.state_dict())
        user_emb, item_emb = bpr.get_embedding()
        u, pos, neg = user_emb[users], item_emb[pos_items], item_emb[neg_items]
        expected = in_batch_softmax_loss(users, pos_items, neg_items, u, pos, neg, 0.5)
        torch.testing.assert_close(softmax.calculate_loss(users, pos_items, neg_items), expected)
        assert not torch.allclose(bpr.calculate_loss(users, pos_items, neg_items), expected)


@pytest.mark.parametrize("name", ["metammf_lightgcn", "metammf_gcn", "metammf_mf", "lightgcn", "lattice", "vbpr"])
def test_models_train_with_the_softmax_loss(data: RecData, make_config, name: str) -> None:
    cfg = TrainConfig(epochs=20, batch_size=256, lr=0.005, reg_weight=1e-4, patience=100, progress=False, seed=7)
    result = train(data, make_config(name, loss="softmax", softmax_temperature=0.5), cfg)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.9 * losses[0]
    assert result.test.metrics["recall@20"] > 1.25 * random_ranker_recall(data), name
