"""Exact nearest keys by inner product, with a cheap product to pick the candidates.

A new item's content neighbours are searched among every trained item's content key, and the answer must be
the same as the one training computed for an item of the catalogue with the same features: the search is
exact. Its cost is the (queries x keys) product. :func:`nearest` computes that product in bfloat16 where the CPU
has bfloat16 instructions (about 3x the float32 rate on AVX512-BF16), keeps each query's best ``k + MARGIN``
keys by it, scores those again in float32 row by row (the same value for equal vectors wherever they lie), and
proves with a rounding bound that no key outside them can beat the k-th: every key outside scores at most the
last candidate's product plus the product's error. A query without that proof (a tie or a near-tie across the
candidates' edge) is scored against every key. The answer, best first with ties broken by key index, is
therefore the same whatever the product's precision, the CPU or the queries' batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from models.hardware import bf16_instructions

MARGIN = 32  # candidates per query beyond k, so that the rounding of the cheap product rarely hides one
# Queries per product: 256 keeps the product and its top-k in cache better than one large block (102 against
# 117 ms for 500 queries x 38,226 keys on one AMD EPYC core); at most 2^24 scores at a time.
QUERY_BLOCK = 256
PRODUCT_BLOCK = 2**24
# Unit roundoff of the inputs and the output of a product in each dtype: bfloat16 keeps 8 significant bits.
# A float32 product on CUDA may run in TF32 (10 significant bits): its inputs are counted as rounded to it.
_BF16_ROUNDOFF = 2.0**-8
_TF32_ROUNDOFF = 2.0**-11


def _accumulation_error(dim: int) -> float:
    """Per unit of ``|u| |x|``, how far a float32 sum of ``dim`` products may be from the exact value (4x the
    classic ``dim * 2^-24`` bound, whatever the order of the sum)."""
    return 4 * dim * 2.0**-24


@functools.cache
def _cpu_has_bf16() -> bool:
    return bf16_instructions() is not None


def candidate_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the candidate product: bfloat16 on a CPU with bfloat16 instructions, else float32 (a
    bfloat16 product without them is several times slower than float32)."""
    return torch.bfloat16 if device.type == "cpu" and _cpu_has_bf16() else torch.float32


def _input_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    if dtype == torch.bfloat16:
        return _BF16_ROUNDOFF
    return _TF32_ROUNDOFF if device.type == "cuda" else 0.0


@dataclass(frozen=True)
class SearchKeys:
    """Keys prepared for :func:`nearest`: the float32 keys, their copy in the candidate product's dtype, and
    the bounds the proof needs. Build once per key set (:meth:`of`) where many searches share it; it holds float32
    keys themselves, not a copy, so keys changed in place need a new one."""

    keys: Tensor  # (n, d) float32
    low: Tensor  # (n, d) the candidate product's copy
    low_error_max: float  # max_j |low_j - keys_j|
    low_norm_max: float  # max_j |low_j|
    norm_max: float  # max_j |keys_j|

    @classmethod
    def of(cls, keys: Tensor, dtype: torch.dtype | None = None) -> SearchKeys:
        keys = keys.float()
        dtype = candidate_dtype(keys.device) if dtype is None else dtype
        low = keys.to(dtype)
        if keys.shape[0] == 0:
            return cls(keys, low, 0.0, 0.0, 0.0)
        norms = torch.linalg.vector_norm(keys, dim=1)
        if dtype == torch.float32:
            low_error = norms * _input_roundoff(dtype, keys.device)
        else:
            low_error = torch.linalg.vector_norm(low.float() - keys, dim=1)
        return cls(
            keys,
            low,
            float(low_error.max()),
            float(torch.linalg.vector_norm(low.float(), dim=1).max()),
            float(norms.max()),
        )


def row_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """(b, m) ``queries`` (b, d) times each of their ``keys`` (b, m, d), computed alike for every pair (a product
    and a sum over the last dimension, not BLAS): equal vectors score exactly equal wherever they lie."""
    return (queries.unsqueeze(1) * keys).sum(-1)


def scores_at(queries: Tensor, keys: Tensor, indices: Tensor) -> Tensor:
    """(b, m) :func:`row_scores` of ``queries`` (b, d) with the ``keys`` (n, d) at ``indices`` (b, m): the same
    values, gathered with one ``index_select`` and multiplied in place (faster than ``keys[indices]``)."""
    gathered = keys.index_select(0, indices.reshape(-1)).view(*indices.shape, keys.shape[1])
    return gathered.mul_(queries.unsqueeze(1)).sum(-1)


