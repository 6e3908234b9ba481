"""MAML (Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017),
its first-order approximation, and ANIL (Raghu, Raghu, Bengio and Vinyals, "Rapid Learning or Feature Reuse?",
ICLR 2020), on a small network over frozen foundation-model features.

MAML learns an initialisation ``θ`` from which a few gradient steps on a task's support set give a good classifier
for that task. The inner loop (Eq. 1, repeated ``steps`` times) is ``θ'_i = θ - α ∇_θ L_support(f_θ)``; the outer
(meta) update is ``θ ← θ - β ∇_θ Σ_tasks L_query(f_θ'_i)`` (Eq. 2 / Algorithm 2), which differentiates through the
inner steps (second order). First-order MAML drops those second derivatives (the inner gradients are treated as
constants); ANIL adapts only the output layer in the inner loop and keeps the body fixed there.

The network: the residual embedding of :mod:`.protonet` (the identity at the start), then a linear layer with one
output per class. A task's classes come in no fixed order and a site's novel classes need not number ``way``, so the
output layer starts every task from one learned row (weight and bias) copied to every class, as in UNICORN-MAML
(Ye and Chao, ICLR 2022); MAML's paper uses a ``way``-sized output layer, which would tie the model to one number of
classes and one class order. Gradients are taken with ``torch.func.grad`` on the functional network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad

from .episodes import Episode, episode_plan, train_on_episodes

VARIANTS = ("maml", "fomaml", "anil")
BODY = ("inner.weight", "inner.bias", "outer.weight", "outer.bias")


def initial_parameters(dim: int, hidden: int) -> dict[str, torch.Tensor]:
    """θ at the start of meta-training: the identity embedding and a zero output row (every class equally likely)."""
    from .protonet import ResidualEmbedding

    body = {k: v.detach().clone() for k, v in ResidualEmbedding(dim, hidden).state_dict().items()}
    return {**body, "row.weight": torch.zeros(1, dim), "row.bias": torch.zeros(1)}


def classifier(theta: dict[str, torch.Tensor], n_classes: int) -> dict[str, torch.Tensor]:
    """A task's starting parameters: the body, and the learned row copied to every one of its classes."""
    start = {k: theta[k] for k in BODY}
    start["head.weight"] = theta["row.weight"].expand(n_classes, -1)
    start["head.bias"] = theta["row.bias"].expand(n_classes)
    return start


def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Class logits of (L2-normalised) features under a task's parameters."""
    z = x + F.linear(F.relu(F.linear(x, params["inner.weight"], params["inner.bias"])),
                     params["outer.weight"], params["outer.bias"])
    return F.linear(z, params["head.weight"], params["head.bias"])


def support_loss(adapted: dict, fixed: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(forward({**fixed, **adapted}, x), y)


def adapt(start: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
          variant: str = "maml") -> dict[str, torch.Tensor]:
    """The inner loop: ``steps`` gradient steps of rate ``lr`` on the support loss, from ``start``.

    ``maml`` adapts every parameter and keeps the graph for the outer update's second derivatives; ``fomaml``
    detaches the inner gradients; ``anil`` adapts the output layer only."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown MAML variant '{variant}': expected one of {', '.join(VARIANTS)}")
    names = ("head.weight", "head.bias") if variant == "anil" else tuple(start)
    fast = dict(start)
    for _ in range(int(steps)):
        adapted = {k: fast[k] for k in names}
        fixed = {k: v for k, v in fast.items() if k not in names}
        grads = grad(support_loss)(adapted, fixed, x, y)
        if variant == "fomaml":
            grads = {k: g.detach() for k, g in grads.items()}
        fast = {**fast, **{k: adapted[k] - lr * grads[k] for k in names}}
    return fast


@dataclass
class MamlTraining:
    theta: dict[str, torch.Tensor]  # the meta-learned initialisation
    losses: list[float]  # mean query loss after adaptation, per block of 100 episodes
    validation: dict | None = None  # early stopping on held-out base classes (see episodes.train_on_episodes)
    validation_classes: list[int] = field(default_factory=list)


def meta_train(features, labels, *, classes=None, variant: str = "maml", way: int = 5, shot: int = 5,
               query: int = 15, episodes: int = 2000, hidden: int = 256, inner_lr: float = 0.5,
               inner_steps: int = 5, lr: float = 1e-3, weight_decay: float = 0.0,
               validation_classes: int | None = None, validation_episodes: int = 200, validate_every: int = 100,
               seed: int = 0) -> MamlTraining:
    """Algorithm 2 on episodes of ``classes`` (the base classes), one task per outer Adam step; early stopping on
    held-out base classes as in :func:`fewvision.meta.protonet.meta_train` (the untrained start scored too)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown MAML variant '{variant}': expected one of {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    x = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=-1)
    sampler, val, held = episode_plan(labels, classes, way, shot, query, validation_classes=validation_classes,
                                      validation_episodes_n=validation_episodes, seed=seed)
    theta = {k: v.requires_grad_() for k, v in initial_parameters(x.shape[1], hidden).items()}

    def loss(ep: Episode) -> torch.Tensor:
        fast = adapt(classifier(theta, len(ep.classes)), x[ep.support], torch.as_tensor(ep.support_labels),
                     steps=inner_steps, lr=inner_lr, variant=variant)
        return F.cross_entropy(forward(fast, x[ep.query]), torch.as_tensor(ep.query_labels))

    def validate() -> np.ndarray:
        current = {k: v.detach() for k, v in theta.items()}
        return episode_accuracy(x, labels, val, current, steps=inner_steps, lr=inner_lr, variant=variant)

    def restore(state: dict) -> None:
        with torch.no_grad():
            for k, v in state.items():
                theta[k].copy_(v)

    result = train_on_episodes(sampler, theta.values(), loss, episodes, lr, weight_decay,
                               validate=validate if val else None, every=validate_every,
                               snapshot=lambda: {k: v.detach().clone() for k, v in theta.items()}, restore=restore)
    return MamlTraining({k: v.detach() for k, v in theta.items()}, result.losses, result.validation, held)


def episode_accuracy(features, labels, episodes: list[Episode], theta: dict[str, torch.Tensor], *, steps: int,
                     lr: float, variant: str = "maml") -> np.ndarray:
    """Query accuracy of each episode after adapting ``theta`` on its support set."""
    x = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=-1)
    out = []
    for ep in episodes:
        way = len(ep.classes)
        fast = adapt(classifier(theta, way), x[ep.support], torch.as_tensor(ep.support_labels), steps=steps, lr=lr,
                     variant=variant)
        with torch.no_grad():
            out.append(float((forward(fast, x[ep.query]).argmax(1).numpy() == ep.query_labels).mean()))
    return np.asarray(out)
