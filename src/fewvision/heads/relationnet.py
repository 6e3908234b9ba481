"""Relation Network (Sung et al. 2018) as a head: ProtoNet's embedding and class features, scored by a learned
relation module instead of a fixed distance (see :mod:`fewvision.meta.relationnet`). Probabilities are the
relation scores normalised over the classes (``logits = log r``).

Meta-train it (``fewvision meta-train --method relationnet``) and ``fit --meta``; without ``--meta`` it is trained
on episodes of the support set itself, which needs two images of every class - with one, a relation module has
nothing to learn from and ``fit`` says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .protonet import ProtoNetHead


class RelationNetHead(ProtoNetHead):
    #: fitted attribute <- the relation module's state_dict key
    RELATION = {"relation_hidden_weight_": "hidden.weight", "relation_hidden_bias_": "hidden.bias",
                "relation_norm_weight_": "norm.weight", "relation_norm_bias_": "norm.bias",
                "relation_norm_mean_": "norm.running_mean", "relation_norm_var_": "norm.running_var",
                "relation_out_weight_": "out.weight", "relation_out_bias_": "out.bias"}
    NETWORK = ProtoNetHead.NETWORK + tuple(RELATION)
    STATE_SHAPES = {**ProtoNetHead.STATE_SHAPES, "relation_hidden_weight_": ("R", "2D"),
                    "relation_hidden_bias_": ("R",), "relation_norm_weight_": ("R",), "relation_norm_bias_": ("R",),
                    "relation_norm_mean_": ("R",), "relation_norm_var_": ("R",), "relation_out_weight_": ("1", "R"),
                    "relation_out_bias_": ("1",)}
    method = "relationnet"

    def __init__(self, way: int = 5, shot: int = 5, query: int = 15, episodes: int = 2000, hidden: int = 256,
                 relation_hidden: int = 64, lr: float = 3e-4, weight_decay: float = 1e-4, clip: float | None = 0.5,
                 validation_classes: int | None = None, validation_episodes: int = 200, seed: int = 0):
        super().__init__(way, shot, query, episodes, hidden, lr, weight_decay, validation_classes,
                         validation_episodes, seed)
        self.relation_hidden = relation_hidden
        self.clip = clip

    def meta_fit(self, features: torch.Tensor, labels, classes=None) -> "RelationNetHead":
        from ..meta.relationnet import meta_train

        result = meta_train(features, labels, classes=classes, way=self.way, shot=self.shot, query=self.query,
                            episodes=self.episodes, hidden=self.hidden, relation_hidden=self.relation_hidden,
                            lr=self.lr, weight_decay=self.weight_decay, clip=self.clip,
                            validation_classes=self.validation_classes,
                            validation_episodes=self.validation_episodes, seed=self.seed)
        self._keep(result.embedding)
        state = result.relation.state_dict()
        for attr, key in self.RELATION.items():
            setattr(self, attr, state[key].detach().clone())
        self.meta_ = self._trained_record(result)
        return self

    def relation(self):
        from ..meta.relationnet import RelationModule

        module = RelationModule(self.inner_weight_.shape[1], self.relation_hidden_weight_.shape[0])
        state = {key: getattr(self, attr) for attr, key in self.RELATION.items()}
        module.load_state_dict({**state, "norm.num_batches_tracked": torch.tensor(0)})
        return module.eval()

    def _untrained(self, dim: int) -> None:
        raise ValueError("relationnet learns its relation module on episodes: give --meta (a model from 'fewvision "
                         "meta-train --method relationnet') or at least two images of every class")

    def state_symbols(self) -> dict[str, int]:
        symbols = super().state_symbols()
        if hasattr(self, "inner_weight_"):
            symbols["2D"] = 2 * int(self.inner_weight_.shape[1])
        symbols["1"] = 1
        return symbols

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.embedding()(F.normalize(features.float(), dim=-1))
            scores = self.relation()(z, self.prototypes_)
        return torch.log(scores.clamp_min(1e-12))
