"""What LightGCN and NGCF share: free embeddings of every node [users | items] propagated over the training
graph, scored by inner product, trained with BPR and L2 on the batch's ego (layer-0) embeddings."""

from __future__ import annotations

from abc import abstractmethod

from torch import Tensor, nn

from models.base import RecModel, l2_penalty


class PropagatedNodeEmbeddings(RecModel):
    """Subclasses own ``self.embedding`` (an ``nn.Embedding`` over [users | items]) and :meth:`propagate`."""

    embedding: nn.Embedding

    @abstractmethod
    def propagate(self) -> Tensor:
        """Final embeddings of all nodes [users | items]."""

    def get_embedding(self) -> tuple[Tensor, Tensor]:
        final = self.propagate()
        return final[: self.n_users], final[self.n_users :]

    def calculate_loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        final = self.propagate()
        rows = (users, self.n_users + pos_items, self.n_users + neg_items)
        u, pos, neg = (final[r] for r in rows)
        ego = (self.embedding(r) for r in rows)
        return self.ranking_loss(users, pos_items, neg_items, u, pos, neg) + self.reg_weight * l2_penalty(*ego)
