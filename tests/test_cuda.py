"""The models on a CUDA device (skipped where there is none, as in CI): every registered model trains
there, MetaMMF's loss and gradients match the CPU's for the same weights, and the three precisions train.

Runs with the training packages alone (no service packages): ``pytest --noconftest tests/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from models.registry import MODELS, parse_model_config
from tests.training_support import SMALL_MODEL, random_ranker_recall
from training.config import TrainConfig
from training.data import RecData
from training.synthetic import SyntheticConfig, generate_synthetic
from training.trainer import build_model, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
# As tests/test_baselines.py trains on the CPU.
TRAIN = TrainConfig(epochs=20, batch_size=256, lr=0.005, patience=100, progress=False, seed=7, device="cuda")


@pytest.fixture(scope="module")
def data() -> RecData:
    return generate_synthetic(
        SyntheticConfig(n_users=400, n_items=150, modality_dims={"visual": 16, "acoustic": 16}, seed=0)
    )


def small(name: str) -> ModelConfig:
    return parse_model_config({"name": name, **SMALL_MODEL}, ignore_other_settings=True)


def _check_trained(result, data: RecData) -> None:
    losses = [h["loss"] for h in result.history]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert result.test.metrics["recall@20"] > 1.25 * random_ranker_recall(data)
    assert next(result.model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_trains_on_cuda(data: RecData, name: str) -> None:
    _check_trained(train(data, small(name), TRAIN), data)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("name", ["metammf_gcn", "metammf_mf"])
def test_metammf_trains_in_each_precision(data: RecData, name: str, precision: str) -> None:
    _check_trained(train(data, small(name), TRAIN.model_copy(update={"precision": precision})), data)


@pytest.mark.parametrize("tensor", ["cp", "full"])
@pytest.mark.parametrize("name", ["metammf_gcn", "metammf_mf"])
def test_cuda_loss_and_gradients_match_the_cpu(data: RecData, name: str, tensor: str) -> None:
    torch.manual_seed(0)
    cpu = build_model(data, small(name).model_copy(update={"tensor": tensor}), 1e-3)
    gpu = build_model(data, small(name).model_copy(update={"tensor": tensor}), 1e-3)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    batch = [torch.from_numpy(a[:256]) for a in (data.train[:, 0], data.train[:, 1], data.train[::-1, 1].copy())]
    cpu_loss = cpu.calculate_loss(*batch)
    gpu_loss = gpu.calculate_loss(*(b.cuda() for b in batch))
    cpu_loss.backward()
    gpu_loss.backward()
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-6)
    for (pname, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        if p_cpu.grad is not None:
            torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-4, atol=1e-6, msg=pname)
    users = torch.arange(data.n_users)
    torch.testing.assert_close(
        gpu.eval().full_sort_predict(users.cuda()).cpu(), cpu.eval().full_sort_predict(users), rtol=1e-4, atol=1e-5
    )
