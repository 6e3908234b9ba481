"""What the meta-learned heads (protonet, relationnet, maml) share: where their trained network comes from when
``fit`` runs - kept from ``fit --meta`` (``adopt``), meta-trained on episodes of the support set itself, or, with
a single image of some class, the untrained start each head defines (``_untrained``)."""

from __future__ import annotations

from abc import abstractmethod

from .base import ClassifierHead


class EpisodicHead(ClassifierHead):
    def _network_for(self, features, labels, names) -> None:
        from ..meta.episodes import support_episodes

        if hasattr(self, "inner_weight_"):
            if features.shape[1] != self.inner_weight_.shape[1]:
                raise ValueError(f"the meta-trained network takes {self.inner_weight_.shape[1]}-dimensional "
                                 f"features, got {features.shape[1]}: use the backbone it was meta-trained on")
            return
        episodes = support_episodes(labels, len(names), self.way, self.shot)
        if episodes is not None:  # train on the support itself: episodes of its own classes
            # No classes held out for validation: the support's classes are the very ones the head will classify.
            head = type(self)(**{**self.get_params(), **episodes, "validation_classes": 0}).meta_fit(features, labels)
            self.adopt(head, {"trained_on": "episodes of the support set itself"})
        else:
            self._untrained(features.shape[1])

    @abstractmethod
    def _untrained(self, dim: int) -> None:
        """Each head's start without episodes (or its one-line refusal)."""
