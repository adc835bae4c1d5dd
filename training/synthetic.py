"""Synthetic multimodal interaction data in which items fuse their modalities differently.

Every item ``i`` has a hidden latent factor ``z_i`` (``latent_dim``-d, about unit variance per
dimension) that users respond to, and belongs to one of ``n_groups`` fusion groups. The group
decides which modality carries ``z_i`` and how. With modalities ``m_0, m_1, ...`` in the order of
``SyntheticConfig.modality_dims`` (default: visual, acoustic) the group patterns are, in order:

* group ``k < M`` (M = number of modalities): ``z`` is linearly encoded in modality ``m_k`` only,
  every other modality carries unrelated content;
* group ``M``: ``z`` is split across all modalities (dimension block ``j`` of ``z`` lives in
  modality ``m_j``; the remaining dimensions of each modality carry unrelated content);
* group ``M + 1``: ``z = u * w`` elementwise, where ``u`` is linearly encoded in ``m_0`` and ``w``
  in ``m_1``. ``z`` is then uncorrelated with either modality (and with their concatenation) and
  only recoverable through a multiplicative interaction of the two.

The modality content carries ``z`` (or ``u``, ``w``) linearly; the ``z`` users respond to is then
rescaled per item to norm ``sqrt(latent_dim)`` (``truth["latent"]``), so that the heavy-tailed
product group does not dominate popularity. That rescaling is a per-item scalar, so ``z`` stays
linearly predictable from the carrying modality within groups ``< M + 1``.

So with the defaults: group 0 visual only, group 1 acoustic only, group 2 half/half, group 3
visual x acoustic product. Each modality's features are ``c_m @ P_m + s * sig[g, m] + noise``:
a per-modality random projection ``P_m`` of the item's ``latent_dim``-d content ``c_m``, a weak
per-group signature (so the group is identifiable from content) and Gaussian noise.

Users have latent preference vectors ``p_u``; user ``u`` picks ``n_u`` distinct items by sampling
without replacement from ``softmax(strength * p_u . z_i / sqrt(latent_dim) + b_i)`` (Gumbel top-k),
where ``b_i ~ N(0, popularity_std)`` gives a long-tailed item popularity. ``n_u`` is
``min_interactions_per_user`` plus a negative binomial draw, with mean ``interactions_per_user``.
Each user's interactions are split about 80/10/10 at random, every user keeping at least one
train interaction (so all valid/test users appear in train).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from training.data import RecData, random_user_split

_USER_CHUNK = 1024


class SyntheticConfig(BaseModel):
    """Size and signal strengths of a synthetic data set; defaults are sized like TikTok."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("synthetic", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    n_users: PositiveInt = 9308
    n_items: PositiveInt = 6710
    interactions_per_user: float = Field(7.4, gt=0, description="mean number of interactions per user")
    min_interactions_per_user: int = Field(3, ge=3, description="every user gets at least this many")
    activity_dispersion: float = Field(
        1.0, gt=0, description="negative-binomial shape of per-user activity (smaller: longer tail)"
    )
    modality_dims: dict[str, PositiveInt] = Field(default_factory=lambda: {"visual": 128, "acoustic": 128})
    latent_dim: int = Field(16, ge=2)
    n_groups: int = Field(4, ge=1, description="fusion groups; at most number of modalities + 2")
    preference_strength: float = Field(2.0, ge=0, description="scale of the user . z_i logit")
    popularity_std: float = Field(1.25, ge=0, description="std of the item popularity logit bias")
    signature_strength: float = Field(0.3, ge=0, description="scale of the per-group content signature")
    noise_std: float = Field(0.3, ge=0, description="std of the per-feature Gaussian noise")
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = Field(0, ge=0)

    @field_validator("modality_dims")
    @classmethod
    def _check_modalities(cls, v: dict[str, int]) -> dict[str, int]:
        if len(v) < 2:
            raise ValueError("need at least two modalities")
        for name in v:
            if not name or any(c in name for c in "/\\") or name.strip() != name:
                raise ValueError(f"modality name {name!r} is not usable as a file name prefix")
        return v

    @field_validator("split_ratios")
    @classmethod
    def _check_ratios(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in v) or v[0] <= 0 or v[1] <= 0 or v[2] <= 0 or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split_ratios must be three positive numbers summing to 1, got {v}")
        return v

    @model_validator(mode="after")
    def _check_consistency(self) -> SyntheticConfig:
        n_mod = len(self.modality_dims)
        if self.n_groups > n_mod + 2:
            raise ValueError(f"n_groups={self.n_groups} exceeds the {n_mod + 2} patterns for {n_mod} modalities")
        if self.latent_dim < n_mod:
            raise ValueError(f"latent_dim={self.latent_dim} must be >= the number of modalities ({n_mod})")
        if self.interactions_per_user < self.min_interactions_per_user:
            raise ValueError("interactions_per_user must be >= min_interactions_per_user")
        if self.n_items < self.min_interactions_per_user:
            raise ValueError("n_items must be >= min_interactions_per_user")
        return self


