"""Prototypical Networks (Snell, Swersky and Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017)
on frozen foundation-model features.

A learned embedding ``f`` maps each (L2-normalised) cached feature; a class's prototype is the mean embedded support
example, ``c_k = 1/|S_k| sum_{x in S_k} f(x)`` (Eq. 1), and a query is classified by a softmax over negative squared
Euclidean distances, ``p(y = k | x) ∝ exp(-||f(x) - c_k||^2)`` (Eq. 2). Meta-training minimises the negative
log-probability of the true class of each query, episode after episode, on the base classes only (Algorithm 1).

``f`` here is a residual two-layer MLP, ``f(x) = x + W2 relu(W1 x + b1) + b2``, with ``W2`` and ``b2`` starting at
zero: before training it is the identity, i.e. the untrained prototype head on the same features (Euclidean
prototypes of unit vectors rank classes as cosine does), so what meta-training adds is measured against that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .episodes import Episode, episode_plan, train_on_episodes


class ResidualEmbedding(torch.nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.inner = torch.nn.Linear(dim, hidden)
        self.outer = torch.nn.Linear(hidden, dim)
        torch.nn.init.zeros_(self.outer.weight)
        torch.nn.init.zeros_(self.outer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(F.relu(self.inner(x)))


def class_means(embedded: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Eq. 1: the mean embedded example of each class [C, D]."""
    counts = torch.bincount(labels, minlength=n_classes).clamp_min(1).to(embedded.dtype)
    sums = torch.zeros(n_classes, embedded.shape[1], dtype=embedded.dtype).index_add(0, labels, embedded)
    return sums / counts[:, None]


def prototype_logits(embedded_query: torch.Tensor, embedded_support: torch.Tensor, support_labels: torch.Tensor,
                     n_classes: int) -> torch.Tensor:
    """Eq. 2: negative squared Euclidean distances of the queries to the class means of the support."""
    return -torch.cdist(embedded_query, class_means(embedded_support, support_labels, n_classes)).pow(2)


@dataclass
class MetaTraining:
    embedding: ResidualEmbedding
    losses: list[float]  # mean query loss per block of 100 episodes
    validation: dict | None = None  # early stopping on held-out base classes (see episodes.train_on_episodes)
    validation_classes: list[int] = field(default_factory=list)  # the held-out class indices


def snapshot(*modules: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def restore(modules, states) -> None:
    for m, s in zip(modules, states):
        m.load_state_dict(s)


def meta_train(features: torch.Tensor | np.ndarray, labels: np.ndarray, *, classes=None, way: int = 5,
               shot: int = 5, query: int = 15, episodes: int = 2000, hidden: int = 256, lr: float = 1e-3,
               weight_decay: float = 1e-4, validation_classes: int | None = None, validation_episodes: int = 200,
               validate_every: int = 100, seed: int = 0) -> MetaTraining:
    """Algorithm 1 on the examples of ``classes`` (the base classes): one Adam step per episode.

    ``validation_classes`` of the base classes (default: a fifth, at least two, when four or more) are held out of
    training; the embedding is scored on ``validation_episodes`` fixed episodes of them before training and every
    ``validate_every`` episodes, and the best state - the identity start included - is kept."""
    torch.manual_seed(seed)
    x = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=-1)
    sampler, val, held = episode_plan(labels, classes, way, shot, query, validation_classes=validation_classes,
                                      validation_episodes_n=validation_episodes, seed=seed)
    net = ResidualEmbedding(x.shape[1], hidden)

    def loss(ep: Episode) -> torch.Tensor:
        logits = prototype_logits(net(x[ep.query]), net(x[ep.support]), torch.as_tensor(ep.support_labels),
                                  len(ep.classes))
        return F.cross_entropy(logits, torch.as_tensor(ep.query_labels))

    def validate() -> np.ndarray:
        net.eval()
        acc = episode_accuracy(x, labels, val, net)
        net.train()
        return acc

    result = train_on_episodes(sampler, net.parameters(), loss, episodes, lr, weight_decay,
                               validate=validate if val else None, every=validate_every,
                               snapshot=lambda: snapshot(net), restore=lambda s: restore([net], s))
    return MetaTraining(net.eval(), result.losses, result.validation, held)


def episode_accuracy(features, labels, episodes: list[Episode], embedding: torch.nn.Module | None = None) -> np.ndarray:
    """Query accuracy of each episode with prototypes in ``embedding``'s space (None: the raw features)."""
    x = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=-1)
    out = []
    with torch.no_grad():
        z = embedding(x) if embedding is not None else x
        for ep in episodes:
            way = len(ep.classes)
            logits = prototype_logits(z[ep.query], z[ep.support], torch.as_tensor(ep.support_labels), way)
            out.append(float((logits.argmax(1).numpy() == ep.query_labels).mean()))
    return np.asarray(out)
