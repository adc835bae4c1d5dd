"""Inner products that give equal vectors exactly equal scores, so that ties are broken by row everywhere."""

from __future__ import annotations

import numpy as np


def row_scores(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``vectors @ query`` computed alike for every row (einsum's loop, not BLAS), so equal vectors score
    exactly equal and ties are broken by row on every replica, however the vectors are laid out."""
    return np.einsum("...ij,...j->...i", vectors, query)


def product_error(dim: int) -> float:
    """How far a float32 matrix product's ``u . x`` may be from :func:`row_scores`' value, per unit of
    ``|u| |x|``: each sums ``dim`` float32 products, so each is within ``dim * 2^-24 |u| |x|`` of the exact
    value; 4x that, so that a candidate filter on the product never leaves out what the exact scores keep."""
    return 4 * dim * 2.0**-24