def _item_content(
    cfg: SyntheticConfig, rng: np.random.Generator, group: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Latent z (n_items, k) and per-modality content c_m (n_items, k) following the group patterns."""
    n, k = cfg.n_items, cfg.latent_dim
    n_mod = len(cfg.modality_dims)
    z = rng.standard_normal((n, k))
    # Unrelated content by default; overwritten below where a modality carries z.
    content = [rng.standard_normal((n, k)) for _ in range(n_mod)]
    for g in range(cfg.n_groups):
        idx = np.flatnonzero(group == g)
        if g < n_mod:  # z in modality g only
            content[g][idx] = z[idx]
        elif g == n_mod:  # z split in blocks across modalities
            for m, block in enumerate(np.array_split(np.arange(k), n_mod)):
                content[m][np.ix_(idx, block)] = z[np.ix_(idx, block)]
        else:  # z = u * w, u in modality 0, w in modality 1
            z[idx] = content[0][idx] * content[1][idx]
    return z, content


def _normalise_rows(z: np.ndarray) -> np.ndarray:
    """Scale rows to norm sqrt(k) so no group gets systematically larger scores (u * w is heavy-tailed)."""
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return z * (np.sqrt(z.shape[1]) / np.maximum(norms, 1e-12))


def _sample_interactions(
    cfg: SyntheticConfig, rng: np.random.Generator, user_latent: np.ndarray, z: np.ndarray, pop: np.ndarray
) -> np.ndarray:
    """(user, item) pairs; each user's items sampled without replacement from a softmax (Gumbel top-k)."""
    n_users, n_items, k = cfg.n_users, cfg.n_items, cfg.latent_dim
    extra_mean = cfg.interactions_per_user - cfg.min_interactions_per_user
    if extra_mean > 0:
        r = cfg.activity_dispersion
        extra = rng.negative_binomial(r, r / (r + extra_mean), size=n_users)
    else:
        extra = np.zeros(n_users, dtype=np.int64)
    counts = np.minimum(cfg.min_interactions_per_user + extra, n_items).astype(np.int64)

    scale = np.float32(cfg.preference_strength / np.sqrt(k))
    z32 = z.astype(np.float32)
    pop32 = pop.astype(np.float32)
    users_out, items_out = [], []
    for start in range(0, n_users, _USER_CHUNK):
        stop = min(start + _USER_CHUNK, n_users)
        c = counts[start:stop]
        logits = (user_latent[start:stop].astype(np.float32) @ z32.T) * scale + pop32
        u = rng.random(logits.shape, dtype=np.float32)
        np.clip(u, np.float32(1e-12), None, out=u)
        keys = logits - np.log(-np.log(u))  # + Gumbel(0, 1) noise
        kmax = int(c.max())
        if kmax < n_items:
            top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax]
        else:
            top = np.broadcast_to(np.arange(n_items), keys.shape)
        top_keys = np.take_along_axis(keys, top, axis=1)
        top = np.take_along_axis(top, np.argsort(-top_keys, axis=1, kind="stable"), axis=1)
        keep = np.arange(kmax)[None, :] < c[:, None]
        rows = np.broadcast_to(np.arange(start, stop)[:, None], keep.shape)
        users_out.append(rows[keep])
        items_out.append(top[keep])
    return np.stack([np.concatenate(users_out), np.concatenate(items_out)], axis=1).astype(np.int64)


