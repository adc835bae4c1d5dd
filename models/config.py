"""Typed model hyper-parameters, shared by training (to build) and the service (to rebuild from artifacts).

Every model has its own config class, registered with it in :mod:`models.registry` (the ``name`` field
tells them apart); the classes share their common fields through the bases here. This module imports
neither torch nor model code, so configs validate before any model loads.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODEL = "metammf_lightgcn"
FUSION_MODES = ("early", "late", "hybrid")


class ModelConfig(BaseModel):
    """What every model has: its name and the width of its embeddings (d_m + d_c)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the model (models.registry.MODELS)")
    fused_dim: int = Field(
        32, ge=1, description="d_m: output width of the fusion tower (baselines: half of the embedding width)"
    )
    id_dim: int = Field(
        32, ge=1, description="d_c: width of the item ID embedding e_i^c (baselines: the other half of the width)"
    )

    loss: Literal["bpr", "softmax"] = Field(
        "bpr",
        description="ranking loss: BPR on (user, positive, negative) triples, or the sampled softmax of each "
        "positive against negatives shared by its training batch",
    )
    softmax_temperature: float = Field(1.0, gt=0, description="with loss='softmax': the temperature of the scores")
    softmax_negatives: int = Field(
        256, ge=1, description="with loss='softmax': the batch's shared negatives (uniformly sampled items)"
    )

    @property
    def embedding_dim(self) -> int:
        """Width of the final item/user embeddings (d_m + d_c)."""
        return self.fused_dim + self.id_dim


class ContentConfig(ModelConfig):
    """A model that reads item features."""

    normalize_features: bool = Field(True, description="standardise raw features with training statistics")


class GraphConfig(ModelConfig):
    """A model that propagates over the user-item graph (its layer count is tuned)."""

    gcn_layers: int = Field(
        3, ge=1, le=4, description="graph layers (GraphSAGE for metammf_gcn, LightGCN for metammf_lightgcn)"
    )


class MessageDropoutConfig(ModelConfig):
    message_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="NGCF: message dropout on each layer's output (0.1 in Wang et al. 2019); GAT: dropout on the "
        "attention coefficients (0.6 in Velickovic et al. 2018); training only",
    )


class MetaMMFConfig(ContentConfig):
    """MetaMMF with the MF backbone, and the static-fusion MF variants of the paper's Table 3 (which use the
    fusion settings but have no meta information)."""

    name: Literal["metammf_mf", "early_fusion_mf", "late_fusion_mf", "hybrid_fusion_mf"] = "metammf_mf"
    meta_dim: int = Field(5, ge=1, description="d_s: size of the meta information s_i")
    extractor_hidden: int = Field(64, ge=1, description="hidden width of the meta information extractor MLP")
    fusion_layers: int = Field(1, ge=1, le=4, description="number of layers in the item-specific fusion tower")
    tensor: Literal["cp", "full"] = Field("cp", description="parameterisation of the meta tensor T")
    rank: int = Field(16, ge=1, le=256, description="CP rank R when tensor='cp'")
    static_weights: bool = Field(True, description="keep the static part W of W_i = W + T x3 s_i")
    leaky_slope: float = Field(0.01, ge=0.0, lt=1.0)
    fusion_init_gain: float = Field(
        1.0, gt=0, description="Xavier gain of the last fusion layer (scales e_i^m at initialisation)"
    )
    layer_reg: float = Field(0.0, ge=0.0, description="L2 weight on the GraphSAGE and fusion weights")
    feature_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of the standardised raw feature values zeroed in training, the fusion network's input "
        "(inverted dropout: the rest scaled up); regularises the fused content",
    )
    # New items (POST /items, held-out items, items without training interactions): content only.
    cold_item_dropout: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="share of each training batch's items scored through their content-only representation "
        "(what a new item gets: fused content, the mean ID embedding, no graph neighbours), so the content "
        "path learns to rank on its own and on the same scale as trained items (DropoutNet-style)",
    )
    cold_item_dropout_negatives: bool = Field(
        True,
        description="cold_item_dropout drops a batch's negatives too (false: its positives alone, so a new item's "
        "representation is only ever scored against trained items, never shared as a negative of every row by the "
        "sampled softmax)",
    )
    cold_item_dropout_skip_top: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="share of the items with the most training interactions that cold_item_dropout never "
        "drops: popular items are never new, and their ordering is where their trained ID matters most",
    )
    untrained_items: Literal["id", "content"] = Field(
        "content",
        description="items without training interactions: their ID embedding (the paper) or the content-only "
        "representation a new item gets",
    )


