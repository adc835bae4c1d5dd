"""Shared fixtures: tiny synthetic data sets and small model configurations.

Torch is pinned to one intra-op thread: the tensors in these tests are tiny, and with several
threads on a small, shared CPU the thread pool overhead (oversubscription) makes each step up to
100x slower.
"""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.registry import parse_model_config
from tests.training_support import SMALL_MODEL, TINY
from training.data import RecData
from training.synthetic import generate_synthetic

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data() -> RecData:
    """200 users x 150 items, two 16-d modalities."""
    return generate_synthetic(TINY)


@pytest.fixture(scope="session")
def make_config():
    """Factory of small model configurations: ``make_config("metammf_mf", rank=4)``."""

    def make(name: str = "metammf_gcn", **overrides: object) -> ModelConfig:
        small = parse_model_config({"name": name, **SMALL_MODEL}, ignore_other_settings=True).model_dump()
        return parse_model_config({**small, **overrides})

    return make


# The service tests' fixtures, registered here once for the session (one trained artifact for all modules).
# The reliability tests' artifact versions (module-scoped: built again in each module that asks).
from tests.reliability_support import incompatible, v1, v2  # noqa: E402, F401
from tests.service_support import artifact, client, make_client, ns, redis_url, stored  # noqa: E402, F401
