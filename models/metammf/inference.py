"""What the service needs of a trained model to embed items and users it never saw in training.

* a new item: fuse its raw features with its own fusion network, use the mean ID embedding as e^c,
  then run the graph layers for a node with no neighbours yet; with ``content_neighbors`` = k, add the
  mean per-layer states of its k nearest training items by content (:mod:`models.metammf.cold_items`); with
  ``item_graph_k`` = k, add the item-item content graph's term (:mod:`models.metammf.item_graph`);
* a new user with some online interactions: start from the mean user embedding and aggregate the
  per-layer states of the items they interacted with through the trained graph layers (inductive).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from models.base import RecModel
from models.config import MetaMMFConfig
from models.metammf.cold_items import content_keys, with_neighbors
from models.metammf.gcn import MetaMMF_GCN
from models.metammf.item_graph import content_graph_rows
from models.metammf.lightgcn import MetaMMF_LightGCN
from models.metammf.mf import MetaMMF_MF, build_fusion
from models.metammf.neighbor_search import SearchKeys, nearest

# The servable models, by exact type: subclasses (the static-fusion baselines) have another fusion network.
SERVABLE = {"metammf_gcn": MetaMMF_GCN, "metammf_lightgcn": MetaMMF_LightGCN, "metammf_mf": MetaMMF_MF}


class InferenceEncoder(nn.Module):
    """Fusion network + graph layers + mean embeddings, detached from the training graph; with
    ``content_neighbors`` or ``item_graph_k``, the trained items' content keys and per-layer states
    (``n_neighbor_keys`` rows)."""

    NEIGHBOR_BUFFERS = ("neighbor_keys", "neighbor_states", "neighbor_scale")

    def __init__(self, config: MetaMMFConfig, in_dim: int, n_neighbor_keys: int = 0) -> None:
        super().__init__()
        self.config = config
        self.fusion = build_fusion(config, in_dim)
        model = SERVABLE.get(config.name)
        self.graph = model.tower(config) if model is not None and issubclass(model, MetaMMF_GCN) else None
        self.register_buffer("mean_item_id", torch.zeros(config.id_dim))
        self.register_buffer("mean_user", torch.zeros(config.embedding_dim))
        self.register_buffer("neighbor_keys", torch.zeros(n_neighbor_keys, in_dim))  # unit rows
        self.register_buffer("neighbor_states", torch.zeros(self.n_states, n_neighbor_keys, config.embedding_dim))
        self.register_buffer("neighbor_scale", torch.ones(()))

    @classmethod
    def from_state_dict(cls, config: MetaMMFConfig, in_dim: int, state: Mapping[str, Tensor]) -> InferenceEncoder:
        """An encoder holding ``state`` (``encoder.safetensors``); one written without content neighbours
        may lack their (empty) buffers."""
        keys = state.get("neighbor_keys")
        encoder = cls(config, in_dim, 0 if keys is None else keys.shape[0])
        state = dict(state)
        for name in cls.NEIGHBOR_BUFFERS:
            state.setdefault(name, getattr(encoder, name))
        encoder.load_state_dict(state)
        return encoder.eval()

    @property
    def n_states(self) -> int:
        """Per-layer states kept for every item: h^0..h^L for the GCN, the embedding itself for MF."""
        return 1 if self.graph is None else self.graph.n_layers + 1

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: RecModel) -> InferenceEncoder:
        if type(model) not in SERVABLE.values():
            name = getattr(getattr(model, "config", None), "name", None)
            raise TypeError(
                f"no inference encoder for {type(model).__name__}"
                + (f" (model {name!r})" if name else "")
                + f": only MetaMMF models ({', '.join(SERVABLE)}) can be served; baselines are for evaluation only"
            )
        neighbors = getattr(model, "neighbors", None)
        # Content neighbours and the item graph search the same keys: the trained items' content.
        trained = neighbors if neighbors is not None else getattr(model, "item_graph", None)
        encoder = cls(model.config, model.items.fusion.in_dim, 0 if trained is None else len(trained.rows))
        encoder.fusion.load_state_dict(model.items.fusion.state_dict())
        if isinstance(model, MetaMMF_GCN):
            encoder.graph.load_state_dict(model.graph.state_dict())
        if trained is not None:
            encoder.neighbor_keys.copy_(trained.keys)
            encoder.neighbor_states.copy_(item_states(model)[:, trained.rows])
        if neighbors is not None:
            encoder.neighbor_scale.copy_(neighbors.scale)
        encoder.mean_item_id.copy_(model.items.id_embedding.weight.mean(0))
        encoder.mean_user.copy_(model.user_embedding.weight.mean(0))
        return encoder.eval()

    @torch.no_grad()
    def encode_items(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Raw features (b, d_x) of new items -> (final embeddings (b, d), states (n_states, b, d)).

        An item whose fused content or standardised features overflow float32 gets a NaN embedding (its content
        neighbours alone could hide the overflow): callers refuse non-finite results."""
        inputs = self.fusion.standardize(features.float())
        fused = self.fusion.fuse_standardized(inputs)
        overflow = ~(torch.isfinite(fused).all(1) & torch.isfinite(torch.linalg.vector_norm(inputs, dim=1)))
        mean_id = self.mean_item_id.expand(features.shape[0], -1)
        ego = torch.cat([fused, mean_id], dim=1)
        states = [ego] if self.graph is None else self.graph.isolated(ego)
        queries = content_keys(inputs)
        # Content neighbours and the item graph rank the same keys: one search (best first) serves both.
        neighbors, graph_k = (
            (self.config.content_neighbors, self.config.new_item_graph_k) if self.neighbor_keys.shape[0] else (0, 0)
        )
        found = nearest(queries, self.prepare_search(), max(neighbors, graph_k)) if neighbors or graph_k else None
        if neighbors:
            states = with_neighbors(
                states, self.neighbor_states, found[:, :neighbors], self.neighbor_scale, self.config.content_residual
            )
        final = states[0] if self.graph is None else self.graph.combine(states)
        if graph_k:
            extra = content_graph_rows(
                queries,
                self.neighbor_keys,
                self.neighbor_states[0],
                graph_k,
                self.config.item_graph_normalize,
                found=found,
                weight=self.config.item_graph_weight,
            )
            final = final + extra.to(final.dtype)
        if bool(overflow.any()):
            final = final.masked_fill(overflow.unsqueeze(1), float("nan"))
        return final, torch.stack(states)

    def prepare_search(self, dtype: torch.dtype | None = None) -> SearchKeys:
        """The content keys prepared for the neighbour search, with the candidate product in ``dtype`` (default:
        the device's choice, or the dtype prepared before). Made once per key buffer: loading a state writes the
        buffer in place, which moves its version."""
        stamp = (self.neighbor_keys.data_ptr(), self.neighbor_keys._version, self.neighbor_keys.device)
        cached = getattr(self, "_prepared", None)
        if cached is None or cached[0] != stamp or (dtype is not None and cached[1].low.dtype != dtype):
            self._prepared = (stamp, SearchKeys.of(self.neighbor_keys, dtype))
        return self._prepared[1]

    @torch.no_grad()
    def encode_user(self, item_states: Tensor) -> Tensor:
        """Final embedding (d,) of a user unseen in training from the states (n_states, m, d) of the
        m items they interacted with."""
        if self.graph is None:  # MF has no aggregation function: the mean of the items is the best guess
            return item_states[0].mean(0)
        states = [self.mean_user.unsqueeze(0)]
        for layer in range(self.graph.n_layers):
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
