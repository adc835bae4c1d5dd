"""The item index of the configured kind."""

from __future__ import annotations

import numpy as np

from service.index.base import SlottedIndex
from service.index.calibration import TunableIndex, calibrate
from service.index.flat import FlatIndex
from service.index.hnsw import HnswIndex
from service.index.ivf import IvfIndex
from service.index.protocol import ItemIndex
from service.index.settings import IndexSettings

INDEX_CLASSES: dict[str, type[SlottedIndex]] = {"flat": FlatIndex, "hnsw": HnswIndex, "ivf": IvfIndex}


def build_index(
    settings: IndexSettings, vectors: np.ndarray, calibration_queries: np.ndarray | None = None
) -> ItemIndex:
    """``settings.kind``'s index of ``vectors`` (row i: vector i); an approximate one has its search width
    calibrated on ``calibration_queries`` (service/index/calibration.py), when given."""
    index = INDEX_CLASSES[settings.kind](settings, vectors)
    if calibration_queries is not None and isinstance(index, TunableIndex):
        calibrate(index, calibration_queries)
    return index
