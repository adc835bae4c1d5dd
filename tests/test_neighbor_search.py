"""The exact content-neighbour search: a cheap product picks candidates, a rounding bound proves them, and the
answer is that of scoring every key, whatever the product's precision, the queries' batch or the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models.metammf.neighbor_search as search
from models.metammf.neighbor_search import SearchKeys, candidate_dtype, nearest, row_scores, scores_at

DTYPES = [torch.float32, torch.bfloat16]


def every_key(queries: torch.Tensor, keys: torch.Tensor, k: int, skip: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: every key scored with :func:`row_scores`, best first, ties by key index."""
    found = []
    for i, query in enumerate(queries):
        scores = row_scores(query.unsqueeze(0), keys.unsqueeze(0))[0].tolist()
        allowed = [j for j in range(len(keys)) if skip is None or j != int(skip[i])]
        found.append(sorted(allowed, key=lambda j: (-scores[j], j))[:k])
    return torch.tensor(found, dtype=torch.long).reshape(len(queries), -1)


def clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    """Unit rows around a common direction, as standardised content features are (many near-ties)."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=generator) + 0.5 * torch.randn(1, dim, generator=generator), dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_answer_is_every_keys_order_with_ties_and_skips(dtype: torch.dtype, monkeypatch) -> None:
    keys = clustered(400, 24, 0)
    keys[100:180] = keys[5]  # 81 equal keys: a tie group wider than the candidates, so the proof must fail
    keys[200:203] = keys[9]
    queries = clustered(40, 24, 1)
    queries[:4], queries[4:8] = keys[5], keys[9]
    skip = torch.full((40,), -1)
    skip[4:8], skip[10] = 9, 3
    scored_against_every_key = []  # the queries whose proof failed
    monkeypatch.setattr(search, "row_scores", lambda *a: scored_against_every_key.append(1) or row_scores(*a))
    for k in (1, 12, 30):
        found = nearest(queries, SearchKeys.of(keys, dtype), k, skip=skip)
        assert torch.equal(found, every_key(queries, keys, k, skip)), k
    assert 0 < len(scored_against_every_key) < 3 * len(queries)  # the tie groups' queries, not all
    assert torch.equal(nearest(queries, keys, 30), every_key(queries, keys, 30))


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_key_outside_the_candidates_scores_above_the_bound(dtype: torch.dtype) -> None:
    """The bound the proof rests on, checked against every key outside the candidates, for unit and longer
    vectors, with near-ties around the candidates' edge."""
    for seed, scale in ((0, 1.0), (1, 7.5), (2, 0.01)):
        keys = clustered(3000, 64, seed) * scale
        queries = clustered(64, 64, seed + 10) * torch.linspace(0.5, 3.0, 64).unsqueeze(1)
        prepared = SearchKeys.of(keys, dtype)
        query_low = queries.to(prepared.low.dtype)
        product = query_low @ prepared.low.T
        last, candidates = product.topk(20, dim=1)
        bound = search._outside_bound(last[:, -1].float(), queries, query_low, prepared)
        exact = row_scores(queries, keys.unsqueeze(0).expand(len(queries), -1, -1))
        outside = torch.ones_like(exact, dtype=torch.bool).scatter_(1, candidates, False)
        highest_outside = exact.masked_fill(~outside, float("-inf")).max(1).values
        assert bool((highest_outside <= bound).all())
        # ... and it is tight enough to prove most answers: within 1% of the scores' range
        assert float((bound - last[:, -1].float()).max()) < 0.01 * scale * 3.0


def test_the_answer_does_not_depend_on_the_batch_or_the_product_precision() -> None:
    keys = clustered(5000, 128, 3)
    queries = clustered(300, 128, 4)
    queries[7] = keys[11]
    batch = nearest(queries, SearchKeys.of(keys, torch.bfloat16), 30)
    assert torch.equal(batch, nearest(queries, SearchKeys.of(keys, torch.float32), 30))
    for i in (0, 7, 299):
        assert torch.equal(nearest(queries[i : i + 1], keys, 30)[0], batch[i])
    assert batch[7, 0] == 11
    scores = row_scores(queries, keys[batch])
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # best first
    assert torch.equal(scores_at(queries, keys, batch), scores)  # the gathered scores are row_scores' values


