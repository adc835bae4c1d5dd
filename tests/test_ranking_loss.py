"""The ranking losses every model can train with (``model.loss``): BPR and the sampled softmax against the
batch's shared negatives, its formula against a plain loop, and models of each family trained with it."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from models.base import sampled_softmax_loss
from models.registry import parse_model_config
from tests.training_support import random_ranker_recall
from training.config import TrainConfig
from training.data import RecData
from training.synthetic import SyntheticConfig, generate_synthetic
from training.trainer import build_model, train


def softmax_loss_by_loop(users, pos_items, neg_items, u, pos, neg, temperature: float, negatives: int) -> float:
    total = 0.0
    for b in range(len(users)):
        users_positives = {int(i) for user, i in zip(users, pos_items, strict=True) if int(user) == int(users[b])}
        scores = [float(u[b] @ pos[b]) / temperature]
        scores += [
            float(u[b] @ neg[j]) / temperature
            for j in range(min(negatives, len(users)))
            if int(neg_items[j]) not in users_positives
        ]
        total -= scores[0] - math.log(sum(math.exp(c) for c in scores))
    return total / len(users)


def test_softmax_loss_is_the_positive_against_the_shared_negatives() -> None:
    g = torch.Generator().manual_seed(0)
    # User 0's positives are items 7 and 8, user 1's 7 and 4; the first rows' negatives include 4, 7 and 8.
    users = torch.tensor([0, 0, 1, 2, 3, 1])
    pos_items = torch.tensor([7, 8, 7, 9, 7, 4])
    neg_items = torch.tensor([4, 8, 3, 7, 5, 2])
    table = torch.randn(10, 4, generator=g)
    u = torch.randn(6, 4, generator=g)
    for temperature, negatives in ((1.0, 6), (0.2, 6), (0.5, 3), (1.0, 100)):
        args = (users, pos_items, neg_items, u, table[pos_items], table[neg_items], temperature, negatives)
        assert float(sampled_softmax_loss(*args)) == pytest.approx(softmax_loss_by_loop(*args), rel=1e-5)


def test_softmax_loss_is_zero_when_every_negative_is_a_positive_of_the_user() -> None:
    users = torch.tensor([5, 5])
    pos_items = torch.tensor([1, 2])
    neg_items = torch.tensor([2, 1])  # each row's negative is one of the user's positives: not a negative
    u = torch.randn(2, 3, requires_grad=True)
    items = torch.randn(3, 3, requires_grad=True)
    loss = sampled_softmax_loss(users, pos_items, neg_items, u, items[pos_items], items[neg_items], 0.5, 256)
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
        config = make_config(name, loss="softmax", softmax_temperature=0.5, softmax_negatives=2)
        softmax = build_model(data, config, reg_weight=0.0)
        softmax.load_state_dict(bpr.state_dict())
        user_emb, item_emb = bpr.get_embedding()
        u, pos, neg = user_emb[users], item_emb[pos_items], item_emb[neg_items]
        expected = sampled_softmax_loss(users, pos_items, neg_items, u, pos, neg, 0.5, 2)
        torch.testing.assert_close(softmax.calculate_loss(users, pos_items, neg_items), expected)
        assert not torch.allclose(bpr.calculate_loss(users, pos_items, neg_items), expected)


@pytest.mark.parametrize("name", ["metammf_lightgcn", "metammf_gcn", "metammf_mf", "lightgcn", "lattice", "vbpr"])
def test_models_train_with_the_softmax_loss(data: RecData, make_config, name: str) -> None:
    cfg = TrainConfig(epochs=20, batch_size=256, lr=0.005, reg_weight=1e-4, patience=100, progress=False, seed=7)
    result = train(data, make_config(name, loss="softmax", softmax_temperature=0.5), cfg)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.9 * losses[0]
    assert result.test.metrics["recall@20"] > 1.25 * random_ranker_recall(data), name
