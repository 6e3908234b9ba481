"""ProtoNet (Snell et al. 2017) as a head: a meta-trained embedding of the cached features, and class prototypes in
its space (see :mod:`fewvision.meta.protonet` for the equations and the training).

Two ways to fit:

* ``fewvision meta-train`` trains the embedding on episodes of a dataset's *base* classes; ``fewvision fit NOVEL
  --method protonet --meta meta.fvm`` then keeps that embedding and only averages the novel classes' support
  examples into prototypes (no training on the few novel images - the point of meta-learning).
* ``fit`` without a meta-trained embedding trains one on episodes of the support set itself when every class has
  at least two images (support and query must differ), else keeps the identity embedding: the plain prototype
  head in Euclidean form, said so in ``meta_`` rather than refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .episodic import EpisodicHead
from .support import Support


class ProtoNetHead(EpisodicHead):
    #: The trained network's tensors: what ``meta-train`` learns and ``fit --meta`` keeps.
    NETWORK = ("inner_weight_", "inner_bias_", "outer_weight_", "outer_bias_")
    STATE_SHAPES = {"inner_weight_": ("H", "D"), "inner_bias_": ("H",), "outer_weight_": ("D", "H"),
                    "outer_bias_": ("D",), "prototypes_": ("C", "D")}
    method = "protonet"
    needs_text = False

    def __init__(self, way: int = 5, shot: int = 5, query: int = 15, episodes: int = 2000, hidden: int = 256,
                 lr: float = 1e-3, weight_decay: float = 1e-4, validation_classes: int | None = None,
                 validation_episodes: int = 200, seed: int = 0):
        self.way = way
        self.shot = shot
        self.query = query
        self.episodes = episodes
        self.hidden = hidden
        self.lr = lr
        self.weight_decay = weight_decay
        self.validation_classes = validation_classes
        self.validation_episodes = validation_episodes
        self.seed = seed

    # --- the embedding ----------------------------------------------------------------------------------------
    def embedding(self):
        from ..meta.protonet import ResidualEmbedding

        net = ResidualEmbedding(self.inner_weight_.shape[1], self.inner_weight_.shape[0])
        net.load_state_dict({"inner.weight": self.inner_weight_, "inner.bias": self.inner_bias_,
                             "outer.weight": self.outer_weight_, "outer.bias": self.outer_bias_})
        return net.eval()

    def _keep(self, net) -> None:
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        self.inner_weight_, self.inner_bias_ = state["inner.weight"], state["inner.bias"]
        self.outer_weight_, self.outer_bias_ = state["outer.weight"], state["outer.bias"]

    def meta_fit(self, features: torch.Tensor, labels, classes=None) -> "ProtoNetHead":
        """Meta-train the embedding on episodes of ``classes`` (the base classes) of labelled features."""
        from ..meta.protonet import meta_train

        result = meta_train(features, labels, classes=classes, way=self.way, shot=self.shot, query=self.query,
                            episodes=self.episodes, hidden=self.hidden, lr=self.lr, weight_decay=self.weight_decay,
                            validation_classes=self.validation_classes,
                            validation_episodes=self.validation_episodes, seed=self.seed)
        self._keep(result.embedding)
        self.meta_ = self._trained_record(result)
        return self

    def _trained_record(self, result) -> dict[str, Any]:
        """What ``meta_`` says of a meta-training run: its settings, losses and validation on held-out classes."""
        record = {"trained_on": "episodes", "episodes": int(self.episodes), "way": int(self.way),
                  "shot": int(self.shot), "query": int(self.query), "losses": result.losses}
        if result.validation is not None:
            record["validation"] = {**result.validation, "class_indices": list(result.validation_classes)}
        else:
            record["validation"] = None
        return record

    def adopt(self, meta: "ProtoNetHead", origin: dict[str, Any]) -> "ProtoNetHead":
        """Use ``meta``'s trained embedding (prototypes are made by :meth:`fit`)."""
        for name in self.NETWORK:
            setattr(self, name, getattr(meta, name).clone())
        self.meta_ = {**meta.meta_, **origin}
        return self

    # --- the head protocol ----------------------------------------------------------------------------------------
    def fit(self, support: Support) -> "ProtoNetHead":
        features, labels, names = support.features, support.labels, support.class_names
        self._network_for(features, labels, names)
        from ..meta.protonet import class_means

        with torch.no_grad():
            z = self.embedding()(F.normalize(features.float(), dim=-1))
        self.prototypes_ = class_means(z, labels, len(names)).contiguous()
        self.class_names_ = list(names)
        return self

    def _untrained(self, dim: int) -> None:
        """No episodes can be drawn (one image of some class): the identity embedding, i.e. plain prototypes."""
        from ..meta.protonet import ResidualEmbedding

        torch.manual_seed(self.seed)
        self._keep(ResidualEmbedding(dim, int(self.hidden)))
        self.meta_ = {"trained_on": "nothing: one image of some class, so no episodes (the identity embedding: "
                      "plain prototypes)"}

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Eq. 2: negative squared Euclidean distances to the prototypes, in the embedding's space."""
        with torch.no_grad():
            z = self.embedding()(F.normalize(features.float(), dim=-1))
        return -torch.cdist(z, self.prototypes_).pow(2)

    def n_trainable_parameters(self) -> int:
        return sum(int(getattr(self, n).numel()) for n in self.NETWORK if hasattr(self, n))