def test_edge_cases() -> None:
    keys = clustered(50, 8, 5)
    queries = clustered(6, 8, 6)
    assert nearest(queries[:0], keys, 5).shape == (0, 5)
    assert scores_at(queries[:0], keys, torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5)
    assert nearest(queries, keys, 0).shape == (6, 0)
    assert torch.equal(nearest(queries, keys, 80), every_key(queries, keys, 50))  # k above the keys: all of them
    skip = torch.arange(6)
    assert torch.equal(nearest(queries, keys, 80, skip=skip), every_key(queries, keys, 49, skip))
    assert nearest(queries, keys[:0], 5).shape == (6, 0)
    overflowed = queries.clone()
    overflowed[2] = float("nan")
    found = nearest(overflowed, keys, 5)  # a query without an order gets some keys, the others theirs
    assert torch.equal(found[[0, 1, 3, 4, 5]], every_key(queries, keys, 5)[[0, 1, 3, 4, 5]])


def test_candidate_product_precision_follows_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(search, "_cpu_has_bf16", lambda: True)
    assert candidate_dtype(torch.device("cpu")) == torch.bfloat16
    assert candidate_dtype(torch.device("cuda")) == torch.float32
    monkeypatch.setattr(search, "_cpu_has_bf16", lambda: False)
    assert candidate_dtype(torch.device("cpu")) == torch.float32
    assert SearchKeys.of(clustered(5, 4, 0)).low.dtype == torch.float32


def test_the_bound_covers_the_rounding_of_the_keys_and_of_the_product_at_their_worst() -> None:
    """Two adversarial cases, each where one term of the bound is all that covers the error."""
    generator = torch.Generator().manual_seed(7)
    keys = F.normalize(torch.randn(200, 64, generator=generator), dim=1)
    residual = keys.to(torch.bfloat16).float() - keys
    # 1. A query against a key's rounding residual (and exact in bfloat16, so its own rounding is 0): the product
    # falls short of its score by about |q| |x_low - x|, covered only by the keys' rounding term.
    queries = F.normalize(-residual, dim=1).to(torch.bfloat16).float()
    # 2. Queries and keys exact in bfloat16, scores near 1: the product's rounding to bfloat16 is the error.
    exact_keys = keys.to(torch.bfloat16).float()
    near = (exact_keys + 0.05 * torch.randn(200, 64, generator=generator)).to(torch.bfloat16).float()
    for query, key in ((queries, keys), (near, exact_keys)):
        prepared = SearchKeys.of(key, torch.bfloat16)
        query_low = query.to(torch.bfloat16)
        product = (query_low.unsqueeze(1) @ prepared.low.unsqueeze(2)).reshape(-1)  # the product kernel's value
        exact = (query * key).sum(1)
        bound = search._outside_bound(product.float(), query, query_low, prepared)
        assert bool((exact <= bound).all())
        assert float((exact - product.float()).max()) > 0.25 * float((bound - product.float()).max())


def test_the_encoder_prepares_its_keys_once_and_again_after_a_load(tiny_data, make_config) -> None:
    from models.metammf.inference import InferenceEncoder
    from training.data import RecData
    from training.trainer import build_model

    config = make_config("metammf_gcn", content_neighbors=4, untrained_items="content", isolated_nodes="self")
    torch.manual_seed(0)
    encoder = InferenceEncoder.from_model(build_model(tiny_data, config, 1e-4).eval())
    features = torch.from_numpy(tiny_data.item_features()[:20])
    first = encoder.encode_items(features)[0]
    assert encoder.prepare_search() is encoder.prepare_search()  # made once
    assert encoder.prepare_search(torch.float32).low.dtype == torch.float32  # a chosen precision is kept
    assert torch.equal(encoder.encode_items(features)[0], first)  # ... and answers the same
    prepared = encoder.prepare_search(torch.bfloat16)  # a copy of the keys: stale once they change
    # Another model's state loaded in place: its keys are searched, not the ones prepared before.
    torch.manual_seed(1)
    rolled = {name: np.roll(values, 7, axis=0) for name, values in tiny_data.features.items()}  # other keys
    data = RecData(tiny_data.name, tiny_data.n_users, tiny_data.n_items, tiny_data.train, tiny_data.valid,
                   tiny_data.test, rolled)  # fmt: skip
    other = InferenceEncoder.from_model(build_model(data, config, 1e-4).eval())
    encoder.load_state_dict(other.state_dict())
    assert encoder.prepare_search() is not prepared
    assert torch.equal(encoder.encode_items(features)[0], other.encode_items(features)[0])
