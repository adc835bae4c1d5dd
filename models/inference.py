"""What the service needs of a trained model to embed items and users it never saw in training.

* a new item: fuse its raw features with its own fusion network, use the mean ID embedding as e^c,
  then run the graph layers for a node with no neighbours yet;
* a new user with some online interactions: start from the mean user embedding and aggregate the
  per-layer states of the items they interacted with through the trained graph layers (inductive).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.base import RecModel
from models.config import ModelConfig
from models.metammf_gcn import MetaMMF_GCN, SAGETower
from models.metammf_mf import MetaMMF_MF, build_fusion


class InferenceEncoder(nn.Module):
    """Fusion network + graph layers + mean embeddings, detached from the training graph."""

    def __init__(self, config: ModelConfig, in_dim: int) -> None:
        super().__init__()
        self.config = config
        self.fusion = build_fusion(config, in_dim)
        self.graph = SAGETower.from_config(config) if config.name == "metammf_gcn" else None
        self.register_buffer("mean_item_id", torch.zeros(config.id_dim))
        self.register_buffer("mean_user", torch.zeros(config.embedding_dim))

    @property
    def n_states(self) -> int:
        """Per-layer states kept for every item: h^0..h^L for the GCN, the embedding itself for MF."""
        return 1 if self.graph is None else len(self.graph.convs) + 1

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: RecModel) -> InferenceEncoder:
        # Exact types: subclasses (the static-fusion baselines) have another fusion network.
        if type(model) not in (MetaMMF_GCN, MetaMMF_MF):
            name = getattr(getattr(model, "config", None), "name", None)
            raise TypeError(
                f"no inference encoder for {type(model).__name__}"
                + (f" (model {name!r})" if name else "")
                + ": only MetaMMF models (metammf_gcn, metammf_mf) can be served; baselines are for evaluation only"
            )
        encoder = cls(model.config, model.items.fusion.in_dim)
        encoder.fusion.load_state_dict(model.items.fusion.state_dict())
        if isinstance(model, MetaMMF_GCN):
            encoder.graph.load_state_dict(model.graph.state_dict())
        encoder.mean_item_id.copy_(model.items.id_embedding.weight.mean(0))
        encoder.mean_user.copy_(model.user_embedding.weight.mean(0))
        return encoder.eval()

    @torch.no_grad()
    def encode_items(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Raw features (b, d_x) of new items -> (final embeddings (b, d), states (n_states, b, d))."""
        mean_id = self.mean_item_id.expand(features.shape[0], -1)
        ego = torch.cat([self.fusion(features), mean_id], dim=1)
        if self.graph is None:
            return ego, ego.unsqueeze(0)
        states = self.graph.isolated(ego)
        return self.graph.combine(states), torch.stack(states)

    @torch.no_grad()
    def encode_user(self, item_states: Tensor) -> Tensor:
        """Final embedding (d,) of a user unseen in training from the states (n_states, m, d) of the
        m items they interacted with."""
        if self.graph is None:  # MF has no aggregation function: the mean of the items is the best guess
            return item_states[0].mean(0)
        states = [self.mean_user.unsqueeze(0)]
        for layer in range(len(self.graph.convs)):
            neighbor_mean = item_states[layer].mean(0, keepdim=True)
            states.append(self.graph.node_update(layer, states[-1], neighbor_mean))
        return self.graph.combine(states)[0]


@torch.no_grad()
def item_states(model: RecModel) -> Tensor:
    """Per-layer states (n_states, n_items, d) of the training items, matching :class:`InferenceEncoder`."""
    if isinstance(model, MetaMMF_GCN):
        states, _ = model.layer_states()
        return torch.stack([s[model.n_users :] for s in states])
    return model.get_embedding()[1].unsqueeze(0)
