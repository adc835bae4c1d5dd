r"""MetaMMF_LightGCN: MetaMMF's item-specific fusion with LightGCN propagation and a frozen item-item
content graph.

MetaMMF is model-agnostic (the paper's Section 4): the fused representation can feed any backbone. This one
keeps :class:`~models.metammf.gcn.MetaMMF_GCN`'s item ego representation :math:`h_i^0 = [e_i^m ; e_i^c]`
(the fusion network :math:`W_i = W + \mathcal{T} \times_3 s_i` applied to the item's raw features, and its
ID embedding) and replaces the GraphSAGE layers with LightGCN's (He et al. 2020): no weights, no
non-linearity, the symmetric normalisation

.. math::
    h^{l+1} = D^{-1/2} A D^{-1/2} h^l, \qquad e = \frac{1}{L+1} \sum_{l=0}^{L} h^l,

then adds, with ``item_graph_k`` > 0, the frozen item-item content graph of :mod:`models.metammf.item_graph`
(FREEDOM's idea): :math:`e_i \mathrel{+}= \sum_j S_{ij} h_j^0`. Scores are :math:`\hat y_{ui} = e_u^\top e_i`;
the loss is BPR plus ``reg_weight`` x the L2 norm of the batch's ego representations (``reg_target``).

Everything else is MetaMMF_GCN's: items without training interactions and new items (``POST /items``) get the
fused content with the mean ID embedding, their content neighbours' states (``content_neighbors``) and the
item-graph term; edge dropout; the serving encoder (:mod:`models.metammf.inference`). A node without neighbours has
no LightGCN messages: with ``isolated_nodes='self'`` its own state is carried through every layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.config import MetaMMFGraphConfig
from models.graph.utils import SymmetricPropagation
from models.metammf.gcn import MetaMMF_GCN


class LightTower(nn.Module):
    """LightGCN layers behind the interface of :class:`~models.metammf.gcn.SAGETower` that the model and the
    service's encoder use (``forward``, ``final_rows``, ``combine``, ``node_update``, ``isolated``).

    Args:
        n_layers: propagation layers L.
        isolated_nodes: what a node without neighbours receives: zeros (LightGCN) or its own state.
    """

    def __init__(self, n_layers: int, isolated_nodes: str = "zeros") -> None:
        super().__init__()
        if isolated_nodes not in ("zeros", "self"):
            raise ValueError(f"unknown isolated_nodes {isolated_nodes!r} (expected 'zeros' or 'self')")
        self.n_layers = n_layers
        self.isolated_nodes = isolated_nodes

    @classmethod
    def from_config(cls, config: MetaMMFGraphConfig) -> LightTower:
        return cls(config.gcn_layers, config.isolated_nodes)

    def reset_parameters(self) -> None:
        """Nothing to initialise: the layers have no weights."""

    def weights(self) -> list[Tensor]:
        return []

    def forward(self, x: Tensor, propagate: SymmetricPropagation) -> list[Tensor]:
        """All node states [h^0, ..., h^L]."""
        states = [x]
        for _ in range(self.n_layers):
            states.append(propagate(states[-1]))
        return states

    def final_rows(self, x: Tensor, propagate: SymmetricPropagation, rows: Tensor) -> Tensor:
        """``combine(forward(x, propagate))[rows]`` (propagation is cheap: every layer is computed)."""
        return self.combine(self(x, propagate)).index_select(0, rows)

    def combine(self, states: list[Tensor]) -> Tensor:
        """The uniform mean of the states h^0..h^L."""
        return sum(states[1:], states[0]) / len(states)

    def node_update(self, layer: int, own: Tensor, neighbor_aggregate: Tensor) -> Tensor:
        """A node's next state: the (normalised) aggregate of its neighbours' states; its own state plays no
        part, as in LightGCN."""
        return neighbor_aggregate

    def isolated(self, x: Tensor) -> list[Tensor]:
        """States of nodes without neighbours: zeros after h^0, or (``isolated_nodes='self'``) h^0 throughout."""
        return [x] + [x if self.isolated_nodes == "self" else x.new_zeros(x.shape) for _ in range(self.n_layers)]


class MetaMMF_LightGCN(MetaMMF_GCN):
    """MetaMMF with LightGCN propagation (and, with ``item_graph_k``, a frozen item-item content graph).

    Args: those of :class:`~models.metammf.gcn.MetaMMF_GCN`; the GraphSAGE settings (``sage_init``,
    ``leaky_slope``, ``activate_last``, ``layer_combine``, ``layer_reg``) play no part.
    """

    @staticmethod
    def tower(config: MetaMMFGraphConfig) -> LightTower:
        return LightTower.from_config(config)

    def propagation(self, edge_index: Tensor) -> SymmetricPropagation:
        return SymmetricPropagation(edge_index, self.n_users + self.n_items)

    def calculate_sampled_loss(self, *args, **kwargs) -> Tensor:
        raise NotImplementedError("metammf_lightgcn trains on the full graph (train.neighbor_sampling=false)")
