"""Model registry: ``ModelConfig.name`` -> a builder, so a new model (a baseline) is one new file plus
one line here.

A builder takes the data-derived :class:`ModelInputs`, the :class:`~models.config.ModelConfig` and the
L2 weight, and returns a :class:`~models.base.RecModel`. Entries name their builder as
``"module:attribute"`` and are imported on first use, so importing the registry (``ModelConfig``
validates names against it) loads no model code. A class entry is built with its ``from_inputs``
classmethod, a function entry is called as it is.

Only MetaMMF models are *servable* (the service rebuilds their fusion network and graph layers for
new items and users, :mod:`models.inference`); the baselines are trained and evaluated only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from models.base import RecModel
    from models.config import ModelConfig


@dataclass(frozen=True)
class ModelInputs:
    """What a model is built from, derived from the data set (training interactions only).

    Attributes:
        n_users: number of users.
        item_features: (n_items, d_x) float32 raw features, modalities concatenated in
            ``modality_dims`` order.
        modality_dims: modality name -> width, in the column order of ``item_features``.
        train_pairs: (n, 2) int64 training (user, item) pairs: the interaction graph.
    """

    n_users: int
    item_features: Tensor
    modality_dims: dict[str, int]
    train_pairs: Tensor

    def __post_init__(self) -> None:
        if sum(self.modality_dims.values()) != self.item_features.shape[1]:
            raise ValueError(
                f"modality widths {self.modality_dims} do not add up to the {self.item_features.shape[1]} "
                "feature columns"
            )

    @property
    def n_items(self) -> int:
        return int(self.item_features.shape[0])

    @property
    def modality_slices(self) -> dict[str, slice]:
        """Columns of each modality in ``item_features``."""
        slices, start = {}, 0
        for name, dim in self.modality_dims.items():
            slices[name] = slice(start, start + dim)
            start += dim
        return slices


Builder = Callable[["ModelInputs", "ModelConfig", float], "RecModel"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: where its builder lives and what it is."""

    target: str  # "module:attribute": a RecModel class with ``from_inputs``, or a builder function
    summary: str
    servable: bool = False  # exportable as a serving artifact (MetaMMF only)
    layers_field: str | None = None  # the ModelConfig field holding its layer count (tuned), if any

    def builder(self) -> Builder:
        module, _, attr = self.target.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        return obj.from_inputs if isinstance(obj, type) else obj


def _metammf_mf(inputs: ModelInputs, config: ModelConfig, reg_weight: float) -> RecModel:
    from models.metammf_mf import MetaMMF_MF

    return MetaMMF_MF(inputs.n_users, inputs.item_features, config, reg_weight, train_pairs=inputs.train_pairs)


def _metammf_gcn(inputs: ModelInputs, config: ModelConfig, reg_weight: float) -> RecModel:
    from models.metammf_gcn import MetaMMF_GCN

    return MetaMMF_GCN(inputs.n_users, inputs.item_features, inputs.train_pairs, config, reg_weight)


def _metammf_lightgcn(inputs: ModelInputs, config: ModelConfig, reg_weight: float) -> RecModel:
    from models.metammf_lightgcn import MetaMMF_LightGCN

    return MetaMMF_LightGCN(inputs.n_users, inputs.item_features, inputs.train_pairs, config, reg_weight)


MODELS: dict[str, ModelSpec] = {
    "metammf_gcn": ModelSpec(
        "models.registry:_metammf_gcn", "MetaMMF, GraphSAGE backbone", servable=True, layers_field="gcn_layers"
    ),
    "metammf_mf": ModelSpec("models.registry:_metammf_mf", "MetaMMF, MF backbone", servable=True),
    "metammf_lightgcn": ModelSpec(
        "models.registry:_metammf_lightgcn",
        "MetaMMF, LightGCN backbone with a frozen item-item content graph",
        servable=True,
        layers_field="gcn_layers",
    ),
    # Baselines (the paper's Table 2) ...
    "vbpr": ModelSpec("models.vbpr:VBPR", "VBPR (He & McAuley 2016)"),
    "lightgcn": ModelSpec("models.lightgcn:LightGCN", "LightGCN (He et al. 2020), pure CF", layers_field="gcn_layers"),
    "ngcf": ModelSpec("models.ngcf:NGCF", "NGCF (Wang et al. 2019), pure CF", layers_field="gcn_layers"),
    "graphsage": ModelSpec(
        "models.graphsage:GraphSAGE", "GraphSAGE (Hamilton et al. 2017), multimodal items", layers_field="gcn_layers"
    ),
    "gat": ModelSpec("models.gat:GAT", "GAT (Velickovic et al. 2018), multimodal items", layers_field="gcn_layers"),
    "mmgcn": ModelSpec("models.mmgcn:MMGCN", "MMGCN (Wei et al. 2019)", layers_field="gcn_layers"),
    "grcn": ModelSpec("models.grcn:GRCN", "GRCN (Wei et al. 2020), refined user-item graph", layers_field="gcn_layers"),
    "lattice": ModelSpec(
        "models.lattice:LATTICE", "LATTICE (Zhang et al. 2021), learned item-item graph", layers_field="gcn_layers"
    ),
    "invrl": ModelSpec("models.invrl:InvRL", "InvRL (Du et al. 2022), invariant feature mask"),
    # ... and the static-fusion variants of its Table 3.
    "early_fusion_mf": ModelSpec("models.static_fusion:early_fusion_mf", "static early fusion, MF backbone"),
    "late_fusion_mf": ModelSpec("models.static_fusion:late_fusion_mf", "static late fusion, MF backbone"),
    "hybrid_fusion_mf": ModelSpec("models.static_fusion:hybrid_fusion_mf", "static hybrid fusion, MF backbone"),
    "early_fusion_gcn": ModelSpec(
        "models.static_fusion:early_fusion_gcn", "static early fusion, GCN backbone", layers_field="gcn_layers"
    ),
    "late_fusion_gcn": ModelSpec(
        "models.static_fusion:late_fusion_gcn", "static late fusion, GCN backbone", layers_field="gcn_layers"
    ),
    "hybrid_fusion_gcn": ModelSpec(
        "models.static_fusion:hybrid_fusion_gcn", "static hybrid fusion, GCN backbone", layers_field="gcn_layers"
    ),
    # ... and with the served default's LightGCN backbone.
    **{
        f"{mode}_fusion_lightgcn": ModelSpec(
            f"models.static_fusion:{mode}_fusion_lightgcn",
            f"static {mode} fusion, LightGCN backbone",
            layers_field="gcn_layers",
        )
        for mode in ("early", "late", "hybrid")
    },
}


def model_names() -> list[str]:
    return list(MODELS)


def servable_names() -> list[str]:
    return [name for name, spec in MODELS.items() if spec.servable]


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(MODELS)}") from None


def is_servable(name: str) -> bool:
    return get_spec(name).servable


def build_model(inputs: ModelInputs, config: ModelConfig, reg_weight: float) -> RecModel:
    """The model named by ``config.name``, built for ``inputs``."""
    return get_spec(config.name).builder()(inputs, config, reg_weight)
