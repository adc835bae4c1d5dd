r"""Static multimodal fusion: the ablation of the MetaMMF paper's Table 3 (Early, Late and Hybrid
fusion, each with the MF and with the GCN backbone), and the same three for the LightGCN backbone of
:class:`~models.metammf.lightgcn.MetaMMF_LightGCN`.

Everything but the fusion function is MetaMMF's: the item ego representation is
:math:`[e_i^m ; e_i^c]` (fused content plus an ID embedding), the MF variant scores
:math:`e_u^\top e_i` (:class:`~models.metammf.mf.MetaMMF_MF`), the GCN variant propagates over the
training graph with the same GraphSAGE tower (:class:`~models.metammf.gcn.MetaMMF_GCN`: ``SAGETower``
with the fast ``MeanAggregation``), with the same loss, regularisation and feature standardisation.
Only :math:`e_i^m` comes from a fusion network whose weights are shared by all items instead of
being generated per item:

* **Early fusion**: the modalities' features are concatenated, then one MLP tower maps them to
  :math:`e_i^m`: :math:`e_i^m = \mathrm{MLP}([x_i^1 ; \dots ; x_i^M])`.
* **Late fusion**: one MLP tower per modality, the modality embeddings are averaged:
  :math:`e_i^m = \frac1M \sum_m \mathrm{MLP}_m(x_i^m)`.
* **Hybrid fusion**: both, averaged: :math:`e_i^m = \frac12 (e_i^{early} + e_i^{late})`.

This is our reading of the paper's Table 3 (static counterparts that differ from MetaMMF only in the
fusion function). The towers are MetaMMF's with the item-specific part removed: the same widths
(:func:`models.metammf.fusion.tower_widths`, ``config.fusion_layers`` layers, e.g. 2276 -> 1024 -> 512 -> 256
-> 32 for 4 layers; per-modality towers start from the modality's width), no bias, LeakyReLU
(``config.leaky_slope``) between layers and none after the last, Xavier init with
``config.fusion_init_gain`` on the last layer. So MetaMMF with ``T = 0`` is exactly Early fusion.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from torch import Tensor, nn

from models.base import ModelInputs
from models.config import MetaMMFConfig, MetaMMFGraphConfig
from models.metammf.fusion import tower_widths
from models.metammf.gcn import MetaMMF_GCN
from models.metammf.lightgcn import MetaMMF_LightGCN
from models.metammf.mf import MetaMMF_MF, MultimodalItemEncoder

FusionMode = Literal["early", "late", "hybrid"]


def _tower(in_dim: int, out_dim: int, n_layers: int, leaky_slope: float) -> nn.Sequential:
    widths = tower_widths(in_dim, out_dim, n_layers)
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(widths):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.LeakyReLU(leaky_slope)]
    return nn.Sequential(*layers[:-1])  # no activation after the last layer


class StaticFusionNetwork(nn.Module):
    """Raw item features -> fused :math:`e^m`, with one set of weights for all items.

    Args:
        modality_dims: modality name -> width, in the column order of the features.
        fused_dim: output width d_m.
        n_layers: layers per tower.
        mode: 'early', 'late' or 'hybrid' (see the module docstring).
        leaky_slope: LeakyReLU slope between layers.
        init_gain: Xavier gain of each tower's last layer.
    """

    def __init__(
        self,
        modality_dims: dict[str, int],
        fused_dim: int,
        n_layers: int = 1,
        mode: FusionMode = "early",
        leaky_slope: float = 0.01,
        init_gain: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in ("early", "late", "hybrid"):
            raise ValueError(f"unknown fusion mode {mode!r} (expected 'early', 'late' or 'hybrid')")
        self.mode = mode
        self.in_dim = sum(modality_dims.values())
        self.init_gain = init_gain
        bounds = list(itertools.accumulate(modality_dims.values(), initial=0))
        self.slices = [slice(a, b) for a, b in itertools.pairwise(bounds)]
        self.register_buffer("feature_mean", torch.zeros(self.in_dim))
        self.register_buffer("feature_std", torch.ones(self.in_dim))
        self.early = _tower(self.in_dim, fused_dim, n_layers, leaky_slope) if mode != "late" else None
        self.late = (
            nn.ModuleList(_tower(d, fused_dim, n_layers, leaky_slope) for d in modality_dims.values())
            if mode != "early"
            else None
        )
        self.reset_parameters()

    def towers(self) -> list[nn.Sequential]:
        return ([self.early] if self.early is not None else []) + (list(self.late) if self.late is not None else [])

    def reset_parameters(self) -> None:
        for tower in self.towers():
            linears = [m for m in tower if isinstance(m, nn.Linear)]
            for n, layer in enumerate(linears):
                nn.init.xavier_uniform_(layer.weight, gain=self.init_gain if n == len(linears) - 1 else 1.0)

    @torch.no_grad()
    def fit_normalization(self, features: Tensor) -> None:
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6))

    def standardize(self, features: Tensor) -> Tensor:
        return (features - self.feature_mean) / self.feature_std

    def forward(self, features: Tensor) -> Tensor:
        return self.fuse_standardized(self.standardize(features))

    def fuse_standardized(self, x: Tensor) -> Tensor:
        early = self.early(x) if self.early is not None else None
        if self.late is None:
            return early
        late = sum(tower(x[:, cols]) for tower, cols in zip(self.late, self.slices, strict=True)) / len(self.late)
        return late if early is None else (early + late) / 2


def static_item_encoder(
    config: MetaMMFConfig, item_features: Tensor, modality_dims: dict[str, int], mode: FusionMode
) -> MultimodalItemEncoder:
    """Item ego representation [e_i^m ; e_i^c] with static fusion: MetaMMF's item encoder around a
    :class:`StaticFusionNetwork`."""
    fusion = StaticFusionNetwork(
        modality_dims, config.fused_dim, config.fusion_layers, mode, config.leaky_slope, config.fusion_init_gain
    )
    return MultimodalItemEncoder(config, item_features, fusion)


def fusion_mode(config: MetaMMFConfig) -> FusionMode:
    """'early', 'late' or 'hybrid': the first word of the model's name (e.g. ``late_fusion_gcn``)."""
    mode = config.name.split("_", 1)[0]
    if mode not in ("early", "late", "hybrid"):
        raise ValueError(f"model {config.name!r} is not a static-fusion variant (<mode>_fusion_<backbone>)")
    return mode  # type: ignore[return-value]


