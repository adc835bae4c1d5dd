r"""How dynamic a trained fusion network is: the share of each item's fused representation that depends on
its own meta information :math:`s_i`.

Each fusion layer maps :math:`h_i \mapsto h_i W_i` with :math:`W_i = W + \mathcal{T} \times_3 s_i`. Split the
item-specific matrix around the mean meta information :math:`\bar s`:

.. math::
    h_i W_i = \underbrace{h_i (W + \mathcal{T} \times_3 \bar s)}_{\text{one static map for all items}}
            + \underbrace{h_i (\mathcal{T} \times_3 (s_i - \bar s))}_{\text{item-specific}}

The first term is what a static fusion layer could learn; the second is what dynamic fusion adds. The
*dynamic share* of a layer is :math:`\sum_i \lVert \text{item-specific}_i \rVert^2 / \sum_i \lVert h_i W_i
\rVert^2` over all items, measured on the layer's actual inputs (the previous layer's activated outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.metammf.fusion import MetaFusionNetwork


@dataclass(frozen=True)
class LayerShare:
    """One fusion layer's decomposition over a set of items."""

    layer: int
    dynamic_share: float  # item-specific energy / output energy
    static_share: float  # energy of the mean map's output / output energy
    meta_spread: float  # mean over the d_s dimensions of the std of s_i across items


@torch.no_grad()
def fusion_shares(fusion: MetaFusionNetwork, inputs: Tensor) -> list[LayerShare]:
    """:class:`LayerShare` of every layer of ``fusion`` for items with standardised features ``inputs``."""
    s = fusion.meta_information(inputs)
    mean_s = s.mean(0, keepdim=True).expand_as(s)
    shares, h = [], inputs
    for n, layer in enumerate(fusion.layers):
        out = layer(h, s)
        static = layer(h, mean_s)
        total = out.pow(2).sum().clamp_min(1e-30)
        shares.append(
            LayerShare(
                layer=n + 1,
                dynamic_share=float((out - static).pow(2).sum() / total),
                static_share=float(static.pow(2).sum() / total),
                meta_spread=float(s.std(0).mean()),
            )
        )
        h = fusion.activation(out) if n < len(fusion.layers) - 1 else out
    return shares