@torch.no_grad()
def nearest(queries: Tensor, keys: Tensor | SearchKeys, k: int, skip: Tensor | None = None) -> Tensor:
    """(b, k) indices of the ``k`` keys with the largest inner product with each query (unit vectors: cosine),
    best first, ties broken by key index; ``skip[i]`` >= 0 is a key that query i must not get (itself)."""
    prepared = keys if isinstance(keys, SearchKeys) else SearchKeys.of(keys)
    n = prepared.keys.shape[0]
    k = max(0, min(k, n - (1 if skip is not None else 0)))
    chunk = max(1, min(QUERY_BLOCK, PRODUCT_BLOCK // max(n, 1)))
    found = [
        _nearest_chunk(queries[lo : lo + chunk].float(), prepared, k, None if skip is None else skip[lo : lo + chunk])
        for lo in range(0, queries.shape[0], chunk)
    ]
    return torch.cat(found) if found else torch.zeros(0, k, dtype=torch.long, device=prepared.keys.device)


def _best_first(scores: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The first ``k`` of ``indices`` (b, m) by ``scores`` (b, m), best first, ties by index, and their scores."""
    by_index = indices.sort(dim=1).indices
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    best, order = scores.sort(dim=1, descending=True, stable=True)
    return indices.gather(1, order[:, :k]), best[:, :k]


def _nearest_chunk(queries: Tensor, prepared: SearchKeys, k: int, skip: Tensor | None) -> Tensor:
    keys, n = prepared.keys, prepared.keys.shape[0]
    if k == 0 or queries.shape[0] == 0:
        return torch.zeros(queries.shape[0], k, dtype=torch.long, device=keys.device)
    query_low = queries.to(prepared.low.dtype)
    product = query_low @ prepared.low.T
    if skip is not None:
        skipped = (skip >= 0).nonzero().squeeze(1)
        product[skipped, skip[skipped]] = float("-inf")
    take = min(k + MARGIN, n)
    last, candidates = product.topk(take, dim=1)
    exact = scores_at(queries, keys, candidates)
    if skip is not None:
        exact = exact.masked_fill(candidates == skip.unsqueeze(1), float("-inf"))
    found, best = _best_first(exact, candidates, k)
    if take == n:  # every key is a candidate: nothing outside to prove against
        return found
    unsure = ~(best[:, -1] > _outside_bound(last[:, -1].float(), queries, query_low, prepared))
    unsure &= torch.isfinite(queries).all(1)  # a query that overflowed has no order to prove
    for i in unsure.nonzero().squeeze(1).tolist():  # a near-tie across the candidates' edge: every key
        scores = row_scores(queries[i : i + 1], keys.unsqueeze(0))
        if skip is not None and int(skip[i]) >= 0:
            scores[0, int(skip[i])] = float("-inf")
        found[i] = _best_first(scores, torch.arange(n, device=keys.device).unsqueeze(0), k)[0][0]
    return found


def _outside_bound(last: Tensor, queries: Tensor, query_low: Tensor, prepared: SearchKeys) -> Tensor:
    """(b,) the highest :func:`row_scores` value a key outside the candidates may have: it scores at most
    ``last`` (the last candidate's product), and its score is within the product's error of that.

    The error of ``q.x`` against the product ``fl(q_low.x_low)``: the inputs' rounding (``|q_low - q| |x_low|
    + |q| |x_low - x|``), the float32 accumulation of the product and of the score, and the product's rounding to
    its output dtype (relative, at most ``u |value|``)."""
    dtype, device = prepared.low.dtype, prepared.keys.device
    dim = queries.shape[1]
    query_norm = torch.linalg.vector_norm(queries, dim=1)
    query_low_norm = torch.linalg.vector_norm(query_low.float(), dim=1)
    if dtype == torch.float32:
        query_error = query_norm * _input_roundoff(dtype, device)
    else:
        query_error = torch.linalg.vector_norm(query_low.float() - queries, dim=1)
    accumulation = _accumulation_error(dim)
    error = (
        query_error * prepared.low_norm_max
        + query_norm * prepared.low_error_max
        + accumulation * query_low_norm * prepared.low_norm_max
        + accumulation * query_norm * prepared.norm_max
    )
    output_roundoff = _BF16_ROUNDOFF if dtype == torch.bfloat16 else 0.0
    rounding = output_roundoff * last.abs() / (1 - output_roundoff)
    # 1% on the error for the float32 arithmetic of this bound itself; 1e-30 for bfloat16's flushed denormals.
    return last + (rounding + error) * 1.01 + 1e-30