class MetaMMFGraphConfig(MetaMMFConfig, GraphConfig):
    """MetaMMF with a graph backbone (GraphSAGE: metammf_gcn; LightGCN: metammf_lightgcn, the served default),
    and the static-fusion graph variants."""

    name: Literal[
        "metammf_lightgcn",
        "metammf_gcn",
        "early_fusion_gcn",
        "late_fusion_gcn",
        "hybrid_fusion_gcn",
        "early_fusion_lightgcn",
        "late_fusion_lightgcn",
        "hybrid_fusion_lightgcn",
    ] = DEFAULT_MODEL
    layer_combine: Literal["last", "mean"] = Field(
        "mean", description="final GCN embedding: last layer, or the mean of all layer outputs (incl. input)"
    )
    sage_init: Literal["default", "mean", "residual"] = Field(
        "default",
        description="SAGEConv init: PyG default, 'mean' (W_neigh=I, W_self=0: plain mean aggregation) "
        "or 'residual' (W_neigh=I, W_self=I)",
    )
    activate_last: bool = Field(True, description="LeakyReLU after the last GraphSAGE layer too")
    sage_bias: bool = Field(True, description="bias in the SAGEConv neighbour projection")
    edge_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="share of graph edges dropped per training step")
    edge_pruning: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of the user-item edges dropped for each training epoch, drawn degree-sensitively "
        "(edges between popular nodes most, FREEDOM's pruning); evaluation and serving use every edge",
    )
    reg_target: Literal["ego", "final"] = Field(
        "ego", description="what the L2 term penalises: the ego (layer-0) or the final GCN representations"
    )
    content_reg_weight: float | None = Field(
        None,
        ge=0.0,
        description="L2 weight of the items' ego fused content e^m apart from the rest, which keeps train.reg_weight "
        "(reg_target 'ego': the ID embeddings and users; 'final': the final representations); default: no "
        "separate term",
    )
    content_alignment: float = Field(
        0.0,
        ge=0.0,
        description="weight of a distillation term pulling each batch item's content-only representation "
        "towards its trained one (squared distance to the detached final embedding)",
    )
    content_contrast: float = Field(
        0.0,
        ge=0.0,
        description="weight of a contrastive term (InfoNCE) between each batch item's content-only representation "
        "and its trained one: each must pick out the other among the batch's items (BM3/MMSSL's alignment of the "
        "content and ID views; both sides learn); 0 = off",
    )
    content_contrast_temperature: float = Field(
        0.2, gt=0.0, description="with content_contrast: the temperature of its cosine similarities"
    )
    content_contrast_items: int = Field(
        512, ge=2, description="with content_contrast: at most this many distinct trained items of a batch take part"
    )
    content_neighbors: int = Field(
        30,
        ge=0,
        le=1000,
        description="a new item also borrows the graph states of its k nearest trained items by content (cosine "
        "of the standardised raw features): their mean times a learned scale (which puts new items on the "
        "trained items' score scale), plus its own content-only states (content_residual); 0 = content-only "
        "states alone",
    )
    content_residual: bool = Field(
        False,
        description="with content_neighbors: a new item's own content-only states are added to the neighbours' "
        "scaled mean (false: the scaled mean alone)",
    )
    item_graph_k: int = Field(
        10,
        ge=0,
        le=1000,
        description="each item's final embedding adds the similarity-weighted mean of the ego representations of "
        "its k nearest trained items by content (a frozen item-item graph, as in FREEDOM; "
        "models/metammf/item_graph.py); 0 = off",
    )
    item_graph_new_k: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="with item_graph_k: the neighbours in the item graph of items without training interactions "
        "(new items, POST /items); default item_graph_k",
    )
    item_graph_normalize: bool = Field(
        False, description="with item_graph_k: the item-graph term scaled to unit length (as LATTICE adds it)"
    )
    item_graph_weight: float = Field(
        1.0,
        ge=0.0,
        description="with item_graph_k: the factor of the item-graph term (1: the neighbours' mean ego "
        "representation counts as much as the whole propagated embedding)",
    )
    item_graph_half_degree: float | None = Field(
        None,
        gt=0.0,
        description="with item_graph_k: a trained item's term is scaled by 1 / (1 + n_i / this), n_i its training "
        "interactions (an item with many has a well-trained ID embedding and leans less on its content "
        "neighbours; new items keep the full term); default: every item alike",
    )
    isolated_nodes: Literal["zeros", "self"] = Field(
        "self",
        description="neighbour aggregate of a node without neighbours (a new item): zeros (PyG's mean "
        "aggregation) or the node's own state (a self loop, so its content survives every layer)",
    )

    @model_validator(mode="after")
    def _new_k_needs_the_graph(self) -> MetaMMFGraphConfig:
        if self.item_graph_new_k is not None and not self.item_graph_k:
            raise ValueError("item_graph_new_k needs the item graph: set item_graph_k > 0, or drop item_graph_new_k")
        if self.item_graph_half_degree is not None and not self.item_graph_k:
            raise ValueError(
                "item_graph_half_degree needs the item graph: set item_graph_k > 0, or drop item_graph_half_degree"
            )
        return self

    @property
    def new_item_graph_k(self) -> int:
        """Item-graph neighbours of an item without training interactions (0: no item graph)."""
        return self.item_graph_k if self.item_graph_new_k is None else self.item_graph_new_k


