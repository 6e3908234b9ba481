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

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .episodes import Episode, episode_plan, train_on_episodes
from .protonet import ResidualEmbedding, class_means, restore, snapshot


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
    validation: dict | None = None  # early stopping on held-out base classes (see episodes.train_on_episodes)
    validation_classes: list[int] = field(default_factory=list)


def episode_accuracy(features, labels, episodes: list[Episode], embedding: torch.nn.Module,
                     relation: RelationModule) -> np.ndarray:
    """Query accuracy of each episode: the class of the highest relation score (modules in eval mode)."""
    x = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=-1)
    out = []
    with torch.no_grad():
        z = embedding(x)
        for ep in episodes:
            protos = class_means(z[ep.support], torch.as_tensor(ep.support_labels), len(ep.classes))
            out.append(float((relation(z[ep.query], protos).argmax(1).numpy() == ep.query_labels).mean()))
    return np.asarray(out)


def meta_train(features, labels, *, classes=None, way: int = 5, shot: int = 5, query: int = 15,
               episodes: int = 2000, hidden: int = 256, relation_hidden: int = 64, lr: float = 3e-4,
               weight_decay: float = 1e-4, clip: float | None = 0.5, validation_classes: int | None = None,
               validation_episodes: int = 200, validate_every: int = 100, seed: int = 0) -> RelationTraining:
    """Episodic training of embedding and relation module together (one Adam step per episode, MSE, Eq. 2, the
    gradient norm clipped to ``clip`` as the official code does); early stopping on held-out base classes as in
    :func:`fewvision.meta.protonet.meta_train` (the start, a random relation module, is scored too)."""
    torch.manual_seed(seed)
    x = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=-1)
    sampler, val, held = episode_plan(labels, classes, way, shot, query, validation_classes=validation_classes,
                                      validation_episodes_n=validation_episodes, seed=seed)
    embedding, relation = ResidualEmbedding(x.shape[1], hidden), RelationModule(x.shape[1], relation_hidden)

    def loss(ep: Episode) -> torch.Tensor:
        n = len(ep.classes)
        protos = class_means(embedding(x[ep.support]), torch.as_tensor(ep.support_labels), n)
        scores = relation(embedding(x[ep.query]), protos)
        return F.mse_loss(scores, F.one_hot(torch.as_tensor(ep.query_labels), n).float())

    def validate() -> np.ndarray:
        embedding.eval(), relation.eval()
        acc = episode_accuracy(x, labels, val, embedding, relation)
        embedding.train(), relation.train()
        return acc

    modules = [embedding, relation]
    result = train_on_episodes(sampler, [*embedding.parameters(), *relation.parameters()], loss, episodes, lr,
                               weight_decay, clip=clip, validate=validate if val else None, every=validate_every,
                               snapshot=lambda: snapshot(*modules), restore=lambda s: restore(modules, s))
    return RelationTraining(embedding.eval(), relation.eval(), result.losses, result.validation, held)