class StaticFusionMF(MetaMMF_MF):
    """MF backbone with static fusion (the mode from ``config.name``: early, late or hybrid)."""

    def __init__(self, inputs: ModelInputs, config: MetaMMFConfig, reg_weight: float = 1e-4) -> None:
        self.fusion_mode = fusion_mode(config)
        items = static_item_encoder(config, inputs.item_features, inputs.modality_dims, self.fusion_mode)
        super().__init__(inputs, config, reg_weight, items=items)


class StaticFusionGCN(MetaMMF_GCN):
    """GraphSAGE backbone with static fusion (the mode from ``config.name``: early, late or hybrid)."""

    def __init__(self, inputs: ModelInputs, config: MetaMMFGraphConfig, reg_weight: float = 1e-4) -> None:
        self.fusion_mode = fusion_mode(config)
        items = static_item_encoder(config, inputs.item_features, inputs.modality_dims, self.fusion_mode)
        super().__init__(inputs, config, reg_weight, items=items)


class StaticFusionLightGCN(StaticFusionGCN, MetaMMF_LightGCN):
    """LightGCN backbone (with the item-item content graph of ``item_graph_k``) with static fusion: the
    constructor of :class:`StaticFusionGCN`, the tower and propagation of
    :class:`~models.metammf.lightgcn.MetaMMF_LightGCN` (next in the method resolution order)."""
