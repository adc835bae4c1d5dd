"""train.precision: bf16 autocast trains on CPU too, tf32 is refused off CUDA, the run-wide matmul setting
is restored, and the sparse products stay float32 under autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.graph.utils import MeanAggregation, bipartite_edge_index
from tests.training_support import random_ranker_recall
from training.config import RunConfig, TrainConfig
from training.data import RecData
from training.precision import run_precision, step_precision
from training.trainer import train

TRAIN = TrainConfig(epochs=15, batch_size=256, lr=0.005, reg_weight=1e-4, patience=100, progress=False, seed=7)


@pytest.mark.parametrize("name", ["metammf_gcn", "metammf_mf", "lightgcn", "lattice", "grcn"])
def test_bf16_autocast_trains_and_keeps_float32_weights(
    tiny_data: RecData, make_config, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bf16 itself, also on a CPU without bfloat16 instructions (where a run would fall back to fp32)
    monkeypatch.setattr("training.precision.bf16_instructions", lambda: "avx512_bf16")
    result = train(tiny_data, make_config(name), TRAIN.model_copy(update={"precision": "bf16"}))
    assert result.precision == "bf16"
    losses = [h["loss"] for h in result.history]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert result.test.metrics["recall@20"] > 1.25 * random_ranker_recall(tiny_data)
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}


def test_tf32_is_refused_off_cuda_with_the_reason() -> None:
    with pytest.raises(ValidationError, match="tf32 needs a CUDA device"):
        RunConfig.model_validate({"train": {"precision": "tf32"}})
    with pytest.raises(ValidationError, match="precision"):
        TrainConfig(precision="fp16")
    assert TrainConfig(precision="tf32", device="cuda:1").precision == "tf32"


def test_run_precision_sets_tf32_for_the_run_and_restores_it() -> None:
    before = torch.get_float32_matmul_precision()
    with run_precision("tf32", "cuda"):  # the setting alone: no GPU needed to check it
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="CUDA"), run_precision("tf32", "cpu"):
        pass
    with run_precision("bf16", "cpu"):
        assert torch.get_float32_matmul_precision() == before


def test_bf16_step_casts_dense_products_but_the_mean_aggregation_stays_float32() -> None:
    pairs = torch.tensor([[0, 0], [0, 1], [1, 1], [2, 0]])
    aggregate = MeanAggregation(bipartite_edge_index(pairs, 3, 2), 5)
    x = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(4, 4)
    with step_precision("bf16", "cpu"):
        h = x @ weight
        assert h.dtype == torch.bfloat16
        out = aggregate(h)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, aggregate(h.float()))
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
