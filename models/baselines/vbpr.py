r"""VBPR (He & McAuley, AAAI 2016): matrix factorisation plus a learned linear map of item content.

.. math::
    \hat y_{ui} = \alpha + \beta_u + \beta_i + \gamma_u^\top \gamma_i + \theta_u^\top (E f_i) + \beta'^\top f_i

:math:`f_i` is the item's content; here the concatenation of all its (standardised) modalities, as
multimodal recommendation papers run VBPR (MMGCN, LATTICE, MetaMMF). :math:`\alpha` and
:math:`\beta_u` do not change a user's ranking, nor the BPR difference, so they are left out. The rest is
an inner product of

.. math::
    e_u = [\gamma_u ; \theta_u ; 1], \qquad e_i = [\gamma_i ; E f_i ; \beta_i + \beta'^\top f_i]

(the last column carries the item bias, so :meth:`full_sort_predict` is the usual product).

Settings: :math:`\gamma` has ``config.id_dim`` and :math:`\theta` ``config.fused_dim`` dimensions (the
paper's K = K' split of the factor budget: 32 + 32 by default, the MetaMMF models' 64); L2 on the
batch's free factors :math:`\gamma_u, \theta_u, \gamma_i, \beta_i` (``reg_weight``, the paper's
:math:`\lambda_\Theta`) and, when ``config.layer_reg`` > 0, on :math:`E` and :math:`\beta'` (the paper's
:math:`\lambda_E`); BPR loss; init normal std 0.1 for the factors, Xavier for :math:`E`, zeros for the biases.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.base import ModelInputs, RecModel, l2_penalty
from models.config import VBPRConfig
from models.graph.utils import FeatureStandardizer


class VBPR(RecModel):
    """VBPR with the concatenated multimodal features as item content.

    Args:
        n_users: number of users.
        item_features: (n_items, d_x) concatenated raw features.
        config: ``id_dim`` (:math:`\\gamma`), ``fused_dim`` (:math:`\\theta`), ``normalize_features``,
            ``layer_reg`` (:math:`\\lambda_E`) are used.
        reg_weight: L2 weight on the batch's free factors.
    """

    def __init__(self, inputs: ModelInputs, config: VBPRConfig, reg_weight: float = 1e-4) -> None:
        super().__init__(inputs, config, reg_weight)
        item_features = inputs.item_features
        self.standardizer = FeatureStandardizer(item_features, config.normalize_features)
        self.register_buffer("features", self.standardizer(item_features), persistent=False)
        self.user_gamma = nn.Embedding(self.n_users, config.id_dim)
        self.user_theta = nn.Embedding(self.n_users, config.fused_dim)
        self.item_gamma = nn.Embedding(self.n_items, config.id_dim)
        self.item_bias = nn.Embedding(self.n_items, 1)
        self.content = nn.Linear(item_features.shape[1], config.fused_dim, bias=False)  # E
        self.content_bias = nn.Linear(item_features.shape[1], 1, bias=False)  # beta'
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for embedding in (self.user_gamma, self.user_theta, self.item_gamma):
            nn.init.normal_(embedding.weight, std=0.1)
        nn.init.zeros_(self.item_bias.weight)
        nn.init.xavier_uniform_(self.content.weight)
        nn.init.zeros_(self.content_bias.weight)

    def users(self, users: Tensor | None = None) -> Tensor:
        gamma = self.user_gamma.weight if users is None else self.user_gamma(users)
        theta = self.user_theta.weight if users is None else self.user_theta(users)
        return torch.cat([gamma, theta, gamma.new_ones(gamma.shape[0], 1)], dim=1)

    def items(self, items: Tensor | None = None) -> Tensor:
        f = self.features if items is None else self.features[items]
        gamma = self.item_gamma.weight if items is None else self.item_gamma(items)
        bias = self.item_bias.weight if items is None else self.item_bias(items)
        return torch.cat([gamma, self.content(f), bias + self.content_bias(f)], dim=1)

    def get_embedding(self) -> tuple[Tensor, Tensor]:
        return self.users(), self.items()

    @torch.no_grad()
    def embed_unseen_items(self, features: Tensor) -> Tensor:
        """``[mean gamma_i ; E f_i ; mean beta_i + beta'^T f_i]``: the content factors with the mean ID parts."""
        x = self.standardizer(features)
        n = x.shape[0]
        gamma = self.item_gamma.weight.mean(0).expand(n, -1)
        bias = self.item_bias.weight.mean(0).expand(n, -1) + self.content_bias(x)
        return torch.cat([gamma, self.content(x), bias], dim=1)

    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        u = self.users(users)
        pos, neg = self.items(torch.cat([pos_items, neg_items])).split(len(users))
        loss = self.ranking_loss(users, pos_items, neg_items, u, pos, neg)
        free = [self.user_gamma(users), self.user_theta(users)]
        free += [t(i) for i in (pos_items, neg_items) for t in (self.item_gamma, self.item_bias)]
        loss = loss + self.reg_weight * l2_penalty(*free)
        if self.config.layer_reg > 0:
            weights = self.content.weight.pow(2).sum() + self.content_bias.weight.pow(2).sum()
            loss = loss + self.config.layer_reg * weights / 2
        return loss