# The baselines: each reads the fields of its class and nothing else.


class VBPRConfig(ContentConfig):
    """VBPR: d_c-wide ID factors and d_m-wide content factors."""

    name: Literal["vbpr"] = "vbpr"
    layer_reg: float = Field(0.0, ge=0.0, description="L2 weight on the content projection E and the content bias")


class LightGCNConfig(GraphConfig):
    name: Literal["lightgcn"] = "lightgcn"


class NGCFConfig(GraphConfig, MessageDropoutConfig):
    name: Literal["ngcf"] = "ngcf"


class GraphSAGEConfig(GraphConfig, ContentConfig):
    name: Literal["graphsage"] = "graphsage"


class GATConfig(GraphSAGEConfig, MessageDropoutConfig):
    name: Literal["gat"] = "gat"
    gat_heads: int = Field(1, ge=1, le=16, description="attention heads per layer (their outputs averaged)")


class MMGCNConfig(GraphConfig, ContentConfig):
    name: Literal["mmgcn"] = "mmgcn"
    leaky_slope: float = Field(0.01, ge=0.0, lt=1.0)


class GRCNConfig(GraphConfig, ContentConfig):
    name: Literal["grcn"] = "grcn"
    leaky_slope: float = Field(0.01, ge=0.0, lt=1.0)
    edge_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="share of graph edges dropped per training step")
    grcn_routing: int = Field(
        3, ge=0, le=10, description="routing iterations refining the user prototypes per modality"
    )


class LATTICEConfig(GraphConfig, ContentConfig):
    name: Literal["lattice"] = "lattice"
    lattice_knn_k: int = Field(10, ge=1, description="neighbours per item in the item-item kNN graphs")
    lattice_lambda: float = Field(
        0.9, ge=0.0, le=1.0, description="weight of the initial item graph in the skip connection"
    )
    lattice_item_layers: int = Field(1, ge=1, le=4, description="item-item graph convolution layers")


class InvRLConfig(ContentConfig):
    name: Literal["invrl"] = "invrl"
    loss: Literal["bpr"] = Field("bpr", description="BPR only: InvRL's invariance penalty is defined on it")
    invrl_envs: int = Field(2, ge=1, le=16, description="number of heterogeneous environments")
    invrl_irm_weight: float = Field(
        1e8,
        ge=0.0,
        description="weight alpha of the invariance penalty (official form, quartic in the per-environment "
        "gradients, hence large; tune per data set)",
    )
    invrl_mask_reg: float = Field(1e-3, ge=0.0, description="L2 weight on the feature-mask parameters mu")
    invrl_refresh_epochs: int = Field(
        10, ge=1, description="epochs between environment re-learning rounds (3 rounds, then fixed)"
    )
