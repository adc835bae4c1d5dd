r"""MetaMMF_MF: dynamic multimodal fusion with a matrix-factorisation backbone.

.. math::
    e_i = [\, e_i^m ; e_i^c \,], \qquad \hat y_{ui} = e_u^\top e_i

where :math:`e_i^m` is the output of the item's own fusion network (:mod:`models.metammf.fusion`) and
:math:`e_i^c` a free ID embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import ModelInputs, RecModel, l2_penalty
from models.config import MetaMMFConfig
from models.metammf.cold_items import (
    batch_content_rows,
    droppable_mask,
    fused_part,
    replace_rows,
    untrained_mask,
    with_mean_id,
)
from models.metammf.fusion import MetaFusionNetwork


def build_fusion(config: MetaMMFConfig, in_dim: int) -> MetaFusionNetwork:
    return MetaFusionNetwork(
        in_dim,
        fused_dim=config.fused_dim,
        meta_dim=config.meta_dim,
        extractor_hidden=config.extractor_hidden,
        n_layers=config.fusion_layers,
        tensor=config.tensor,
        rank=config.rank,
        static_weights=config.static_weights,
        leaky_slope=config.leaky_slope,
        init_gain=config.fusion_init_gain,
    )


def fusion_weights(fusion: MetaFusionNetwork) -> list[Tensor]:
    """Weight matrices of the extractor and the fusion tower (the targets of ``layer_reg``)."""
    return [p for name, p in fusion.named_parameters() if not name.endswith("bias")]


class MultimodalItemEncoder(nn.Module):
    """Item ego representation [e_i^m ; e_i^c]: fused content plus an ID embedding. The fusion network is
    MetaMMF's (:func:`build_fusion`) unless another is given (the static-fusion baselines')."""

    def __init__(self, config: MetaMMFConfig, item_features: Tensor, fusion: nn.Module | None = None) -> None:
        super().__init__()
        n_items, in_dim = item_features.shape
        self.fusion = fusion if fusion is not None else build_fusion(config, in_dim)
        self.id_embedding = nn.Embedding(n_items, config.id_dim)
        self.feature_dropout = config.feature_dropout
        if config.normalize_features:
            self.fusion.fit_normalization(item_features.float())
        # Standardised once here rather than on every training step. Not persistent: features are data,
        # not weights; the service fuses new items from raw input.
        self.register_buffer("item_inputs", self.fusion.standardize(item_features.float()), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.fusion.reset_parameters()
        nn.init.normal_(self.id_embedding.weight, std=0.1)

    def forward(self, items: Tensor | None = None) -> Tensor:
        inputs = self.item_inputs if items is None else self.item_inputs[items]
        ids = self.id_embedding.weight if items is None else self.id_embedding(items)
        if self.feature_dropout > 0:
            inputs = F.dropout(inputs, self.feature_dropout, self.training)
        return torch.cat([self.fusion.fuse_standardized(inputs), ids], dim=1)


class MetaMMF_MF(RecModel):
    """MetaMMF with inner-product scoring.

    Args:
        inputs: the items' concatenated raw multimodal features and the training pairs (with
            ``config.untrained_items='content'`` the items absent from them are scored from content alone,
            :mod:`models.metammf.cold_items`).
        config: model hyper-parameters.
        reg_weight: L2 weight on the batch representations.
        items: the item ego encoder (default: :class:`MultimodalItemEncoder`, MetaMMF's fusion); the
            static-fusion baselines (:mod:`models.baselines.static_fusion`) pass theirs, everything else is shared.
    """

    def __init__(
        self, inputs: ModelInputs, config: MetaMMFConfig, reg_weight: float = 1e-4, *, items: nn.Module | None = None
    ) -> None:
        super().__init__(inputs, config, reg_weight)
        self.user_embedding = nn.Embedding(self.n_users, config.embedding_dim)
        self.items = items if items is not None else MultimodalItemEncoder(config, inputs.item_features)
        untrained = None
        if config.untrained_items == "content":
            untrained = untrained_mask(inputs.train_pairs, self.n_items)
        self.register_buffer("untrained_items", untrained, persistent=False)
        droppable = droppable_mask(inputs.train_pairs, self.n_items, config.cold_item_dropout_skip_top)
        self.register_buffer("droppable_items", droppable, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user_embedding.weight, std=0.1)
        self.items.reset_parameters()

    def new_item_embeddings(self, fused: Tensor) -> Tensor:
        """Final embeddings of items known by their fused content e^m alone (:mod:`models.metammf.cold_items`)."""
        return with_mean_id(fused, self.items.id_embedding)

    @torch.no_grad()
    def embed_unseen_items(self, features: Tensor) -> Tensor:
        return self.new_item_embeddings(self.items.fusion(features.float()))

    def get_embedding(self) -> tuple[Tensor, Tensor]:
        ego = self.items()
        untrained = None if self.untrained_items is None else self.untrained_items.nonzero().squeeze(1)
        ego = replace_rows(
            ego, untrained, lambda rows: self.new_item_embeddings(fused_part(ego[rows], self.items.id_embedding))
        )
        return self.user_embedding.weight, ego

    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        u = self.user_embedding(users)
        item_ids = torch.cat([pos_items, neg_items])
        item_rep = self.items(item_ids)
        cold = batch_content_rows(self.config, item_ids, self.untrained_items, self.droppable_items, self.training)
        item_rep = replace_rows(
            item_rep, cold, lambda rows: self.new_item_embeddings(fused_part(item_rep[rows], self.items.id_embedding))
        )
        pos, neg = item_rep.split(len(users))
        loss = self.ranking_loss(users, pos_items, neg_items, u, pos, neg) + self.reg_weight * l2_penalty(u, pos, neg)
        if self.config.layer_reg > 0:
            loss = loss + self.config.layer_reg * sum(w.pow(2).sum() for w in fusion_weights(self.items.fusion)) / 2
        return loss
