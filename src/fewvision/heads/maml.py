"""MAML, first-order MAML and ANIL (Finn et al. 2017; Raghu et al. 2020) as a head: a meta-learned starting point
for a small network over the cached features, adapted to the support set by a few gradient steps (see
:mod:`fewvision.meta.maml` for the equations and the training).

``fewvision meta-train --method maml`` learns the starting point on episodes of a dataset's base classes;
``fewvision fit NOVEL --method maml --meta meta.fvm`` runs the inner loop (``inner_steps`` steps of rate
``inner_lr``) on the novel classes' support images - the same adaptation meta-training practised. Without
``--meta`` the starting point is meta-trained on episodes of the support set itself when every class has two images,
else it is the untrained one (the identity embedding, every class equally likely), whose adaptation is a few steps
of logistic regression.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .episodic import EpisodicHead
from .support import Support

#: fitted attribute <- parameter name in :mod:`fewvision.meta.maml`
_THETA = {"inner_weight_": "inner.weight", "inner_bias_": "inner.bias", "outer_weight_": "outer.weight",
          "outer_bias_": "outer.bias", "row_weight_": "row.weight", "row_bias_": "row.bias"}
_ADAPTED = {"adapted_inner_weight_": "inner.weight", "adapted_inner_bias_": "inner.bias",
            "adapted_outer_weight_": "outer.weight", "adapted_outer_bias_": "outer.bias",
            "head_weight_": "head.weight", "head_bias_": "head.bias"}


class MamlHead(EpisodicHead):
    #: The meta-learned starting point: what ``meta-train`` learns and ``fit --meta`` keeps.
    NETWORK = tuple(_THETA)
    STATE_SHAPES = {"inner_weight_": ("H", "D"), "inner_bias_": ("H",), "outer_weight_": ("D", "H"),
                    "outer_bias_": ("D",), "row_weight_": ("1", "D"), "row_bias_": ("1",),
                    "adapted_inner_weight_": ("H", "D"), "adapted_inner_bias_": ("H",),
                    "adapted_outer_weight_": ("D", "H"), "adapted_outer_bias_": ("D",), "head_weight_": ("C", "D"),
                    "head_bias_": ("C",)}
    method = "maml"
    needs_text = False

    def __init__(self, variant: str = "maml", way: int = 5, shot: int = 5, query: int = 15, episodes: int = 2000,
                 hidden: int = 256, inner_lr: float = 0.5, inner_steps: int = 5, lr: float = 1e-3,
                 weight_decay: float = 0.0, validation_classes: int | None = None, validation_episodes: int = 200,
                 seed: int = 0):
        self.variant = variant
        self.way = way
        self.shot = shot
        self.query = query
        self.episodes = episodes
        self.hidden = hidden
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.validation_classes = validation_classes
        self.validation_episodes = validation_episodes
        self.seed = seed

    def theta(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, attr) for attr, name in _THETA.items()}

    def meta_fit(self, features: torch.Tensor, labels, classes=None) -> "MamlHead":
        """Meta-learn the starting point on episodes of ``classes`` (the base classes) of labelled features."""
        from ..meta.maml import meta_train

        result = meta_train(features, labels, classes=classes, variant=self.variant, way=self.way, shot=self.shot,
                            query=self.query, episodes=self.episodes, hidden=self.hidden, inner_lr=self.inner_lr,
                            inner_steps=self.inner_steps, lr=self.lr, weight_decay=self.weight_decay,
                            validation_classes=self.validation_classes,
                            validation_episodes=self.validation_episodes, seed=self.seed)
        for attr, name in _THETA.items():
            setattr(self, attr, result.theta[name].clone())
        self.meta_ = {"trained_on": "episodes", "variant": self.variant, "episodes": int(self.episodes),
                      "way": int(self.way), "shot": int(self.shot), "query": int(self.query), "losses": result.losses,
                      "validation": None if result.validation is None else
                      {**result.validation, "class_indices": list(result.validation_classes)}}
        return self

    def adopt(self, meta: "MamlHead", origin: dict[str, Any]) -> "MamlHead":
        """Start from ``meta``'s learned initialisation and adapt it as ``meta`` was trained to: its variant, inner
        steps and rate replace this head's (the starting point was learned for exactly that inner loop)."""
        for name in self.NETWORK:
            setattr(self, name, getattr(meta, name).clone())
        self.variant, self.inner_lr, self.inner_steps = meta.variant, meta.inner_lr, meta.inner_steps
        self.meta_ = {**meta.meta_, **origin}
        return self

    def fit(self, support: Support) -> "MamlHead":
        from ..meta.maml import adapt, classifier

        features, labels, names = support.features, support.labels, support.class_names
        self._network_for(features, labels, names)
        x = F.normalize(features.float(), dim=-1)
        fast = adapt(classifier(self.theta(), len(names)), x, labels, steps=self.inner_steps, lr=self.inner_lr,
                     variant=self.variant)
        for attr, name in _ADAPTED.items():
            setattr(self, attr, fast[name].detach().clone().contiguous())
        self.class_names_ = list(names)
        return self

    def _untrained(self, dim: int) -> None:
        """One image of some class, so no episodes: the untrained start, whose adaptation is a few steps of
        logistic regression."""
        from ..meta.maml import initial_parameters

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the body's first layer is drawn at random
            start = initial_parameters(dim, int(self.hidden))
        for attr, name in _THETA.items():
            setattr(self, attr, start[name])
        self.meta_ = {"trained_on": "nothing: one image of some class, so no episodes (the untrained starting "
                      "point: a few steps of logistic regression)"}

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        from ..meta.maml import forward

        params = {name: getattr(self, attr) for attr, name in _ADAPTED.items()}
        with torch.no_grad():
            return forward(params, F.normalize(features.float(), dim=-1))

    def state_symbols(self) -> dict[str, int]:
        return {**super().state_symbols(), "1": 1}

    def n_trainable_parameters(self) -> int:
        return sum(int(getattr(self, n).numel()) for n in self.NETWORK if hasattr(self, n))
