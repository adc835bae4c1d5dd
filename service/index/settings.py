"""The item index's settings, declared once: :class:`service.settings.Settings` holds them as ``index`` and the
index reads them from there.

Operators set each one as a flat variable, ``MMF_`` and the field's alias where it has one, else its name
(``MMF_INDEX``, ``MMF_HNSW_M``, ``MMF_FAISS_THREADS``, ...): the names are part of the interface, the field
names are what the index code reads.
"""

from __future__ import annotations

import math
import os
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

IndexKind = Literal["flat", "hnsw", "ivf"]
KINDS: tuple[str, ...] = get_args(IndexKind)


class IndexSettingsError(RuntimeError):
    """Index settings that cannot work for the artifact (e.g. more IVF lists than items)."""


class IndexSettings(BaseModel):
    """Which index to build and how; the alias of a field is the variable's name where it differs (the field
    names say what the index does with them, the aliases are the names operators set)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    kind: IndexKind = Field(
        "flat",
        alias="index",
        description="item index: flat (exact inner product), hnsw or ivf (approximate, for large catalogues)",
    )
    hnsw_m: int = Field(32, ge=2, le=256, description="hnsw: graph links per item")
    hnsw_ef_construction: int = Field(80, ge=1, le=4096, description="hnsw: candidate list size while building")
    hnsw_ef_search: int = Field(128, ge=1, le=65536, description="hnsw: candidate list size per query")
    ivf_nlist: int = Field(0, ge=0, le=1 << 20, description="ivf: k-means lists; 0 = about 4 sqrt(items)")
    ivf_nprobe: int = Field(128, ge=1, le=1 << 20, description="ivf: lists scanned per query (at most nlist)")
    ivf_exact_fraction: float = Field(
        0.05,
        ge=0.0,
        le=0.5,
        description="ivf: this fraction of the items, the longest vectors, is kept out of the lists and scored "
        "exactly for every query; 0 = none (with MMF_IVF_EXACT_MIN_ITEMS=0)",
    )
    ivf_exact_min_items: int = Field(
        10_000,
        ge=0,
        le=1 << 30,
        description="ivf: the exact side list holds at least this many of the longest vectors (at most half the "
        "items), whatever MMF_IVF_EXACT_FRACTION gives",
    )
    search_threads: int = Field(
        1, ge=1, le=256, alias="faiss_threads", description="FAISS OpenMP threads per request (search, add)"
    )
    build_threads: int = Field(
        0,
        ge=0,
        le=256,
        alias="index_build_threads",
        description="threads building the index at start-up and reload; 0 = every CPU, 1 = a deterministic hnsw graph",
    )
    target_recall: float = Field(
        0.95,
        ge=0.0,
        le=1.0,
        alias="ann_target_recall",
        description="hnsw, ivf: after a build, set ef_search / nprobe (starting from the settings above) to the "
        "narrowest width whose recall@20 against exact search on sample user queries reaches this; 0 = off",
    )
    calibration_queries: int = Field(
        500, ge=1, le=100_000, alias="ann_calibration_queries", description="user queries sampled for calibration"
    )

    @model_validator(mode="after")
    def _ivf_probes(self) -> IndexSettings:
        # Only when both are set: the default nprobe is simply capped at a small nlist.
        if self.ivf_nlist and "ivf_nprobe" in self.model_fields_set and self.ivf_nprobe > self.ivf_nlist:
            raise ValueError(f"MMF_IVF_NPROBE={self.ivf_nprobe} is more than MMF_IVF_NLIST={self.ivf_nlist}")
        return self

    @classmethod
    def variables(cls) -> list[str]:
        """The names operators set, without the ``MMF_`` prefix, in declaration order."""
        return [field.alias or name for name, field in cls.model_fields.items()]

    def nlist(self, n_items: int) -> int:
        """IVF lists for ``n_items``: the setting, or about 4 sqrt(n) with at least 39 items per list
        (FAISS's minimum for k-means), at least 1. (Many small lists and many probes found more of the
        exact top 20 per microsecond than few large ones on the benchmark's embeddings: bench/serve.py.)"""
        if self.ivf_nlist:
            return self.ivf_nlist
        return max(1, min(round(4 * math.sqrt(n_items)), n_items // 39))

    def exact_items(self, n_items: int) -> int:
        """ivf: how many of the longest vectors of a build go to the exact side list: the fraction of the
        items, but at least the minimum count (at most half the items). A side list is scored for every query,
        so it pays while it saves more probes than it costs
        (docs/performance.md, "Search time per ivf side-list setting")."""
        floor = min(self.ivf_exact_min_items, n_items // 2)
        return max(round(self.ivf_exact_fraction * n_items), floor)

    def check(self, n_items: int) -> None:
        """Raises IndexSettingsError if these settings cannot index ``n_items`` training items."""
        listed = n_items - self.exact_items(n_items)  # the rest are in the exact side list
        if self.kind == "ivf" and self.ivf_nlist and self.ivf_nlist > listed:
            raise IndexSettingsError(
                f"MMF_IVF_NLIST={self.ivf_nlist} lists need at least as many training items, the artifact has "
                f"{n_items} ({listed} in the lists with MMF_IVF_EXACT_FRACTION={self.ivf_exact_fraction} and "
                f"MMF_IVF_EXACT_MIN_ITEMS={self.ivf_exact_min_items}; unset "
                "MMF_IVF_NLIST, or 0, for about 4 sqrt(items))"
            )

    @property
    def build_thread_count(self) -> int:
        """Threads for build-time work (index builds, precomputed lists): ``build_threads``, 0 = every CPU."""
        return self.build_threads or os.cpu_count() or 1
