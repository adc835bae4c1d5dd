r"""InvRL (Du et al., ACM MM 2022): invariant representation learning for multimedia recommendation.

Multimedia features mix *invariant* parts (what users actually respond to) with *variant*, spurious
ones whose relation to the interactions changes between environments. InvRL (1) splits the
training interactions into heterogeneous environments, (2) learns a feature mask that keeps the
dimensions whose effect is the same in every environment (an IRM-style penalty on the spread of
per-environment gradients), and (3) recommends from the masked features.

**Backbone** (the official ``UltraGCNNet``): users :math:`U_u = [U^{id}_u ; U^{f}_u]`, items
:math:`e_i = [V_i ; W (m \odot f_i) + b]` with :math:`f_i` the item's modalities, each L2-normalised,
concatenated; :math:`\hat y_{ui} = U_u^\top e_i`.

**Feature mask** (official ``FeatureSelector``, stochastic gates): :math:`m = \mathrm{clamp}(\mu +
0.5 + \sigma \epsilon, 0, 1)` with :math:`\epsilon \sim N(0, I)` redrawn every training step and
:math:`\epsilon = 0` for inference (so :math:`m \in [0, 1]^{d_x}`), :math:`\mu` initialised at 0.

**Invariance penalty** (official ``loss_p``). With :math:`g_e = \nabla_W R_e` the gradient of the
BPR loss of the batch's interactions from environment :math:`e` (kept in the graph, so the penalty
trains :math:`\mu` through the gates too) and :math:`\bar g` their mean:

.. math::
    \mathcal L = \frac1{|E|} \sum_e R_e + \alpha \Big\lVert \Big(\sum_e (g_e - \bar g)^{\odot 2}\Big)
        \odot (\mu + 0.5) \Big\rVert_2^2 + \lambda \lVert \mu \rVert_2^2 + \text{L2}

**Heterogeneous environments** (official ``frontend``). Interactions start in random environments;
a round then alternates: fit one content projection :math:`(W_e, b_e)` per environment on that
environment's interactions (BPR, the user embeddings :math:`U^f` fixed: the official front models
train only the projection of a pre-trained backbone), and move every interaction to the environment
whose model scores it highest, until fewer than 1% move (at most 5 times).

Settings (paper / official code -> here): environments ``num_domains`` -> ``config.invrl_envs``
(2); :math:`\alpha` -> ``config.invrl_irm_weight``; :math:`\lambda` -> ``config.invrl_mask_reg``;
gate noise :math:`\sigma` = 0.5; widths :math:`U^{id}, V`: ``config.id_dim``, :math:`U^f, W`:
``config.fused_dim``; init normal std 0.01, zero bias (official). The values of :math:`\alpha,
\lambda, \sigma` are not given in the paper's text; the defaults here are ours (:math:`\alpha` =
1e8: the penalty is quartic in gradients of order 1e-3, so it needs a large weight to matter;
tune it per data set).

Deviations / simplifications:

* **backbone**: UltraGCN's net, trained with the shared trainer's BPR on (user, positive, negative)
  triples instead of UltraGCN's constraint-weighted binary cross-entropy (the graph enters UltraGCN
  only through those loss weights); L2 as ``reg_weight`` x the batch's free embeddings / batch size;
* **one training run**: the official code alternates environment learning, mask learning on a
  frozen pre-trained backbone (3 rounds) and a final training with the mask fixed. Here the
  backbone and the mask are trained jointly in the shared trainer's loop, and the environments are
  re-learned from the current backbone every ``config.invrl_refresh_epochs`` epochs, 3 rounds
  (random environments before the first round), then kept;
* the front models see the unmasked features and no mask-weighted L1 term; a round that would
  leave fewer than two non-empty environments keeps the previous split;
* features are standardised (``config.normalize_features``) before the per-modality L2
  normalisation; no word-embedding textual branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import ModelInputs, RecModel, bpr_loss, l2_penalty
from models.config import InvRLConfig
from models.graph.utils import FeatureStandardizer

GATE_SIGMA = 0.5  # std of the stochastic gate noise
ENV_ROUNDS = 3  # environment-learning rounds (the official ``solve(ite=3)``)
FRONT_ITERATIONS = 5  # reassignments per round at most (the official ``f_max``)
FRONT_STEPS = 50  # full-batch Adam steps per front model
FRONT_LR = 0.01
FRONT_REG = 1e-4  # L2 on the front models' projection
SEED = 2233  # the official code's seed: initial random environments, front-model negatives


class FeatureGate(nn.Module):
    r"""The feature mask :math:`m = \mathrm{clamp}(\mu + 0.5 + \sigma \epsilon, 0, 1)` (noise in training only)."""

    def __init__(self, dim: int, sigma: float = GATE_SIGMA) -> None:
        super().__init__()
        self.sigma = sigma
        self.mu = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.mu)

    def forward(self) -> Tensor:
        z = self.mu + 0.5
        if self.training:
            z = z + self.sigma * torch.randn_like(z)
        return z.clamp(0.0, 1.0)


class InvRL(RecModel):
    """InvRL with an MF (UltraGCN-net) backbone, trained in one run.

    Args:
        n_users: number of users.
        item_features: (n_items, d_x) concatenated raw features.
        modality_dims: modality name -> width, in the column order of ``item_features``.
        train_pairs: (n, 2) training (user, item) pairs: what the environments partition.
        config: ``id_dim``, ``fused_dim``, ``normalize_features``, ``invrl_envs``,
            ``invrl_irm_weight``, ``invrl_mask_reg``, ``invrl_refresh_epochs`` are used.
        reg_weight: L2 weight on the batch's free embeddings.
    """

    def __init__(self, inputs: ModelInputs, config: InvRLConfig, reg_weight: float = 1e-4) -> None:
        super().__init__(inputs, config, reg_weight)
        item_features, modality_dims, train_pairs = inputs.item_features, inputs.modality_dims, inputs.train_pairs
        self.n_envs = config.invrl_envs
        self.standardizer = FeatureStandardizer(item_features, config.normalize_features)
        self.modality_widths = list(modality_dims.values())
        features = self.content_inputs(item_features)
        self.register_buffer("features", features, persistent=False)
        self.user = nn.Embedding(self.n_users, config.id_dim + config.fused_dim)  # [U^id ; U^f]
        self.item = nn.Embedding(self.n_items, config.id_dim)  # V
        self.projection = nn.Linear(features.shape[1], config.fused_dim)  # W, b
        self.gate = FeatureGate(features.shape[1])
        # The environments partition the distinct training pairs, looked up by key u * n_items + i.
        pairs = train_pairs.long()
        keys = torch.unique(pairs[:, 0] * self.n_items + pairs[:, 1])
        self.register_buffer("pair_keys", keys, persistent=False)
        generator = torch.Generator().manual_seed(SEED)
        self.register_buffer("environment", torch.randint(0, self.n_envs, (len(keys),), generator=generator))
        self._epochs_started = 0
        self._rounds_done = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.user.weight, self.item.weight, self.projection.weight):
            nn.init.normal_(weight, std=0.01)
        nn.init.zeros_(self.projection.bias)
        self.gate.reset_parameters()

    # ----------------------------------------------------------------------------------------------
    # Scores
    # ----------------------------------------------------------------------------------------------

    def mask(self) -> Tensor:
        """The inference feature mask :math:`\\mathrm{clamp}(\\mu + 0.5, 0, 1)`, in [0, 1]."""
        return (self.gate.mu + 0.5).clamp(0.0, 1.0)

    def items(self, items: Tensor | None, mask: Tensor) -> Tensor:
        f = self.features if items is None else self.features[items]
        v = self.item.weight if items is None else self.item(items)
        return torch.cat([v, self.projection(f * mask)], dim=1)

    def content_inputs(self, item_features: Tensor) -> Tensor:
        """Raw features standardised, each modality's part L2-normalised: what the mask and W act on."""
        x = self.standardizer(item_features)
        return torch.cat([F.normalize(part, dim=1) for part in x.split(self.modality_widths, dim=1)], 1)

    def get_embedding(self) -> tuple[Tensor, Tensor]:
        return self.user.weight, self.items(None, self.gate())

    @torch.no_grad()
    def embed_unseen_items(self, features: Tensor) -> Tensor:
        """``[mean V ; W (f * mask) + b]``: the masked content projection with the mean item ID embedding."""
        f = self.content_inputs(features)
        v = self.item.weight.mean(0).expand(f.shape[0], -1)
        return torch.cat([v, self.projection(f * self.gate())], dim=1)

    # ----------------------------------------------------------------------------------------------
    # Environments and the invariance penalty
    # ----------------------------------------------------------------------------------------------

    def environment_of(self, users: Tensor, items: Tensor) -> Tensor:
        """Environment of each (user, item) training pair (0 for a pair not in training)."""
        keys = users.long() * self.n_items + items.long()
        pos = torch.searchsorted(self.pair_keys, keys).clamp(max=len(self.pair_keys) - 1)
        return torch.where(self.pair_keys[pos] == keys, self.environment[pos], torch.zeros_like(keys))

    def invariance(
        self, users: Tensor, pos_items: Tensor, neg_items: Tensor, environments: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(mean over environments of their BPR losses, IRM penalty) for a batch; ``environments``
        defaults to the learned environments of the (user, positive) pairs. The penalty is 0 with
        fewer than two environments in the batch, or without autograd."""
        if environments is None:
            environments = self.environment_of(users, pos_items)
        gate = self.gate()
        u = self.user(users)
        pos, neg = self.items(torch.cat([pos_items, neg_items]), gate).split(len(users))
        pos_scores, neg_scores = (u * pos).sum(-1), (u * neg).sum(-1)
        losses, grads = [], []
        with_grad = torch.is_grad_enabled()
        for env in torch.unique(environments):
            rows = environments == env
            loss = bpr_loss(pos_scores[rows], neg_scores[rows])
            losses.append(loss)
            if with_grad:
                grads.append(torch.autograd.grad(loss, self.projection.weight, create_graph=True)[0])
        loss = torch.stack(losses).mean()
        if len(grads) < 2:
            return loss, loss.new_zeros(())
        g = torch.stack(grads)
        spread = (g - g.mean(0)).pow(2).sum(0)  # (d_f, d_x): per-weight spread over environments
        return loss, (spread * (self.gate.mu + 0.5)).pow(2).sum()

    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        loss, penalty = self.invariance(users, pos_items, neg_items)
        reg = l2_penalty(self.user(users), self.item(pos_items), self.item(neg_items))
        penalties = self.config.invrl_irm_weight * penalty + self.config.invrl_mask_reg * self.gate.mu.pow(2).sum()
        return loss + penalties + self.reg_weight * reg

    def on_epoch_start(self) -> None:
        """Re-learn the environments at the start of every ``invrl_refresh_epochs``-th epoch, 3 times."""
        epochs_done, self._epochs_started = self._epochs_started, self._epochs_started + 1
        if self._rounds_done < ENV_ROUNDS and epochs_done >= (self._rounds_done + 1) * self.config.invrl_refresh_epochs:
            self.learn_environments(seed=SEED + self._rounds_done)
            self._rounds_done += 1

    def learn_environments(self, seed: int = SEED) -> int:
        """One round of the official front end: per environment, fit a content projection on its
        interactions with the current user embeddings fixed, then move each interaction to the
        environment that scores it highest; repeat until fewer than 1% move. Returns the number of
        interactions that changed environment."""
        keys = self.pair_keys
        users, items = keys // self.n_items, keys % self.n_items
        user_f = self.user.weight[:, self.config.id_dim :].detach()
        features = self.features
        generator = torch.Generator(device=keys.device).manual_seed(seed)
        environment, moved = self.environment.clone(), 0
        for _ in range(FRONT_ITERATIONS):
            scores = torch.full((self.n_envs, len(keys)), float("-inf"), device=keys.device)
            for env in range(self.n_envs):
                rows = environment == env
                if rows.any():
                    weight, bias = self._fit_front_model(user_f, users[rows], items[rows], generator)
                    with torch.no_grad():
                        scores[env] = (user_f[users] * (features[items] @ weight.T + bias)).sum(-1)
            new = scores.argmax(0)
            if torch.unique(new).numel() < min(2, self.n_envs):
                break  # a collapsed split: keep the previous one
            changed = int((new != environment).sum())
            environment, moved = new, moved + changed
            if changed <= 0.01 * len(keys):
                break
        self.environment.copy_(environment)
        return moved

    def _fit_front_model(
        self, user_f: Tensor, users: Tensor, items: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        weight = torch.empty_like(self.projection.weight).normal_(std=0.01, generator=generator)
        bias = torch.zeros_like(self.projection.bias)
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        optimizer = torch.optim.Adam([weight, bias], lr=FRONT_LR)
        with torch.enable_grad():
            for _ in range(FRONT_STEPS):
                negatives = torch.randint(0, self.n_items, items.shape, generator=generator, device=items.device)
                z = self.features @ weight.T + bias
                u = user_f[users]
                loss = bpr_loss((u * z[items]).sum(-1), (u * z[negatives]).sum(-1)) + FRONT_REG * weight.pow(2).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return weight.detach(), bias.detach()
