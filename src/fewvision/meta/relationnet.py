"""Relation Network (Sung, Yang, Zhang, Xiang, Torr and Hospedales, "Learning to Compare: Relation Network for
Few-Shot Learning", CVPR 2018) on frozen foundation-model features.

An embedding ``f`` (the residual MLP of :mod:`.protonet`, starting at the identity) maps each cached feature; a
class's feature is the mean of its embedded support examples; a relation module ``g`` scores every (query, class)
pair, ``r_{i,k} = g([f(x_i); c_k])`` in [0, 1] (Eq. 1, a sigmoid output), and both are trained on episodes with
the mean squared error to 1 for the query's own class and 0 for the others (Eq. 2).

``g`` is a linear layer, batch normalisation, ReLU and a linear layer to the sigmoid: the paper's relation module
(two convolution + batch-norm + ReLU blocks, then two fully connected layers) for feature vectors instead of maps.
The batch normalisation is not decoration: frozen foundation features share a large common component, and without
it the module learned nothing on scikit-learn's digits (every relation score 0.2, the MSE of the constant guess).

The paper sums a class's K embedded shots; here they are averaged, so a class's feature does not change scale when
``fit`` sees another number of shots than meta-training did (with equal shots the two differ by the constant K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .episodes import Episode, EpisodeSampler, train_on_episodes
from .protonet import ResidualEmbedding, class_means


class RelationModule(torch.nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = torch.nn.Linear(2 * dim, hidden)
        self.norm = torch.nn.BatchNorm1d(hidden)
        self.out = torch.nn.Linear(hidden, 1)

    def forward(self, queries: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Relation scores [Q, C] of embedded queries [Q, D] against class features [C, D]."""
        pairs = torch.cat([queries.unsqueeze(1).expand(-1, len(classes), -1),
                           classes.unsqueeze(0).expand(len(queries), -1, -1)], dim=-1)
        h = self.norm(self.hidden(pairs).flatten(0, 1)).view(len(queries), len(classes), -1)
        return torch.sigmoid(self.out(F.relu(h))).squeeze(-1)


@dataclass
class RelationTraining:
    embedding: ResidualEmbedding
    relation: RelationModule
    losses: list[float]  # mean query loss per block of 100 episodes


def meta_train(features, labels, *, classes=None, way: int = 5, shot: int = 5, query: int = 15,
               episodes: int = 2000, hidden: int = 256, relation_hidden: int = 64, lr: float = 3e-4,
               weight_decay: float = 1e-4, seed: int = 0) -> RelationTraining:
    """Episodic training of embedding and relation module together (one Adam step per episode, MSE, Eq. 2)."""
    torch.manual_seed(seed)
    x = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=-1)
    sampler = EpisodeSampler(labels, way, shot, query, classes=classes, seed=seed)
    embedding, relation = ResidualEmbedding(x.shape[1], hidden), RelationModule(x.shape[1], relation_hidden)

    def loss(ep: Episode) -> torch.Tensor:
        protos = class_means(embedding(x[ep.support]), torch.as_tensor(ep.support_labels), way)
        scores = relation(embedding(x[ep.query]), protos)
        return F.mse_loss(scores, F.one_hot(torch.as_tensor(ep.query_labels), way).float())

    losses = train_on_episodes(sampler, [*embedding.parameters(), *relation.parameters()], loss, episodes, lr,
                               weight_decay)
    return RelationTraining(embedding.eval(), relation.eval(), losses)
