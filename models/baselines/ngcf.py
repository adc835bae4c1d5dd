r"""NGCF (Wang et al., SIGIR 2019): neural graph collaborative filtering, pure CF (no item content).

Each layer passes messages :math:`m_{u \leftarrow i} = p_{ui} (W_1 e_i + W_2 (e_i \odot e_u))` with
:math:`p_{ui} = 1/\sqrt{|N_u||N_i|}` and a self message :math:`m_{u \leftarrow u} = W_1 e_u`; in matrix
form (paper Eq. 7, with the official code's biases):

.. math::
    E^{(l)} = \mathrm{LeakyReLU}\big((L + I) E^{(l-1)} W_1^l + b_1^l + (L E^{(l-1)}) \odot E^{(l-1)} W_2^l + b_2^l\big),
    \qquad L = D^{-1/2} A D^{-1/2}

and the final embedding concatenates all layers, :math:`e = [e^{(0)} ; \hat e^{(1)} ; \dots ; \hat e^{(L)}]`,
where :math:`\hat e^{(l)}` is the layer output after message dropout and L2 normalisation (official
code). :math:`\hat y_{ui} = e_u^\top e_i`.

Settings (paper / official code -> here):

* LeakyReLU slope 0.2 (the official ``tf.nn.leaky_relu``);
* embedding size 64, three 64-wide layers -> ``config.embedding_dim`` wide, ``config.gcn_layers`` layers;
* message dropout 0.1 -> ``config.message_dropout`` (training only); node dropout (0.1 in the paper)
  is not implemented;
* Xavier-uniform init of embeddings and weights, zero biases (official code);
* loss: BPR plus ``reg_weight`` x the L2 norm of the batch's ego embeddings / batch size (official TF
  code; the paper's 1e-5 is ``train.reg_weight``); lr 1e-4 and batch 1024 in the paper are trainer settings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import ModelInputs
from models.baselines.node_embeddings import PropagatedNodeEmbeddings
from models.config import NGCFConfig
from models.graph.utils import SymmetricPropagation, bipartite_edge_index

LEAKY_SLOPE = 0.2


class NGCF(PropagatedNodeEmbeddings):
    """NGCF over the training interactions.

    Args:
        n_users, n_items: graph size.
        train_pairs: (n, 2) training (user, item) pairs: the graph.
        config: ``embedding_dim``, ``gcn_layers`` and ``message_dropout`` are used.
        reg_weight: L2 weight on the batch ego embeddings.
    """

    def __init__(self, inputs: ModelInputs, config: NGCFConfig, reg_weight: float = 1e-4) -> None:
        super().__init__(inputs, config, reg_weight)
        n_users, n_items, train_pairs = self.n_users, self.n_items, inputs.train_pairs
        dim = config.embedding_dim
        self.embedding = nn.Embedding(n_users + n_items, dim)
        self.w_gc = nn.ModuleList(nn.Linear(dim, dim) for _ in range(config.gcn_layers))  # W_1, b_1
        self.w_bi = nn.ModuleList(nn.Linear(dim, dim) for _ in range(config.gcn_layers))  # W_2, b_2
        self.dropout = nn.Dropout(config.message_dropout)
        edge_index = bipartite_edge_index(train_pairs.long(), n_users, n_items)
        self.register_buffer("edge_index", edge_index, persistent=False)
        self._propagation: SymmetricPropagation | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.embedding.weight)
        for linear in [*self.w_gc, *self.w_bi]:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def laplacian(self) -> SymmetricPropagation:
        if self._propagation is None or self._propagation.device != self.edge_index.device:
            self._propagation = SymmetricPropagation(self.edge_index, self.n_users + self.n_items)
        return self._propagation

    def propagate(self) -> Tensor:
        """Final embeddings [e^(0) ; ... ; e^(L)] of all nodes [users | items]."""
        laplacian = self.laplacian()
        h = self.embedding.weight
        layers = [h]
        for w_gc, w_bi in zip(self.w_gc, self.w_bi, strict=True):
            side = laplacian(h)  # L E
            h = F.leaky_relu(w_gc(side + h) + w_bi(side * h), LEAKY_SLOPE)
            h = self.dropout(h)
            layers.append(F.normalize(h, dim=1))
        return torch.cat(layers, dim=1)