def generate_synthetic_with_truth(cfg: SyntheticConfig) -> tuple[RecData, dict[str, np.ndarray]]:
    """Build the synthetic data set and its hidden ground truth.

    ``truth`` holds ``"group"`` (n_items,) int64 fusion group, ``"latent"`` (n_items, latent_dim)
    the z users respond to, ``"user_latent"`` (n_users, latent_dim), ``"popularity"`` (n_items,) the
    logit bias, and ``"content_<modality>"`` (n_items, latent_dim) the content each modality encodes.
    Same config (including seed) -> identical arrays.
    """
    rng = np.random.default_rng(cfg.seed)
    modalities = list(cfg.modality_dims)
    # Balanced group assignment: every group gets n_items / n_groups items (up to rounding).
    group = rng.permutation(np.arange(cfg.n_items) % cfg.n_groups).astype(np.int64)
    z, content = _item_content(cfg, rng, group)

    features: dict[str, np.ndarray] = {}
    k = cfg.latent_dim
    for m, name in enumerate(modalities):
        dim = cfg.modality_dims[name]
        proj = rng.standard_normal((k, dim)) / np.sqrt(k)  # unit variance per feature from content
        signature = rng.standard_normal((cfg.n_groups, dim))
        x = content[m] @ proj + cfg.signature_strength * signature[group]
        x += cfg.noise_std * rng.standard_normal(x.shape)
        features[name] = x.astype(np.float32)

    z = _normalise_rows(z)
    user_latent = rng.standard_normal((cfg.n_users, k))
    popularity = cfg.popularity_std * rng.standard_normal(cfg.n_items)
    pairs = _sample_interactions(cfg, rng, user_latent, z, popularity)

    labels = random_user_split(pairs[:, 0], rng, cfg.split_ratios)
    _ensure_nonempty(labels, pairs[:, 0])
    data = RecData(
        name=cfg.name,
        n_users=cfg.n_users,
        n_items=cfg.n_items,
        train=np.ascontiguousarray(pairs[labels == 0]),
        valid=np.ascontiguousarray(pairs[labels == 1]),
        test=np.ascontiguousarray(pairs[labels == 2]),
        features=dict(sorted(features.items())),
    )
    truth = {
        "group": group,
        "latent": z.astype(np.float32),
        "user_latent": user_latent.astype(np.float32),
        "popularity": popularity.astype(np.float32),
    }
    for name, c in zip(modalities, content, strict=True):
        truth[f"content_{name}"] = c.astype(np.float32)
    return data, truth


def _ensure_nonempty(labels: np.ndarray, users: np.ndarray) -> None:
    """Give an empty valid/test split one interaction, keeping >= 1 train per user (in place).

    Takes a train interaction of a user with >= 2 train interactions, else an interaction from the
    other held-out split if that split keeps at least one. Always possible as every user has >= 3
    interactions.
    """
    for split in (1, 2):
        if np.any(labels == split):
            continue
        train_idx = np.flatnonzero(labels == 0)
        n_train = np.bincount(users[train_idx], minlength=int(users.max()) + 1)
        movable = train_idx[n_train[users[train_idx]] >= 2]
        if movable.size == 0:
            other = np.flatnonzero(labels == 3 - split)
            movable = other if other.size >= 2 else movable
        if movable.size == 0:
            raise ValueError("cannot make every split non-empty: too few interactions")
        labels[movable[-1]] = split


def generate_synthetic(cfg: SyntheticConfig | None = None) -> RecData:
    """Synthetic data set with item-specific modality fusion (see module docstring)."""
    return generate_synthetic_with_truth(cfg if cfg is not None else SyntheticConfig())[0]
