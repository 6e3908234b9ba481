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


def validation_split(classes: Sequence[int], held_out: int | None, seed: int) -> tuple[list[int], list[int]]:
    """(training classes, validation classes): ``held_out`` of ``classes`` (seeded draw) kept out of training, so
    that meta-training can be judged on classes it never saw - the situation of ``fit --meta`` on new classes.

    ``None`` holds out a fifth of the classes, at least two (a 2-way episode is the smallest task), when at least two
    remain to train on (four or more classes); ``0`` holds out none (no validation)."""
    classes = [int(c) for c in classes]
    if held_out is None:
        held_out = max(2, round(0.2 * len(classes))) if len(classes) >= 4 else 0
    held_out = int(held_out)
    if held_out == 0:
        return classes, []
    if held_out < 2 or len(classes) - held_out < 2:
        raise ValueError(f"validation needs at least two held-out classes and two to train on: {held_out} of "
                         f"{len(classes)} base classes cannot be held out (give 0 for no validation)")
    rng = np.random.default_rng(seed)
    held = sorted(int(c) for c in rng.choice(classes, held_out, replace=False))
    return [c for c in classes if c not in held], held


@dataclass
class EpisodeTraining:
    losses: list[float]  # mean training query loss of each block of 100 episodes
    validation: dict | None  # see train_on_episodes; None when no classes were held out


def train_on_episodes(sampler: EpisodeSampler, parameters: Iterable, episode_loss: Callable[[Episode], "object"],
                      episodes: int, lr: float, weight_decay: float, *, clip: float | None = None,
                      validate: Callable[[], np.ndarray] | None = None, every: int = 100,
                      snapshot: Callable[[], dict] | None = None,
                      restore: Callable[[dict], None] | None = None) -> EpisodeTraining:
    """One Adam step on ``episode_loss(episode)`` per sampled episode (gradient norm clipped to ``clip`` when given).

    With ``validate`` (the query accuracy of each of a fixed set of validation episodes, drawn from held-out
    classes, under the current parameters) the parameters are scored before the first step and every ``every``
    episodes, and the best-scoring state - the start included - is restored at the end (early stopping with model
    selection): meta-training keeps only what helped on classes it was not trained on. ``validation`` records the
    start's and the kept state's mean accuracy, the paired 95% half-width of their difference, the episode of the
    kept state (0: the start) and the curve."""
    import torch

    parameters = list(parameters)
    optimiser = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    losses, block = [], []
    curve, start_acc, best = [], None, None

    def check(done: int) -> None:
        nonlocal start_acc, best
        acc = np.asarray(validate(), dtype=np.float64)
        curve.append([done, float(acc.mean())])
        if start_acc is None:
            start_acc = acc
        if best is None or acc.mean() > best[1].mean():
            best = (done, acc, snapshot())

    if validate is not None:
        check(0)
    for i in range(int(episodes)):
        loss = episode_loss(sampler.sample())
        optimiser.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimiser.step()
        block.append(float(loss.detach()))
        if len(block) == 100:
            losses.append(float(np.mean(block)))
            block = []
        if validate is not None and ((i + 1) % int(every) == 0 or i + 1 == int(episodes)):
            check(i + 1)
    if block:
        losses.append(float(np.mean(block)))
    if validate is None:
        return EpisodeTraining(losses, None)
    restore(best[2])
    diff = best[1] - start_acc
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return EpisodeTraining(losses, {"start_accuracy": float(start_acc.mean()), "kept_accuracy": float(best[1].mean()),
                                    "gain_ci95": float(half), "kept_episode": int(best[0]),
                                    "n_episodes": int(len(start_acc)), "curve": curve})


def validation_episodes(labels, classes: Sequence[int], way: int, shot: int, query: int, n: int,
                        seed: int) -> list[Episode]:
    """``n`` fixed, seeded episodes of the held-out ``classes`` (way and query lowered to what they allow)."""
    labels = np.asarray(labels)
    fewest = min(int((labels == c).sum()) for c in classes)
    query = max(1, min(int(query), fewest - int(shot)))
    sampler = EpisodeSampler(labels, min(int(way), len(classes)), shot, query, classes=classes, seed=seed + 1)
    return [sampler.sample() for _ in range(int(n))]


def episode_plan(labels, classes, way: int, shot: int, query: int, *, validation_classes: int | None,
                 validation_episodes_n: int, seed: int) -> tuple[EpisodeSampler, list[Episode], list[int]]:
    """The training sampler over the base classes not held out, the fixed validation episodes of the held-out ones
    (empty without validation) and the held-out class indices (see :func:`validation_split`)."""
    labels = np.asarray(labels)
    classes = sorted(int(c) for c in (np.unique(labels) if classes is None else classes))
    train, held = validation_split(classes, validation_classes, seed)
    sampler = EpisodeSampler(labels, min(int(way), len(train)), shot, query, classes=train, seed=seed)
    val = validation_episodes(labels, held, way, shot, query, validation_episodes_n, seed) if held else []
    return sampler, val, held


def validation_note(meta: dict) -> str | None:
    """One plain sentence on what validation on held-out base classes said about a meta-trained network, for
    ``meta-train``, ``fit --meta`` and ``benchmark`` to print; None when nothing was validated."""
    v = meta.get("validation")
    if not v:
        return None
    held = ", ".join(v.get("classes", [])) or "held-out classes"
    start, kept, half = v["start_accuracy"], v["kept_accuracy"], v["gain_ci95"]
    if v["kept_episode"] == 0:
        return (f"meta-training did not beat its start on the held-out base classes ({held}): validation accuracy "
                f"{start:.3f} at the start, never higher in {meta.get('episodes', '?')} episodes; the untrained "
                "start was kept")
    verdict = "beat its start" if kept - start > half else "did not clearly beat its start (within the noise)"
    return (f"meta-training {verdict} on the held-out base classes ({held}): validation accuracy {start:.3f} -> "
            f"{kept:.3f} (gain 95% half-width {half:.3f}), state of episode {v['kept_episode']} kept")
