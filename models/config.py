"""Typed model hyper-parameters, shared by training (to build) and the service (to rebuild from artifacts)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Settings only a graph backbone can use: zero for an MF backbone unless set explicitly (then an error).
GRAPH_ONLY_FIELDS = ("content_neighbors", "item_graph_k")


def is_mf_backbone(name: str) -> bool:
    """MetaMMF_MF and the static-fusion MF variants: no user-item graph."""
    return name == "metammf_mf" or name.endswith("_fusion_mf")


class ModelConfig(BaseModel):
    """Hyper-parameters of a MetaMMF model (and of the baselines behind the same contract)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "metammf_lightgcn",
        description="the model: metammf_gcn, metammf_lightgcn, metammf_mf or a baseline (models.registry.MODELS)",
    )
    meta_dim: int = Field(5, ge=1, description="d_s: size of the meta information s_i")
    extractor_hidden: int = Field(64, ge=1, description="hidden width of the meta information extractor MLP")
    fused_dim: int = Field(32, ge=1, description="d_m: output width of the fusion tower")
    id_dim: int = Field(32, ge=1, description="d_c: width of the item ID embedding e_i^c")
    fusion_layers: int = Field(1, ge=1, le=4, description="number of layers in the item-specific fusion tower")
    tensor: Literal["cp", "full"] = Field("cp", description="parameterisation of the meta tensor T")
    rank: int = Field(16, ge=1, le=256, description="CP rank R when tensor='cp'")
    static_weights: bool = Field(True, description="keep the static part W of W_i = W + T x3 s_i")
    leaky_slope: float = Field(0.01, ge=0.0, lt=1.0)
    normalize_features: bool = Field(True, description="standardise raw features with training statistics")
    gcn_layers: int = Field(
        3, ge=1, le=4, description="graph layers (GraphSAGE for metammf_gcn, LightGCN for metammf_lightgcn)"
    )
    layer_combine: Literal["last", "mean"] = Field(
        "mean", description="final GCN embedding: last layer, or the mean of all layer outputs (incl. input)"
    )
    fusion_init_gain: float = Field(
        1.0, gt=0, description="Xavier gain of the last fusion layer (scales e_i^m at initialisation)"
    )
    sage_init: Literal["default", "mean", "residual"] = Field(
        "default",
        description="SAGEConv init: PyG default, 'mean' (W_neigh=I, W_self=0: plain mean aggregation) "
        "or 'residual' (W_neigh=I, W_self=I)",
    )
    activate_last: bool = Field(True, description="LeakyReLU after the last GraphSAGE layer too")
    sage_bias: bool = Field(True, description="bias in the SAGEConv neighbour projection")
    edge_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="share of graph edges dropped per training step")
    reg_target: Literal["ego", "final"] = Field(
        "ego", description="what the L2 term penalises: the ego (layer-0) or the final GCN representations"
    )
    layer_reg: float = Field(0.0, ge=0.0, description="L2 weight on the GraphSAGE and fusion weights")
    # New items (POST /items, held-out items, items without training interactions): content only.
    cold_item_dropout: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="share of each training batch's items scored through their content-only representation "
        "(what a new item gets: fused content, the mean ID embedding, no graph neighbours), so the content "
        "path learns to rank on its own and on the same scale as trained items (DropoutNet-style)",
    )
    content_alignment: float = Field(
        0.0,
        ge=0.0,
        description="graph backbones: weight of a distillation term pulling each batch item's content-only "
        "representation towards its trained one (squared distance to the detached final embedding)",
    )
    content_neighbors: int = Field(
        30,
        ge=0,
        le=1000,
        description="graph backbones: a new item also borrows the graph states of its k nearest trained items by "
        "content (cosine of the standardised raw features): their mean times a learned scale (which puts new "
        "items on the trained items' score scale), plus its own content-only states (content_residual); "
        "0 = content-only states alone",
    )
    content_residual: bool = Field(
        False,
        description="with content_neighbors: a new item's own content-only states are added to the neighbours' "
        "scaled mean (false: the scaled mean alone)",
    )
    untrained_items: Literal["id", "content"] = Field(
        "content",
        description="items without training interactions: their ID embedding (the paper) or the content-only "
        "representation a new item gets",
    )
    item_graph_k: int = Field(
        10,
        ge=0,
        le=1000,
        description="graph backbones: each item's final embedding adds the similarity-weighted mean of the ego "
        "representations of its k nearest trained items by content (a frozen item-item graph, as in FREEDOM; "
        "models/item_graph.py); 0 = off",
    )
    item_graph_normalize: bool = Field(
        False, description="with item_graph_k: the item-graph term scaled to unit length (as LATTICE adds it)"
    )
    isolated_nodes: Literal["zeros", "self"] = Field(
        "self",
        description="graph backbones: neighbour aggregate of a node without neighbours (a new item): zeros (PyG's mean "
        "aggregation) or the node's own state (a self loop, so its content survives every layer)",
    )
    # Baseline-only settings (MetaMMF ignores them); the baselines otherwise reuse the fields above
    # (embedding_dim, gcn_layers, fusion_layers, leaky_slope, normalize_features, ...).
    message_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="baselines: NGCF message dropout on each layer's output (0.1 in Wang et al. 2019); "
        "GAT dropout on the attention coefficients (0.6 in Velickovic et al. 2018); training only",
    )
    gat_heads: int = Field(1, ge=1, le=16, description="GAT: attention heads per layer (their outputs averaged)")
    grcn_routing: int = Field(
        3, ge=0, le=10, description="GRCN: routing iterations refining the user prototypes per modality"
    )
    lattice_knn_k: int = Field(10, ge=1, description="LATTICE: neighbours per item in the item-item kNN graphs")
    lattice_lambda: float = Field(
        0.9, ge=0.0, le=1.0, description="LATTICE: weight of the initial item graph in the skip connection"
    )
    lattice_item_layers: int = Field(1, ge=1, le=4, description="LATTICE: item-item graph convolution layers")
    invrl_envs: int = Field(2, ge=1, le=16, description="InvRL: number of heterogeneous environments")
    invrl_irm_weight: float = Field(
        1e8,
        ge=0.0,
        description="InvRL: weight alpha of the invariance penalty (official form, quartic in the "
        "per-environment gradients, hence large; tune per data set)",
    )
    invrl_mask_reg: float = Field(1e-3, ge=0.0, description="InvRL: L2 weight on the feature-mask parameters mu")
    invrl_refresh_epochs: int = Field(
        10, ge=1, description="InvRL: epochs between environment re-learning rounds (3 rounds, then fixed)"
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from models.registry import MODELS  # the registry imports no model code

        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(MODELS)}")
        return name

    @model_validator(mode="after")
    def _neighbors_need_a_graph(self) -> ModelConfig:
        """The graph-only new-item settings: off for an MF backbone where they are defaults, an error where the
        user set them."""
        is_mf = is_mf_backbone(self.name)
        for field in GRAPH_ONLY_FIELDS:
            if not (getattr(self, field) and is_mf):
                continue
            if field not in self.model_fields_set:
                object.__setattr__(self, field, 0)  # (frozen-style assignment: no re-validation loop)
                continue
            raise ValueError(
                f"{field}={getattr(self, field)} needs a graph backbone and model {self.name!r} is MF: "
                f"set model.{field}=0 (e.g. --set model.{field}=0)"
            )
        return self

    @property
    def embedding_dim(self) -> int:
        """Width of the final item/user embeddings (d_m + d_c)."""
        return self.fused_dim + self.id_dim
