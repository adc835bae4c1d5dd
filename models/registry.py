"""Model registry: ``name`` -> the model class, its config class and what it can do, so a new model (a
baseline) is one new file plus one line here.

Entries name their class as ``"module:Class"`` and import it on first use, so importing the registry
(the run config validates against it) loads no model code and no torch. Every class is built the same
way, ``Class(inputs, config, reg_weight)`` (:class:`models.base.RecModel`).

Only MetaMMF models are *servable* (the service rebuilds their fusion network and graph layers for
new items and users, :mod:`models.metammf.inference`); the baselines are trained and evaluated only.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Field

from models.config import (
    DEFAULT_MODEL,
    FUSION_MODES,
    ContentConfig,
    GATConfig,
    GraphConfig,
    GraphSAGEConfig,
    GRCNConfig,
    InvRLConfig,
    LATTICEConfig,
    LightGCNConfig,
    MetaMMFConfig,
    MetaMMFGraphConfig,
    MMGCNConfig,
    ModelConfig,
    NGCFConfig,
    VBPRConfig,
)

if TYPE_CHECKING:
    from models.base import ModelInputs, RecModel


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its class, its config class and its capabilities."""

    target: str  # "module:Class", a RecModel subclass
    config: type[ModelConfig]
    summary: str
    servable: bool = False  # exportable as a serving artifact (MetaMMF only)
    embeds_unseen_items: bool = False  # scores items it never saw from their content (embed_unseen_items)

    @property
    def has_content(self) -> bool:
        """Reads item features (a pure ID model does not)."""
        return issubclass(self.config, ContentConfig)

    @property
    def layers_field(self) -> str | None:
        """The config field holding its layer count (tuned), if it has one."""
        return "gcn_layers" if issubclass(self.config, GraphConfig) else None

    def model_class(self) -> type[RecModel]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


def _metammf(target: str, config: type[ModelConfig], summary: str) -> ModelSpec:
    return ModelSpec(target, config, summary, servable=True, embeds_unseen_items=True)


def _static(backbone: str, target: str, config: type[ModelConfig], label: str) -> dict[str, ModelSpec]:
    return {
        f"{mode}_fusion_{backbone}": ModelSpec(
            f"models.baselines.static_fusion:{target}",
            config,
            f"static {mode} fusion, {label} backbone",
            embeds_unseen_items=True,
        )
        for mode in FUSION_MODES
    }


MODELS: dict[str, ModelSpec] = {
    "metammf_gcn": _metammf("models.metammf.gcn:MetaMMF_GCN", MetaMMFGraphConfig, "MetaMMF, GraphSAGE backbone"),
    "metammf_mf": _metammf("models.metammf.mf:MetaMMF_MF", MetaMMFConfig, "MetaMMF, MF backbone"),
    "metammf_lightgcn": _metammf(
        "models.metammf.lightgcn:MetaMMF_LightGCN",
        MetaMMFGraphConfig,
        "MetaMMF, LightGCN backbone with a frozen item-item content graph",
    ),
    # Baselines (the paper's Table 2) ...
    "vbpr": ModelSpec("models.baselines.vbpr:VBPR", VBPRConfig, "VBPR (He & McAuley 2016)", embeds_unseen_items=True),
    "lightgcn": ModelSpec("models.baselines.lightgcn:LightGCN", LightGCNConfig, "LightGCN (He et al. 2020), pure CF"),
    "ngcf": ModelSpec("models.baselines.ngcf:NGCF", NGCFConfig, "NGCF (Wang et al. 2019), pure CF"),
    "graphsage": ModelSpec(
        "models.baselines.graphsage:GraphSAGE",
        GraphSAGEConfig,
        "GraphSAGE (Hamilton et al. 2017), multimodal items",
        embeds_unseen_items=True,
    ),
    "gat": ModelSpec(
        "models.baselines.gat:GAT",
        GATConfig,
        "GAT (Velickovic et al. 2018), multimodal items",
        embeds_unseen_items=True,
    ),
    "mmgcn": ModelSpec(
        "models.baselines.mmgcn:MMGCN", MMGCNConfig, "MMGCN (Wei et al. 2019)", embeds_unseen_items=True
    ),
    "grcn": ModelSpec(
        "models.baselines.grcn:GRCN",
        GRCNConfig,
        "GRCN (Wei et al. 2020), refined user-item graph",
        embeds_unseen_items=True,
    ),
    "lattice": ModelSpec(
        "models.baselines.lattice:LATTICE",
        LATTICEConfig,
        "LATTICE (Zhang et al. 2021), learned item-item graph",
        embeds_unseen_items=True,
    ),
    "invrl": ModelSpec(
        "models.baselines.invrl:InvRL",
        InvRLConfig,
        "InvRL (Du et al. 2022), invariant feature mask",
        embeds_unseen_items=True,
    ),
    # ... and the static-fusion variants of its Table 3, and with the served default's LightGCN backbone.
    **_static("mf", "StaticFusionMF", MetaMMFConfig, "MF"),
    **_static("gcn", "StaticFusionGCN", MetaMMFGraphConfig, "GCN"),
    **_static("lightgcn", "StaticFusionLightGCN", MetaMMFGraphConfig, "LightGCN"),
}

# The model section of a run config: one of the registered config classes, told apart by ``name``.
AnyModelConfig = Annotated[
    Union[tuple(dict.fromkeys(spec.config for spec in MODELS.values()))],  # noqa: UP007 (a runtime tuple)
    Field(discriminator="name"),
]


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


def unseen_items_problem(name: str) -> str | None:
    """Why model ``name`` cannot score items unseen in training from their content (None: it can)."""
    spec = get_spec(name)
    if spec.embeds_unseen_items:
        return None
    able = ", ".join(n for n, s in MODELS.items() if s.embeds_unseen_items)
    why = "is a pure ID model (no item content)" if not spec.has_content else "has no content-only item representation"
    return f"model {name!r} {why}: it cannot score items unseen in training; use one of: {able}"


def check_model_section(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a config's model section) with the default name filled in, checked before validation:
    an unknown name, or a setting the named model does not have, is a ``ValueError`` that says which."""
    data = {"name": DEFAULT_MODEL, **data}
    name = data["name"]
    config = get_spec(name).config
    unknown = [key for key in data if key not in config.model_fields]
    if unknown:
        raise ValueError(
            f"model {name!r} has no setting {', '.join(map(repr, unknown))}; its settings: "
            f"{', '.join(f for f in config.model_fields if f != 'name')}"
        )
    return data


def parse_model_config(data: Mapping[str, Any], *, ignore_other_settings: bool = False) -> ModelConfig:
    """The config object of the model ``data["name"]`` (default: the served default). With
    ``ignore_other_settings``, keys its model does not have are dropped (a config shared by several models,
    or a resolved config that lists the settings of every model) instead of refused."""
    if ignore_other_settings:
        config = get_spec(data.get("name", DEFAULT_MODEL)).config
        data = {key: value for key, value in data.items() if key in config.model_fields}
    data = check_model_section(data)
    return get_spec(data["name"]).config.model_validate(data)


def build_model(inputs: ModelInputs, config: ModelConfig, reg_weight: float) -> RecModel:
    """The model named by ``config.name``, built for ``inputs``."""
    return get_spec(config.name).model_class()(inputs, config, reg_weight)
