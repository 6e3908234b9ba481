"""Seeded N-way K-shot tasks (episodes) over labelled features, and the base / novel split of the classes.

An episode draws ``way`` classes, then ``shot`` support and ``query`` query examples of each, without overlap; the
generator is seeded, so a run's episodes are the same on every machine. Only classes with at least
``shot + query`` examples take part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class Episode:
    classes: np.ndarray  # [way] class indices (into the dataset's classes), in episode order
    support: np.ndarray  # [way * shot] example indices, grouped by episode class
    query: np.ndarray  # [way * query] example indices, grouped by episode class

    @property
    def support_labels(self) -> np.ndarray:
        """Episode-local labels 0..way-1 of the support examples."""
        return np.repeat(np.arange(len(self.classes)), len(self.support) // len(self.classes))

    @property
    def query_labels(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.classes)), len(self.query) // len(self.classes))


class EpisodeSampler:
    """Episodes over ``labels`` (one class index per example) restricted to ``classes`` (default: all)."""

    def __init__(self, labels: Sequence[int], way: int, shot: int, query: int, *, classes: Sequence[int] | None = None,
                 seed: int = 0):
        labels = np.asarray(labels, dtype=np.int64)
        if way < 2 or shot < 1 or query < 1:
            raise ValueError(f"an episode needs way >= 2, shot >= 1 and query >= 1, got {way}-way {shot}-shot "
                             f"{query}-query")
        wanted = np.unique(labels) if classes is None else np.asarray(sorted(set(int(c) for c in classes)))
        self.members = {int(c): np.flatnonzero(labels == c) for c in wanted}
        eligible = [c for c, idx in self.members.items() if len(idx) >= shot + query]
        if len(eligible) < way:
            raise ValueError(f"{way}-way {shot}-shot episodes with {query} queries need {way} classes with at least "
                             f"{shot + query} examples each; {len(eligible)} of the {len(self.members)} have that many")
        self.eligible = np.asarray(eligible)
        self.way, self.shot, self.query = way, shot, query
        self.rng = np.random.default_rng(seed)

    def sample(self) -> Episode:
        classes = self.rng.choice(self.eligible, self.way, replace=False)
        support, query = [], []
        for c in classes:
            picked = self.rng.choice(self.members[int(c)], self.shot + self.query, replace=False)
            support.append(picked[: self.shot])
            query.append(picked[self.shot :])
        return Episode(classes, np.concatenate(support), np.concatenate(query))

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()


def split_classes(class_names: Sequence[str], base: Sequence[str]) -> tuple[list[int], list[int]]:
    """(base class indices, novel class indices) for the named base classes; every other class is novel."""
    names = list(class_names)
    unknown = sorted(set(base) - set(names))
    if unknown:
        raise ValueError(f"base class(es) {', '.join(unknown)} are not in the dataset's classes {', '.join(names)}")
    base_idx = [i for i, n in enumerate(names) if n in set(base)]
    novel_idx = [i for i, n in enumerate(names) if n not in set(base)]
    if len(base_idx) < 2:
        raise ValueError("meta-training needs at least two base classes")
    return base_idx, novel_idx


def support_episodes(labels, n_classes: int, way: int, shot: int) -> dict[str, int] | None:
    """Episode settings for meta-training on a support set itself (way, shot, query), or None when some class has
    a single image (support and query must differ)."""
    import torch

    fewest = int(torch.bincount(torch.as_tensor(labels), minlength=n_classes).min())
    if fewest < 2:
        return None
    shot = max(1, min(int(shot), fewest - 1))
    return {"way": min(int(way), n_classes), "shot": shot, "query": fewest - shot}


def train_on_episodes(sampler: EpisodeSampler, parameters: Iterable, episode_loss: Callable[[Episode], "object"],
                      episodes: int, lr: float, weight_decay: float) -> list[float]:
    """One Adam step on ``episode_loss(episode)`` per sampled episode; the mean loss of each block of 100."""
    import torch

    optimiser = torch.optim.Adam(list(parameters), lr=lr, weight_decay=weight_decay)
    losses, block = [], []
    for _ in range(int(episodes)):
        loss = episode_loss(sampler.sample())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        block.append(float(loss.detach()))
        if len(block) == 100:
            losses.append(float(np.mean(block)))
            block = []
    if block:
        losses.append(float(np.mean(block)))
    return losses
