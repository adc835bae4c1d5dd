r"""The MetaMMF meta learner: item-specific multimodal fusion networks generated from item content.

For item i with concatenated raw features :math:`x_i`:

.. math::
    s_i = \mathrm{MLP}_{\mathrm{ReLU}}(x_i) \in \mathbb{R}^{d_s}

    W_i^n = W^n + \mathcal{T}^n \times_3 s_i

    h_i^n = \mathrm{LeakyReLU}(h_i^{n-1} W_i^n) \quad (\text{no activation after the last layer}),
    \qquad e_i^m = h_i^N

With the CP decomposition :math:`\mathcal{T} = [\![A, B, C]\!]` the layer is computed as the contraction
:math:`x W_i = x W + ((x A) \odot (s_i C)) B^\top`; with the full tensor as
:math:`x W_i = x W + \sum_k s_{ik} (x \mathcal{T}_{::k})`. Neither materialises a per-item matrix.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from torch import Tensor, nn


def tower_widths(in_dim: int, out_dim: int, n_layers: int) -> list[int]:
    """Widths of an ``n_layers`` tower: hidden widths start at the largest power of two <= in_dim / 2,
    halve per layer and never go below ``out_dim``; e.g. 2276 -> 1024 -> 512 -> 256 -> 32 for 4 layers."""
    widths = [in_dim]
    hidden = 1 << max(0, (in_dim // 2).bit_length() - 1)
    for _ in range(n_layers - 1):
        hidden = max(out_dim, hidden)
        widths.append(hidden)
        hidden //= 2
    widths.append(out_dim)
    return widths


class MetaFusionLayer(nn.Module):
    r"""One item-specific linear map :math:`x \mapsto x (W + \mathcal{T} \times_3 s)`, batched, no bias."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        meta_dim: int,
        tensor: Literal["cp", "full"] = "cp",
        rank: int = 16,
        static_weights: bool = True,
        init_gain: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.meta_dim = in_dim, out_dim, meta_dim
        self.tensor = tensor
        self.init_gain = init_gain
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim)) if static_weights else None
        if tensor == "cp":
            self.factor_in = nn.Parameter(torch.empty(in_dim, rank))  # A
            self.factor_out = nn.Parameter(torch.empty(out_dim, rank))  # B
            self.factor_meta = nn.Parameter(torch.empty(meta_dim, rank))  # C
        elif tensor == "full":
            self.meta_tensor = nn.Parameter(torch.empty(in_dim, out_dim, meta_dim))
        else:
            raise ValueError(f"unknown tensor parameterisation {tensor!r} (expected 'cp' or 'full')")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform, with ``init_gain`` on W and on the output side of T (B for CP), so the
        layer's output scales linearly with the gain."""
        if self.weight is not None:
            nn.init.xavier_uniform_(self.weight, gain=self.init_gain)
        if self.tensor == "cp":
            nn.init.xavier_uniform_(self.factor_in)
            nn.init.xavier_uniform_(self.factor_meta)
            nn.init.xavier_uniform_(self.factor_out, gain=self.init_gain)
        else:
            # Xavier over the (in, out) slices, so every slice T_::k is scaled like W.
            bound = self.init_gain * (6.0 / (self.in_dim + self.out_dim)) ** 0.5
            nn.init.uniform_(self.meta_tensor, -bound, bound)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        """``x``: (b, in_dim) inputs, ``s``: (b, meta_dim) meta information -> (b, out_dim)."""
        if self.tensor == "cp":
            out = ((x @ self.factor_in) * (s @ self.factor_meta)) @ self.factor_out.T
        else:
            per_slice = (x @ self.meta_tensor.reshape(self.in_dim, -1)).view(-1, self.out_dim, self.meta_dim)
            out = torch.bmm(per_slice, s.unsqueeze(-1)).squeeze(-1)
        if self.weight is not None:
            out = out + x @ self.weight
        return out

    def item_weight(self, s: Tensor) -> Tensor:
        """The explicit per-item matrices W_i (b, in_dim, out_dim). Reference/debugging only: the
        forward pass never builds them."""
        if self.tensor == "cp":
            core = torch.einsum("ir,or,br->bio", self.factor_in, self.factor_out, s @ self.factor_meta)
        else:
            core = torch.einsum("iok,bk->bio", self.meta_tensor, s)
        return core + self.weight if self.weight is not None else core

    def extra_repr(self) -> str:
        rank = f", rank={self.factor_in.shape[1]}" if self.tensor == "cp" else ""
        return (
            f"{self.in_dim}, {self.out_dim}, meta_dim={self.meta_dim}, tensor={self.tensor}{rank}, "
            f"static={self.weight is not None}"
        )


class MetaFusionNetwork(nn.Module):
    """Meta information extractor + item-specific fusion tower: raw item features -> fused e_i^m.

    Feature standardisation statistics live in buffers so a saved model fuses new items exactly as
    it fused the training items.
    """

    def __init__(
        self,
        in_dim: int,
        fused_dim: int = 32,
        meta_dim: int = 5,
        extractor_hidden: int = 64,
        n_layers: int = 1,
        tensor: Literal["cp", "full"] = "cp",
        rank: int = 16,
        static_weights: bool = True,
        leaky_slope: float = 0.01,
        init_gain: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.extractor = nn.Sequential(
            nn.Linear(in_dim, extractor_hidden), nn.ReLU(), nn.Linear(extractor_hidden, meta_dim)
        )
        widths = tower_widths(in_dim, fused_dim, n_layers)
        pairs = list(itertools.pairwise(widths))
        # Only the output layer gets init_gain: it sets the scale of e^m against the ID embedding.
        gains = [1.0] * (len(pairs) - 1) + [init_gain]
        self.layers = nn.ModuleList(
            MetaFusionLayer(d_in, d_out, meta_dim, tensor, rank, static_weights, gain)
            for (d_in, d_out), gain in zip(pairs, gains, strict=True)
        )
        self.activation = nn.LeakyReLU(leaky_slope)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.extractor:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in self.layers:
            layer.reset_parameters()

    @torch.no_grad()
    def fit_normalization(self, features: Tensor) -> None:
        """Standardise inputs with per-dimension statistics of the training items."""
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6))

    def meta_information(self, x: Tensor) -> Tensor:
        """s_i for already standardised features ``x``."""
        return self.extractor(x)

    def standardize(self, features: Tensor) -> Tensor:
        return (features - self.feature_mean) / self.feature_std

    def forward(self, features: Tensor) -> Tensor:
        """Raw features (b, in_dim) -> fused embeddings e^m (b, fused_dim)."""
        return self.fuse_standardized(self.standardize(features))

    def fuse_standardized(self, x: Tensor) -> Tensor:
        """:meth:`forward` for features already passed through :meth:`standardize`."""
        s = self.meta_information(x)
        h = x
        for n, layer in enumerate(self.layers):
            h = layer(h, s)
            if n < len(self.layers) - 1:
                h = self.activation(h)
        return h
